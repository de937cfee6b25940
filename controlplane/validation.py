"""Validation of names and values, shared by every backend so the same inputs are legal in all.

Names follow Kubernetes' DNS-label rule (lowercase alphanumerics and ``-``, at most 63
characters, starting and ending with an alphanumeric), so an index or node name is also a legal
Custom Resource name. Every check raises :class:`InvalidRequestError` saying what was wrong.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from .errors import InvalidRequestError
from .types import IndexSettings

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_REPLICAS",
    "MAX_SHARDS",
    "check_flag_name",
    "check_holder",
    "check_lock_key",
    "check_name",
    "check_positive",
    "coerce_settings",
    "merge_settings",
]

MAX_NAME_LENGTH = 63
MAX_KEY_LENGTH = 253
MAX_SHARDS = 1024
MAX_REPLICAS = 16

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_FLAG = re.compile(r"[a-z0-9]([-a-z0-9_.]*[a-z0-9])?")


def check_name(kind: str, name: object) -> str:
    """Check an index or node name: a lowercase DNS label of at most 63 characters."""
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{kind} name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequestError(
            f"{kind} name {name[:20]!r}... is {len(name)} characters long; "
            f"the limit is {MAX_NAME_LENGTH}"
        )
    if _NAME.fullmatch(name) is None:
        raise InvalidRequestError(
            f"{kind} name {name!r} is invalid: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_flag_name(name: object) -> str:
    """Check a feature-flag or configuration key: like a name, but ``_`` and ``.`` allowed."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidRequestError(
            f"feature flag name must be 1 to {MAX_NAME_LENGTH} characters, got {name!r}"
        )
    if _FLAG.fullmatch(name) is None:
        raise InvalidRequestError(
            f"feature flag name {name!r} is invalid: use lowercase letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit"
        )
    return name


def _check_text(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidRequestError(
            f"{what} is {len(value)} characters; the limit is {MAX_KEY_LENGTH}"
        )
    if not value.isprintable():
        raise InvalidRequestError(f"{what} {value!r} contains non-printable characters")
    return value


def check_lock_key(key: object) -> str:
    """Check a lock key: 1 to 253 printable characters (``/`` and ``:`` allowed)."""
    return _check_text("lock key", key)


def check_holder(holder: object) -> str:
    """Check a lock holder's identity: 1 to 253 printable characters."""
    return _check_text("lock holder", holder)


def check_positive(what: str, value: object, maximum: float | None = None) -> float:
    """Check a finite number > 0 (and <= ``maximum`` when given)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(f"{what} must be a positive number, got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidRequestError(f"{what} is {value}; the limit is {maximum}")
    return float(value)


def coerce_settings(settings: IndexSettings | dict[str, Any] | None) -> IndexSettings:
    """Turn user input into validated :class:`IndexSettings`.

    A mapping may use ``number_of_shards``/``number_of_replicas`` (or ``shards``/``replicas``);
    any other key goes to ``extra``.
    """
    if settings is None:
        result = IndexSettings()
    elif isinstance(settings, IndexSettings):
        result = settings
    elif isinstance(settings, dict):
        raw = dict(settings)
        known: dict[str, Any] = {}
        for key, alias in (("number_of_shards", "shards"), ("number_of_replicas", "replicas")):
            if key in raw:
                known[key] = raw.pop(key)
            elif alias in raw:
                known[key] = raw.pop(alias)
        extra = raw.pop("extra", {})
        if not isinstance(extra, dict):
            raise InvalidRequestError(f"settings.extra must be a mapping, got {extra!r}")
        known["extra"] = {**extra, **raw}
        try:
            result = msgspec.convert(known, IndexSettings)
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid index settings: {exc}") from None
    else:
        raise InvalidRequestError(
            f"index settings must be IndexSettings or a mapping, got {type(settings).__name__}"
        )
    _check_count("number_of_shards", result.number_of_shards, 1, MAX_SHARDS)
    _check_count("number_of_replicas", result.number_of_replicas, 0, MAX_REPLICAS)
    return result


def _check_count(what: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(
            f"settings.{what} must be an integer from {low} to {high}, got {value!r}"
        )


def merge_settings(current: IndexSettings, patch: dict[str, Any]) -> IndexSettings:
    """``current`` with the keys of ``patch`` changed (Elasticsearch's partial update).

    ``number_of_shards``/``number_of_replicas`` (or ``shards``/``replicas``) set the counts; any
    other key sets an extra setting, and a ``None`` value removes it.
    """
    raw = dict(patch)
    merged: dict[str, Any] = {
        "number_of_shards": current.number_of_shards,
        "number_of_replicas": current.number_of_replicas,
    }
    for key, alias in (("number_of_shards", "shards"), ("number_of_replicas", "replicas")):
        if key in raw:
            merged[key] = raw.pop(key)
        elif alias in raw:
            merged[key] = raw.pop(alias)
    extra = dict(current.extra)
    nested = raw.pop("extra", {})
    if not isinstance(nested, dict):
        raise InvalidRequestError(f"settings.extra must be a mapping, got {nested!r}")
    for key, value in {**nested, **raw}.items():
        if value is None:
            extra.pop(key, None)
        else:
            extra[key] = value
    merged["extra"] = extra
    return coerce_settings(merged)
