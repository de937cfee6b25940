"""The one place where answers of the Kubernetes API become controlplane errors.

Every request of the k8s backend goes through :func:`call_json` (or, for a streaming watch,
:func:`check_response`), and every exception of ``kubernetes_asyncio`` or ``aiohttp`` that
escapes a request is translated by :func:`translate`. The HTTP status decides the class:

======================  ===================================================================
status                  error
======================  ===================================================================
400, 422                :class:`~controlplane.errors.InvalidRequestError`
401, 403                :class:`~controlplane.errors.PermissionDeniedError` (names the verb
                        and the resource, and what to grant)
404                     :class:`~controlplane.errors.NotFoundError`
409 ``AlreadyExists``   :class:`~controlplane.errors.AlreadyExistsError`
409 (other)             :class:`~controlplane.errors.ConflictError` (a stale resourceVersion)
410                     :class:`~controlplane.errors.CompactedError` (re-list)
429, 5xx                :class:`~controlplane.errors.UnavailableError` (retry with backoff)
504, client timeouts    :class:`~controlplane.errors.OperationTimeoutError`
connection errors       :class:`~controlplane.errors.UnavailableError`
======================  ===================================================================

The Kubernetes ``Status`` body's ``reason`` and ``message`` are kept in the message, so that a
validation error says which field the API server rejected.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from controlplane.errors import (
    AlreadyExistsError,
    CompactedError,
    ConflictError,
    ControlPlaneError,
    InvalidRequestError,
    NotFoundError,
    OperationTimeoutError,
    PermissionDeniedError,
    UnavailableError,
)

__all__ = [
    "RETRYABLE",
    "call_json",
    "check_response",
    "error_for_status",
    "status_details",
    "translate",
]

RETRYABLE: tuple[type[ControlPlaneError], ...] = (UnavailableError,)
"""Errors after which the same request may succeed later (429, 5xx, timeouts, no connection)."""


def status_details(body: Any) -> tuple[str, str]:
    """``(reason, message)`` of a Kubernetes ``Status`` body (bytes, text or decoded JSON);
    the raw text (shortened) as the message when it is not a Status."""
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return "", body.strip()[:500]
    if isinstance(body, dict):
        reason = body.get("reason")
        message = body.get("message")
        return (
            reason if isinstance(reason, str) else "",
            message if isinstance(message, str) else json.dumps(body)[:500],
        )
    return "", repr(body)[:500]


def error_for_status(
    status: int, body: Any, *, verb: str, resource: str, retry_after: str | None = None
) -> ControlPlaneError:
    """The controlplane error for an HTTP ``status`` answered to ``verb`` on ``resource``
    (``resource`` names the object for the message: ``leases/lock-a in namespace ns``)."""
    reason, message = status_details(body)
    what = f"{verb} {resource}"
    detail = f"{message} (HTTP {status}{', ' + reason if reason else ''})"
    if status in (401, 403):
        hint = (
            "the credentials were not accepted"
            if status == 401
            else f"grant the verb {verb!r} on this resource to the service account "
            "(see the Role in deploy/)"
        )
        return PermissionDeniedError(f"permission denied to {what}: {detail}; {hint}")
    if status == 404:
        return NotFoundError(f"cannot {what}: not found: {detail}")
    if status == 409:
        if reason == "AlreadyExists":
            return AlreadyExistsError(f"cannot {what}: it already exists: {detail}")
        return ConflictError(
            f"cannot {what}: it changed since it was read (stale resourceVersion): {detail}; "
            "re-read it and decide again"
        )
    if status == 410:
        return CompactedError(
            f"cannot {what}: the resourceVersion is too old (compacted): {detail}; "
            "list again and watch from the list's resourceVersion"
        )
    if status in (400, 422):
        return InvalidRequestError(f"the API server rejected the request to {what}: {detail}")
    if status == 504:
        return OperationTimeoutError(
            f"the API server timed out on {what}: {detail}; it may or may not have taken effect"
        )
    if status == 429 or status >= 500:
        later = f"; retry after {retry_after} s" if retry_after else "; retry later"
        return UnavailableError(f"the API server cannot {what} now: {detail}{later}")
    return ControlPlaneError(f"unexpected answer to {what}: {detail}")


def translate(exc: BaseException, *, verb: str, resource: str) -> ControlPlaneError:
    """A controlplane error for an exception raised while doing ``verb`` on ``resource``
    (errors of the hierarchy pass through unchanged)."""
    if isinstance(exc, ControlPlaneError):
        return exc
    if isinstance(exc, ApiException):
        headers: Any = exc.headers or {}
        return error_for_status(
            int(exc.status or 0),
            exc.body if exc.body else exc.reason,
            verb=verb,
            resource=resource,
            retry_after=headers.get("Retry-After"),
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):  # aiohttp's timeouts too
        return OperationTimeoutError(
            f"no answer from the API server in time to {verb} {resource}; "
            "it may or may not have taken effect"
        )
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UnavailableError(
            f"cannot reach the API server to {verb} {resource}: {type(exc).__name__}: {exc}"
        )
    return ControlPlaneError(f"failed to {verb} {resource}: {type(exc).__name__}: {exc}")


async def check_response(response: Any, *, verb: str, resource: str) -> None:
    """Raise the translated error when a raw (``_preload_content=False``) response is not a
    success; the response is closed then. A success is left open for the caller to read."""
    status = int(response.status)
    if 200 <= status <= 299:
        return
    try:
        body = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError):
        body = b""
    finally:
        response.close()
    raise error_for_status(
        status,
        body,
        verb=verb,
        resource=resource,
        retry_after=response.headers.get("Retry-After"),
    )


async def call_json(
    function: Callable[..., Awaitable[Any]],
    *args: Any,
    verb: str,
    resource: str,
    **kwargs: Any,
) -> dict[str, Any]:
    """Call a generated ``kubernetes_asyncio`` API method and return the decoded JSON body.

    The method is called with ``_preload_content=False`` (objects stay plain JSON, exactly as
    the API server sent them) and every failure is translated: the caller sees only
    controlplane errors.
    """
    kwargs["_preload_content"] = False
    try:
        response = await function(*args, **kwargs)
        await check_response(response, verb=verb, resource=resource)
        try:
            raw = await response.read()
        finally:
            response.close()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise translate(exc, verb=verb, resource=resource) from exc
    try:
        decoded = json.loads(raw)
    except ValueError as exc:
        raise UnavailableError(
            f"the API server answered {verb} {resource} with a body that is not JSON: {raw[:200]!r}"
        ) from exc
    if not isinstance(decoded, dict):
        raise UnavailableError(
            f"the API server answered {verb} {resource} with {type(decoded).__name__}, "
            "not an object"
        )
    return decoded
