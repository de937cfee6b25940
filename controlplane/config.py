"""Typed configuration: one frozen ``msgspec`` struct, read from YAML, environment and flags.

:func:`load_config` layers, lowest precedence first:

1. the defaults below;
2. a YAML file (``path``, else the file named by ``CONTROLPLANE_CONFIG`` if set);
3. environment variables: the short names ``CONTROL_PLANE_MODE``, ``NODE_ID``, ``CLUSTER_ID``,
   ``DATA_DIR``, ``RAFT_PEERS`` (``id=host:port,id=host:port``), ``RAFT_JOIN``
   (``host:port,host:port``; it also sets ``raft.bootstrap`` to false, as ``serve --join``
   does), ``RAFT_LISTEN``, ``CLIENT_LISTEN``, ``HTTP_LISTEN`` (``host:port``) and
   ``K8S_NAMESPACE``; then any field by
   its path, ``CONTROLPLANE__RAFT__ELECTION_TIMEOUT=2.0``, the value read as a YAML scalar (or
   taken verbatim for string fields). Empty variables are ignored;
4. explicit overrides (command-line flags), keyed by field path.

Every value is validated when the structs are built; a bad one raises
:class:`~controlplane.errors.InvalidConfigError` whose message starts with the field's path
(``raft.election_timeout: ...``) and, from :func:`load_config`, ends with where the value came
from.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeAlias

import msgspec
import msgspec.inspect as mi
import yaml

from .errors import InvalidConfigError

__all__ = [
    "SERVICE_ACCOUNT_TOKEN",
    "Config",
    "K8sConfig",
    "Mode",
    "Peer",
    "RaftConfig",
    "ResolvedMode",
    "TlsConfig",
    "load_config",
    "override_config",
    "parse_address",
    "resolve_mode",
]

Mode: TypeAlias = Literal["raft", "k8s", "memory", "auto"]
ResolvedMode: TypeAlias = Literal["raft", "k8s", "memory"]

SERVICE_ACCOUNT_TOKEN = "var/run/secrets/kubernetes.io/serviceaccount/token"
"""Where a pod's service-account token is mounted, relative to the file-system root."""

_MiB = 1 << 20
_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_LISTENERS = ("listen", "client", "http")


def parse_address(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:7400"`` for IPv6) into host and port.

    Raises :class:`~controlplane.errors.InvalidConfigError` (without a field path) when
    ``text`` is not of that form or the port is not an integer in 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address needs brackets
    if not sep or not host or not port.isdigit() or any(c.isspace() or c in "/[]" for c in host):
        raise InvalidConfigError(f"expected host:port, got {text!r}")
    if int(port) > 65535:
        raise InvalidConfigError(f"port must be in 0..65535, got {text!r}")
    return host, int(port)


def _fail(path: str, problem: str) -> NoReturn:
    raise InvalidConfigError(f"{path}: {problem}")


def _check_match(path: str, value: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(value):
        _fail(path, f"must be {what}, got {value!r}")


def _check_positive(path: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        _fail(path, f"must be greater than 0, got {value}")


def _check_min(path: str, value: int, low: int) -> None:
    if value < low:
        _fail(path, f"must be at least {low}, got {value}")


def _check_range(path: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        _fail(path, f"must be in {low}..{high}, got {value}")


def _check_nonempty(path: str, value: str | None) -> None:
    if value is not None and not value.strip():
        _fail(path, "must not be empty")


class TlsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Mutual TLS between Raft members and for the client API (PEM files)."""

    cert_file: str
    """This member's certificate (chain)."""
    key_file: str
    """Its private key."""
    ca_file: str
    """The CA bundle that peers' and clients' certificates must chain to."""

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file"):
            _check_nonempty(f"raft.tls.{name}", getattr(self, name))


class Peer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Raft member: its id and the ``host:port`` it listens on for peers.

    Validated as part of :class:`RaftConfig` (where its position in ``peers`` is known).
    """

    id: str
    address: str

    @property
    def host(self) -> str:
        """The host part of ``address``."""
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        """The port part of ``address``."""
        return parse_address(self.address)[1]


class RaftConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the raft backend (a member, or a client of the members)."""

    node_id: str = "cp-1"
    """This member's id: 1-63 letters, digits, ``.``, ``_`` or ``-``; stable across restarts."""
    cluster_id: str = "controlplane"
    """Exchanged in the peer handshake: members of different clusters refuse each other."""
    data_dir: str = "./controlplane-data"
    """Where the log, hard state and snapshots are kept."""
    listen_host: str = "127.0.0.1"
    listen_port: int = 7400
    """Address for peer (Raft) traffic. Port 0 picks a free port (tests)."""
    client_host: str = "127.0.0.1"
    client_port: int = 7401
    """Address of the control-plane API served to non-member processes."""
    http_host: str = "127.0.0.1"
    http_port: int = 7402
    """Address of ``/healthz``, ``/readyz``, ``/metrics`` and the state as JSON."""
    peers: tuple[Peer, ...] = ()
    """Every member of the initial cluster, this one included; empty: a single member.

    With ``bootstrap`` true, ``node_id`` must be one of them. A member listed here is always
    dialed at this address, whatever address the cluster's configuration records for it.
    """
    bootstrap: bool = True
    """Form a new cluster from ``peers`` when ``data_dir`` is empty. False: this member
    joins a running cluster, through ``join`` or by an operator's ``member add``."""
    join: tuple[str, ...] = ()
    """Client addresses (``host:port``) of members of a running cluster. A member whose data
    directory was never in a configuration asks their leader to add it (as a learner), waits
    until it has caught up and has itself promoted to voter; on later starts it skips that.

    Requires ``bootstrap`` false. The rule holds whatever the data directory holds (where
    neither setting would matter any more), so that a configuration does not turn invalid
    when a member's data directory is wiped.
    """
    join_timeout: float = 120.0
    """Seconds a joining member may take to become a voter (catching up included)."""
    advertise_address: str | None = None
    """``host:port`` where the other members reach this one's peer listener; None: the
    listen host and the bound port (required to join when ``listen_host`` is a wildcard)."""
    heartbeat_interval: float = 0.1
    """Seconds between the leader's heart-beats."""
    election_timeout: float = 1.0
    """Seconds without a leader before a follower campaigns (randomized up to twice this)."""
    campaign_on_leader_loss: bool = True
    """A follower that loses its connection to the leader (a leader process that crashed:
    its kernel closes its connections) campaigns within two heart-beats instead of after the
    election timeout. Members that still hear from a live leader refuse the vote, so a
    connection lost to a live leader disturbs nothing. False: wait for the timeout."""
    snapshot_entries: int = 10_000
    """Take a snapshot (and compact the log) after this many applied entries (each command
    of an entry that batches several counts), once those entries also hold at least
    ``snapshot_log_ratio`` times the last snapshot's bytes..."""
    snapshot_bytes: int = 64 * _MiB
    """... or once the log since the last snapshot is this big."""
    snapshot_log_ratio: float = 1.0
    """A snapshot costs in proportion to the state: a large state is snapshotted only once
    the log since the last snapshot is this many times that snapshot's size (so its cost per
    command stays flat, and a restart replays about one snapshot's worth of log); 0 counts
    entries only."""
    lazy_commit_delay: float = 0.002
    """Seconds the leader may hold back a new commit index from an up-to-date follower that
    nothing reads from (no watch, client stream, write or read waits on it): the next Append
    carries it, or after this delay a message with the commit index alone. Followers that
    something reads from are told at once. 0: tell every follower in the next loop iteration.
    At most ``heartbeat_interval`` (heart-beats carry the commit index anyway)."""
    fsync: bool = True
    """Sync the log before acknowledging. Turning it off loses acknowledged writes on a crash."""
    tls: TlsConfig | None = None
    """Mutual TLS for peer and client traffic; None: plain TCP."""
    max_frame_bytes: int = 16 * _MiB
    """Largest frame accepted from a peer or client; larger ones close the connection."""

    def __post_init__(self) -> None:
        _check_match("raft.node_id", self.node_id, _ID, "1-63 letters, digits, '.', '_' or '-'")
        _check_match(
            "raft.cluster_id", self.cluster_id, _ID, "1-63 letters, digits, '.', '_' or '-'"
        )
        _check_nonempty("raft.data_dir", self.data_dir)
        listeners = [
            (n, getattr(self, f"{n}_host"), getattr(self, f"{n}_port")) for n in _LISTENERS
        ]
        for i, (name, host, port) in enumerate(listeners):
            if any(c.isspace() or c == "/" for c in host):
                _fail(f"raft.{name}_host", f"must be a host name or IP address, got {host!r}")
            _check_range(f"raft.{name}_port", port, 0, 65535)
            for other, other_host, other_port in listeners[:i]:
                same_host = host == other_host or {host, other_host} & _WILDCARD_HOSTS
                if port and port == other_port and same_host:
                    _fail(f"raft.{name}_port", f"{port} is already raft.{other}_port")
        ids: dict[str, int] = {}
        addresses: dict[tuple[str, int], int] = {}
        for i, peer in enumerate(self.peers):
            where = f"raft.peers[{i}]"
            _check_match(f"{where}.id", peer.id, _ID, "1-63 letters, digits, '.', '_' or '-'")
            try:
                address = parse_address(peer.address)
            except InvalidConfigError as exc:
                _fail(f"{where}.address", exc.message)
            if peer.id in ids:
                _fail(f"{where}.id", f"{peer.id!r} is already raft.peers[{ids[peer.id]}].id")
            if address in addresses:
                _fail(f"{where}.address", f"already raft.peers[{addresses[address]}].address")
            ids[peer.id], addresses[address] = i, i
        if self.bootstrap and self.peers and self.node_id not in ids:
            _fail(
                "raft.node_id",
                f"{self.node_id!r} is not in raft.peers ({', '.join(ids)}): list every initial "
                "member, this one included, or set raft.bootstrap to false to join a cluster",
            )
        for i, member in enumerate(self.join):
            try:
                parse_address(member)
            except InvalidConfigError as exc:
                _fail(f"raft.join[{i}]", exc.message)
        if self.join and self.bootstrap:
            _fail(
                "raft.join",
                "a member either forms a new cluster (raft.bootstrap true) or joins a running "
                "one: set raft.bootstrap to false to join (serve --join does)",
            )
        if self.advertise_address is not None:
            try:
                _, port = parse_address(self.advertise_address)
            except InvalidConfigError as exc:
                _fail("raft.advertise_address", exc.message)
            if port == 0:
                _fail("raft.advertise_address", "the port must not be 0")
        elif self.join and self.listen_host in _WILDCARD_HOSTS:
            _fail(
                "raft.advertise_address",
                f"is required to join when raft.listen_host is {self.listen_host!r}: the other "
                "members cannot dial a wildcard address",
            )
        _check_positive("raft.join_timeout", self.join_timeout)
        _check_positive("raft.heartbeat_interval", self.heartbeat_interval)
        if not self.election_timeout > 3 * self.heartbeat_interval:
            _fail(
                "raft.election_timeout",
                "must be greater than 3 × raft.heartbeat_interval "  # noqa: RUF001
                f"({self.heartbeat_interval}), got {self.election_timeout}",
            )
        if not 0 <= self.lazy_commit_delay <= self.heartbeat_interval:  # also rejects NaN
            _fail(
                "raft.lazy_commit_delay",
                f"must be in 0..raft.heartbeat_interval ({self.heartbeat_interval}), "
                f"got {self.lazy_commit_delay}",
            )
        _check_min("raft.snapshot_entries", self.snapshot_entries, 1)
        _check_min("raft.snapshot_bytes", self.snapshot_bytes, 1)
        if not 0 <= self.snapshot_log_ratio <= 1_000:  # also rejects NaN
            _fail("raft.snapshot_log_ratio", f"must be in 0..1000, got {self.snapshot_log_ratio}")
        _check_range("raft.max_frame_bytes", self.max_frame_bytes, 64 * 1024, 2**31 - 1)


class K8sConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the k8s backend. Lease timing follows client-go's leader election."""

    namespace: str = "default"
    """Namespace of the control plane's custom resources and Leases."""
    kubeconfig: str | None = None
    """A kubeconfig file; None: in-cluster credentials, else ``$KUBECONFIG`` or ~/.kube/config."""
    context: str | None = None
    """A context of the kubeconfig; None: its current context."""
    lease_duration: float = 15.0
    """Seconds a standby waits, after the last renewal it saw, before taking leadership."""
    renew_deadline: float = 10.0
    """Seconds the leader keeps trying to renew before it gives up leadership."""
    retry_period: float = 2.0
    """Seconds between attempts to acquire or renew."""
    cluster_name: str = "controlplane"
    """Name of the singleton cluster resource (a DNS subdomain)."""
    field_manager: str = "controlplane"
    """Server-side apply field manager."""

    def __post_init__(self) -> None:
        _check_match("k8s.namespace", self.namespace, _DNS_LABEL, "a DNS label (RFC 1123)")
        _check_nonempty("k8s.kubeconfig", self.kubeconfig)
        _check_nonempty("k8s.context", self.context)
        for name in ("lease_duration", "renew_deadline", "retry_period"):
            _check_positive(f"k8s.{name}", getattr(self, name))
        if not self.renew_deadline < self.lease_duration:
            _fail(
                "k8s.renew_deadline",
                f"must be less than k8s.lease_duration ({self.lease_duration}), "
                f"got {self.renew_deadline}",
            )
        if not self.renew_deadline > 1.2 * self.retry_period:
            _fail(
                "k8s.renew_deadline",
                f"must be greater than 1.2 × k8s.retry_period ({self.retry_period}), "  # noqa: RUF001
                f"got {self.renew_deadline}",
            )
        if len(self.cluster_name) > 253:
            _fail("k8s.cluster_name", f"must be at most 253 characters, got {self.cluster_name!r}")
        _check_match(
            "k8s.cluster_name", self.cluster_name, _DNS_SUBDOMAIN, "a DNS subdomain (RFC 1123)"
        )
        _check_nonempty("k8s.field_manager", self.field_manager)
        if len(self.field_manager) > 128:
            _fail("k8s.field_manager", "must be at most 128 characters")


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration of a control-plane process."""

    mode: Mode = "auto"
    """``raft``, ``k8s``, ``memory`` (one process, nothing durable: tests), or ``auto``
    (``k8s`` inside a Kubernetes pod, else ``raft``; see :func:`resolve_mode`)."""
    raft: RaftConfig = RaftConfig()
    k8s: K8sConfig = K8sConfig()
    watch_retention: int = 10_000
    """Events kept for ``watch(since=...)``; older ones give ``CompactedError``. An event
    carrying the hash ring counts once more per 64 nodes in it."""
    log_level: str = "INFO"
    """A :mod:`logging` level name (any case; stored upper-case)."""
    gc_young_threshold: int = 7000
    """The garbage collector's young-generation threshold that ``controlplane serve`` sets in
    its process (Python's default is 700); 0 leaves Python's. A write's objects live until it
    commits: with thousands in flight, the default collects them young again and again and
    promotes them, and older generations are then collected often. Library use (a backend in
    an application's process) never changes the collector."""

    def __post_init__(self) -> None:
        _check_min("watch_retention", self.watch_retention, 1)
        _check_min("gc_young_threshold", self.gc_young_threshold, 0)
        level = self.log_level.upper()
        if level not in logging.getLevelNamesMapping():
            names = ", ".join(sorted(logging.getLevelNamesMapping()))
            _fail("log_level", f"must be one of {names}, got {self.log_level!r}")
        msgspec.structs.force_setattr(self, "log_level", level)


# --- loading ---------------------------------------------------------------------------------

_Path: TypeAlias = tuple[str | int, ...]

_ENV_FIELDS: dict[str, _Path] = {
    "CONTROL_PLANE_MODE": ("mode",),
    "NODE_ID": ("raft", "node_id"),
    "CLUSTER_ID": ("raft", "cluster_id"),
    "DATA_DIR": ("raft", "data_dir"),
    "K8S_NAMESPACE": ("k8s", "namespace"),
}
_ENV_LISTENERS = {"RAFT_LISTEN": "listen", "CLIENT_LISTEN": "client", "HTTP_LISTEN": "http"}
_ENV_PREFIX = "CONTROLPLANE__"
_CONFIG_ENV = "CONTROLPLANE_CONFIG"
_TYPE = mi.type_info(Config)


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from a YAML file, the environment and explicit overrides.

    ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment. ``overrides``
    are keyed by field path (``"raft.node_id"``, or ``"raft__node_id"`` as keyword
    arguments allow) or nest mappings (``{"raft": {"node_id": ...}}``); None values are
    skipped, so parsed command-line flags can be passed as they are.

    Raises :class:`~controlplane.errors.InvalidConfigError` naming the field and the source of
    the bad value (or the file, if it is missing or not valid YAML).
    """
    environ = os.environ if env is None else env
    data: dict[str, Any] = {}
    sources: dict[_Path, str] = {}
    if path is None and environ.get(_CONFIG_ENV):
        path = environ[_CONFIG_ENV]
    if path is not None:
        _merge(data, _read_yaml(path), (), sources, f"file {os.fspath(path)}")
    for field, value, source in _from_env(environ):
        _merge_at(data, field, value, sources, source)
    _apply_overrides(data, overrides or {}, sources)
    return _convert(data, sources)


def override_config(config: Config, overrides: Mapping[str, Any]) -> Config:
    """``config`` with ``overrides`` (as for :func:`load_config`) applied, validated again."""
    if not overrides:
        return config
    data = msgspec.to_builtins(config)
    sources: dict[_Path, str] = {}
    _apply_overrides(data, overrides, sources)
    return _convert(data, sources)


def resolve_mode(
    config: Config, env: Mapping[str, str] | None = None, fs_root: str | os.PathLike[str] = "/"
) -> ResolvedMode:
    """The mode to run: ``config.mode``, with ``auto`` resolved.

    ``auto`` is ``k8s`` inside a Kubernetes pod -- ``KUBERNETES_SERVICE_HOST`` is set and a
    service-account token is mounted (at ``fs_root`` / :data:`SERVICE_ACCOUNT_TOKEN`) -- or
    outside one when ``k8s.kubeconfig`` names a kubeconfig; ``raft`` otherwise (a kubeconfig
    merely present in ``~/.kube`` does not turn the embedded default into a k8s client).
    """
    if config.mode != "auto":
        return config.mode
    environ = os.environ if env is None else env
    in_pod = bool(environ.get("KUBERNETES_SERVICE_HOST"))
    if in_pod and (Path(fs_root) / SERVICE_ACCOUNT_TOKEN).is_file():
        return "k8s"
    if config.k8s.kubeconfig is not None:
        return "k8s"
    return "raft"


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidConfigError(f"configuration file {name} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(f"cannot read configuration file {name}: {exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidConfigError(
            f"configuration file {name} is not valid YAML{where}: {problem}"
        ) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InvalidConfigError(
            f"configuration file {name}: expected a mapping of settings at the top level, "
            f"got {type(loaded).__name__}"
        )
    return loaded


def _from_env(environ: Mapping[str, str]) -> Iterator[tuple[_Path, Any, str]]:
    for var, field in _ENV_FIELDS.items():
        if value := environ.get(var, ""):
            yield field, value, f"environment variable {var}"
    for var, name in _ENV_LISTENERS.items():
        if value := environ.get(var, ""):
            source = f"environment variable {var}"
            host, sep, port = value.rpartition(":")
            if not sep or not host:
                raise InvalidConfigError(
                    f"raft.{name}_host: expected host:port, got {value!r} (from {source})"
                )
            yield ("raft", f"{name}_host"), host.removeprefix("[").removesuffix("]"), source
            yield ("raft", f"{name}_port"), port, source
    if value := environ.get("RAFT_PEERS", ""):
        source = "environment variable RAFT_PEERS"
        peers = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            peer_id, sep, address = item.partition("=")
            if not sep:
                raise InvalidConfigError(
                    f"raft.peers: expected id=host:port, got {item!r} (from {source})"
                )
            peers.append({"id": peer_id.strip(), "address": address.strip()})
        yield ("raft", "peers"), peers, source
    if value := environ.get("RAFT_JOIN", ""):
        source = "environment variable RAFT_JOIN"
        yield ("raft", "join"), [a for a in (p.strip() for p in value.split(",")) if a], source
        yield ("raft", "bootstrap"), False, source
    for var in sorted(environ):
        if var.startswith(_ENV_PREFIX) and environ[var]:
            source = f"environment variable {var}"
            names = tuple(var[len(_ENV_PREFIX) :].lower().split("__"))
            leaf = _field_type(names, source)
            yield names, _parse_env_value(environ[var], leaf, source), source


def _field_type(field: tuple[str, ...], source: str) -> mi.Type:
    """The type of the field at ``field``; an error naming ``source`` if there is none."""
    struct: mi.Type = _TYPE
    for depth, name in enumerate(field):
        struct = _struct_of(struct)
        if not isinstance(struct, mi.StructType):
            _unknown(".".join(field[:depth]), "is not a section with fields", source)
        names = {f.name: f for f in struct.fields}
        if name not in names:
            _unknown(".".join(field[: depth + 1]), _no_such_field(name, names), source)
        struct = names[name].type
    return struct


def _unknown(path: str, problem: str, source: str) -> NoReturn:
    raise InvalidConfigError(f"{path}: {problem} (from {source})")


def _struct_of(t: mi.Type) -> mi.Type:
    if isinstance(t, mi.UnionType):
        for member in t.types:
            if isinstance(member, mi.StructType):
                return member
    return t


def _is_text(t: mi.Type) -> bool:
    if isinstance(t, mi.UnionType):
        return any(_is_text(member) for member in t.types)
    return isinstance(t, mi.StrType) or (
        isinstance(t, mi.LiteralType) and all(isinstance(v, str) for v in t.values)
    )


def _parse_env_value(value: str, leaf: mi.Type, source: str) -> Any:
    if _is_text(leaf):
        # Verbatim: NODE_ID=1 is the string "1". Only an optional field's null is special.
        nullable = isinstance(leaf, mi.UnionType) and any(
            isinstance(m, mi.NoneType) for m in leaf.types
        )
        return None if nullable and value in ("null", "~") else value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise InvalidConfigError(f"{source}: not a valid YAML value: {value!r}") from exc


def _apply_overrides(
    data: dict[str, Any], overrides: Mapping[str, Any], sources: dict[_Path, str]
) -> None:
    for key, value in overrides.items():
        if value is None:
            continue
        plain = msgspec.to_builtins(value) if isinstance(value, msgspec.Struct) else value
        for field, leaf in _leaves(tuple(re.split(r"\.|__", key)), plain):
            _merge_at(data, field, leaf, sources, f"override {_format_path(list(field))}")


def _leaves(prefix: _Path, value: Any) -> Iterator[tuple[_Path, Any]]:
    if isinstance(value, Mapping) and value:
        for key, child in value.items():
            yield from _leaves((*prefix, key), child)
    else:
        yield prefix, value


def _merge_at(
    data: dict[Any, Any], field: _Path, value: Any, sources: dict[_Path, str], source: str
) -> None:
    """Set ``field`` of ``data`` to ``value`` (deep-merged if both are mappings)."""
    dst = data
    for key in field[:-1]:
        child = dst.get(key)
        if not isinstance(child, dict):
            child = dst[key] = {}
        dst = child
    _merge(dst, {field[-1]: value}, field[:-1], sources, source)


def _merge(
    dst: dict[Any, Any],
    src: Mapping[Any, Any],
    prefix: _Path,
    sources: dict[_Path, str],
    source: str,
) -> None:
    """Deep-merge ``src`` into ``dst`` (found at ``prefix``); record ``source`` per leaf set."""
    for key, value in src.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            if not isinstance(dst.get(key), dict):
                dst[key] = {}
            _merge(dst[key], value, path, sources, source)
        else:
            dst[key] = value
            sources[path] = source


_AT = re.compile(r"^(?P<detail>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_PATH_PART = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")
_FIELD_REF = re.compile(r"\b(?:raft|k8s)\.[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)*")


def _convert(data: dict[str, Any], sources: Mapping[_Path, str]) -> Config:
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _translate(exc, sources) from None


def _translate(exc: msgspec.ValidationError, sources: Mapping[_Path, str]) -> InvalidConfigError:
    match = _AT.match(str(exc))
    detail, at = (match["detail"], match["path"] or "") if match else (str(exc), "")
    path = list(_parse_path(at))
    source: str | None = None
    cause = exc.__cause__
    if isinstance(cause, InvalidConfigError):  # from a __post_init__: already "path: detail"
        field, _, detail = cause.message.partition(": ")
        path = list(_parse_path(field))
    elif m := re.fullmatch(r"Object contains unknown field `(.*)`", detail):
        names = _field_names(path)
        path.append(m[1])
        detail = _no_such_field(m[1], names)
    elif m := re.fullmatch(r"Object missing required field `(.*)`", detail):
        # Name whoever wrote the section that lacks it.
        source = next((s for p, s in sources.items() if p[: len(path)] == tuple(path)), None)
        path.append(m[1])
        detail = "is required"
    elif detail.startswith("Invalid enum value"):
        values = _literal_values(path)
        got = detail.removeprefix("Invalid enum value ")
        detail = f"must be one of {', '.join(values)}, got {got}"
    else:
        detail = detail[:1].lower() + detail[1:]
    name = _format_path(path)
    source = source or _source_of(tuple(path), sources)
    if detail.startswith("expected `str`, got") and (source or "").startswith("file "):
        detail += " (quote the value in YAML)"
    if source is None:
        # A cross-field rule failed: say where the other fields it names came from.
        others = [
            f"{ref} from {src}"
            for ref in dict.fromkeys(_FIELD_REF.findall(detail))
            if (src := _source_of(_parse_path(ref), sources)) is not None
        ]
        suffix = f" ({'; '.join(others)})" if others else ""
    else:
        suffix = f" (from {source})"
    return InvalidConfigError(f"{name}: {detail}{suffix}")


def _parse_path(text: str) -> _Path:
    """``raft.peers[1].address`` (or msgspec's ``.raft.peers[1].address``) as a tuple."""
    return tuple(name or int(index) for name, index in _PATH_PART.findall("." + text))


def _format_path(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.removeprefix(".") or "(top level)"


def _source_of(path: _Path, sources: Mapping[_Path, str]) -> str | None:
    """Where the value at ``path`` (or the list holding it) was set; None: a default."""
    for end in range(len(path), 0, -1):
        if (source := sources.get(path[:end])) is not None:
            return source
    return None


def _type_at(path: list[str | int]) -> mi.Type | None:
    t: mi.Type = _TYPE
    for part in path:
        t = _struct_of(t)
        if isinstance(part, int):
            if not isinstance(t, (mi.ListType, mi.VarTupleType)):
                return None
            t = t.item_type
        else:
            if not isinstance(t, mi.StructType):
                return None
            fields = {f.name: f.type for f in t.fields}
            if part not in fields:
                return None
            t = fields[part]
    return _struct_of(t)


def _field_names(path: list[str | int]) -> Mapping[str, object]:
    t = _type_at(path)
    return {f.name: f for f in t.fields} if isinstance(t, mi.StructType) else {}


def _literal_values(path: list[str | int]) -> list[str]:
    t = _type_at(path)
    return [str(v) for v in t.values] if isinstance(t, mi.LiteralType) else []


def _no_such_field(name: str, fields: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(fields), n=1)
    if close:
        return f"unknown field (did you mean {close[0]}?)"
    return f"unknown field (valid: {', '.join(fields)})"
