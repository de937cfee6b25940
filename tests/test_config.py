"""Tests of controlplane.config: defaults, sources and their precedence, validation messages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import (
    SERVICE_ACCOUNT_TOKEN,
    Config,
    K8sConfig,
    Peer,
    RaftConfig,
    TlsConfig,
    load_config,
    override_config,
    parse_address,
    resolve_mode,
)
from controlplane.errors import InvalidConfigError

X = "\N{MULTIPLICATION SIGN}"

FULL_YAML = """
mode: raft
watch_retention: 500
log_level: debug
raft:
  node_id: m2
  cluster_id: search-prod
  data_dir: /var/lib/cp
  listen_host: 0.0.0.0
  listen_port: 9400
  client_host: 0.0.0.0
  client_port: 9401
  http_host: 0.0.0.0
  http_port: 9402
  peers:
    - {id: m1, address: "10.0.0.1:9400"}
    - {id: m2, address: "10.0.0.2:9400"}
    - {id: m3, address: "[fd00::3]:9400"}
  bootstrap: false
  heartbeat_interval: 0.05
  election_timeout: 0.5
  snapshot_entries: 1000
  snapshot_bytes: 1048576
  fsync: false
  tls: {cert_file: /tls/tls.crt, key_file: /tls/tls.key, ca_file: /tls/ca.crt}
  max_frame_bytes: 1048576
k8s:
  namespace: search
  kubeconfig: /home/me/.kube/config
  context: kind-kind
  lease_duration: 30
  renew_deadline: 20
  retry_period: 4
  cluster_name: search.example.com
  field_manager: search-operator
"""


def write(tmp_path: Path, text: str, name: str = "controlplane.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(**kwargs: Any) -> str:
    with pytest.raises(InvalidConfigError) as info:
        load_config(**{"env": {}, **kwargs})
    return str(info.value)


# --- defaults and sources ------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.mode == "auto"
    assert config.watch_retention == 10_000
    assert config.log_level == "INFO"
    assert config.gc_young_threshold == 7000
    raft = config.raft
    assert (raft.node_id, raft.cluster_id, raft.data_dir) == (
        "cp-1",
        "controlplane",
        "./controlplane-data",
    )
    assert (raft.listen_host, raft.listen_port) == ("127.0.0.1", 7400)
    assert (raft.client_host, raft.client_port) == ("127.0.0.1", 7401)
    assert (raft.http_host, raft.http_port) == ("127.0.0.1", 7402)
    assert raft.peers == ()
    assert raft.bootstrap and raft.fsync and raft.tls is None
    assert (raft.heartbeat_interval, raft.election_timeout) == (0.1, 1.0)
    assert raft.campaign_on_leader_loss
    assert (raft.snapshot_entries, raft.snapshot_bytes) == (10_000, 64 << 20)
    assert raft.snapshot_log_ratio == 1.0
    assert raft.lazy_commit_delay == 0.002
    assert raft.max_frame_bytes == 16 << 20
    assert config.k8s == K8sConfig(
        namespace="default",
        kubeconfig=None,
        context=None,
        lease_duration=15.0,
        renew_deadline=10.0,
        retry_period=2.0,
        cluster_name="controlplane",
        field_manager="controlplane",
    )


def test_yaml_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_YAML), env={})
    assert config.mode == "raft"
    assert config.watch_retention == 500
    assert config.log_level == "DEBUG"
    assert config.raft == RaftConfig(
        node_id="m2",
        cluster_id="search-prod",
        data_dir="/var/lib/cp",
        listen_host="0.0.0.0",
        listen_port=9400,
        client_host="0.0.0.0",
        client_port=9401,
        http_host="0.0.0.0",
        http_port=9402,
        peers=(
            Peer(id="m1", address="10.0.0.1:9400"),
            Peer(id="m2", address="10.0.0.2:9400"),
            Peer(id="m3", address="[fd00::3]:9400"),
        ),
        bootstrap=False,
        heartbeat_interval=0.05,
        election_timeout=0.5,
        snapshot_entries=1000,
        snapshot_bytes=1 << 20,
        fsync=False,
        tls=TlsConfig(cert_file="/tls/tls.crt", key_file="/tls/tls.key", ca_file="/tls/ca.crt"),
        max_frame_bytes=1 << 20,
    )
    assert config.raft.peers[2].host == "fd00::3"
    assert config.raft.peers[2].port == 9400
    assert config.k8s.cluster_name == "search.example.com"
    assert config.k8s.lease_duration == 30.0


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_yaml_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text), env={}) == Config()


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "mode: memory\n")
    assert load_config(env={"CONTROLPLANE_CONFIG": str(path)}).mode == "memory"


def test_named_environment_variables() -> None:
    config = load_config(
        env={
            "CONTROL_PLANE_MODE": "k8s",
            "NODE_ID": "7",
            "CLUSTER_ID": "c2",
            "DATA_DIR": "/data",
            "RAFT_PEERS": " 7=h1:7400, 8=h2:7400 ,9=[::1]:7400,",
            "RAFT_LISTEN": "0.0.0.0:7500",
            "CLIENT_LISTEN": "[::]:7501",
            "HTTP_LISTEN": "localhost:0",
            "K8S_NAMESPACE": "cp-system",
        }
    )
    assert config.mode == "k8s"
    raft = config.raft
    assert (raft.node_id, raft.cluster_id, raft.data_dir) == ("7", "c2", "/data")
    assert raft.peers == (
        Peer(id="7", address="h1:7400"),
        Peer(id="8", address="h2:7400"),
        Peer(id="9", address="[::1]:7400"),
    )
    assert (raft.listen_host, raft.listen_port) == ("0.0.0.0", 7500)
    assert (raft.client_host, raft.client_port) == ("::", 7501)
    assert (raft.http_host, raft.http_port) == ("localhost", 0)
    assert config.k8s.namespace == "cp-system"


def test_generic_environment_variables() -> None:
    config = load_config(
        env={
            "CONTROLPLANE__RAFT__ELECTION_TIMEOUT": "2.0",
            "CONTROLPLANE__RAFT__FSYNC": "false",
            "CONTROLPLANE__RAFT__NODE_ID": "007",  # a string field takes the text verbatim
            "CONTROLPLANE__RAFT__PEERS": "[{id: '007', address: 'a:1'}]",
            "CONTROLPLANE__RAFT__TLS__CERT_FILE": "c",
            "CONTROLPLANE__RAFT__TLS__KEY_FILE": "k",
            "CONTROLPLANE__RAFT__TLS__CA_FILE": "null",  # verbatim too: not optional
            "CONTROLPLANE__K8S__KUBECONFIG": "~",  # optional: YAML's null
            "CONTROLPLANE__WATCH_RETENTION": "42",
            "CONTROLPLANE__MODE": "memory",
        }
    )
    assert config.raft.election_timeout == 2.0
    assert config.raft.fsync is False
    assert config.raft.node_id == "007"
    assert config.raft.peers == (Peer(id="007", address="a:1"),)
    assert config.raft.tls == TlsConfig(cert_file="c", key_file="k", ca_file="null")
    assert config.k8s.kubeconfig is None
    assert (config.watch_retention, config.mode) == (42, "memory")


def test_joining_from_the_file_the_environment_and_the_command_line(tmp_path: Path) -> None:
    from controlplane.cli import _overrides, _parser  # noqa: PLC0415 (the serve flags)

    default = RaftConfig()
    assert (default.join, default.join_timeout, default.advertise_address) == ((), 120.0, None)
    path = write(
        tmp_path,
        "raft:\n  bootstrap: false\n  join: ['a:7401', 'b:7401']\n  join_timeout: 30\n"
        "  advertise_address: 'me.example:7400'\n  listen_host: 0.0.0.0\n",
    )
    raft = load_config(path, env={}).raft
    assert (raft.bootstrap, raft.join, raft.join_timeout) == (False, ("a:7401", "b:7401"), 30.0)
    assert raft.advertise_address == "me.example:7400"
    # RAFT_JOIN, like --join, also turns bootstrapping off.
    raft = load_config(env={"RAFT_JOIN": " a:7401, [::1]:7411 ,"}).raft
    assert (raft.bootstrap, raft.join) == (False, ("a:7401", "[::1]:7411"))
    assert error_of(env={"RAFT_JOIN": "a:1", "CONTROLPLANE__RAFT__BOOTSTRAP": "true"}) == (
        "raft.join: a member either forms a new cluster (raft.bootstrap true) or joins a "
        "running one: set raft.bootstrap to false to join (serve --join does) "
        "(from environment variable RAFT_JOIN)"
    )

    def serve(*args: str) -> RaftConfig:
        flags = _parser().parse_args(["serve", *args])
        return load_config(env={}, overrides=_overrides(flags)).raft

    raft = serve("--join", "a:7401,b:7401", "--advertise", "10.0.0.4:7400")
    assert (raft.bootstrap, raft.join) == (False, ("a:7401", "b:7401"))
    assert raft.advertise_address == "10.0.0.4:7400"
    raft = serve("--join")  # no addresses: wait for an operator's "member add"
    assert (raft.bootstrap, raft.join) == (False, ())
    raft = serve()
    assert (raft.bootstrap, raft.join) == (True, ())
    with pytest.raises(InvalidConfigError, match=r"^raft\.join\[1\]: expected host:port"):
        serve("--join", "a:1,b")


def test_empty_environment_variables_are_ignored() -> None:
    env = {"NODE_ID": "", "RAFT_PEERS": "", "RAFT_LISTEN": "", "CONTROLPLANE__RAFT__FSYNC": ""}
    assert load_config(env=env) == Config()


def test_precedence_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "raft: {node_id: from-file, cluster_id: file, data_dir: /file}\n")
    env = {
        "NODE_ID": "from-env",
        "CLUSTER_ID": "named-env",
        "CONTROLPLANE__RAFT__CLUSTER_ID": "generic-env",  # the generic form wins
    }
    config = load_config(path, env=env, overrides={"raft.node_id": "from-flag"})
    assert config.raft.node_id == "from-flag"
    assert config.raft.cluster_id == "generic-env"
    assert config.raft.data_dir == "/file"
    assert load_config(path, env=env).raft.node_id == "from-env"


def test_override_forms() -> None:
    tls = TlsConfig(cert_file="c", key_file="k", ca_file="a")
    config = load_config(
        env={},
        overrides={
            "mode": "memory",
            "raft__listen_port": 0,
            "raft.client_port": "0",  # flags arrive as text
            "k8s": {"namespace": "ns", "context": "ctx"},
            "raft.tls": tls,
            "raft.node_id": None,  # a flag that was not given
        },
    )
    assert config.mode == "memory"
    assert (config.raft.listen_port, config.raft.client_port) == (0, 0)
    assert (config.k8s.namespace, config.k8s.context) == ("ns", "ctx")
    assert config.raft.tls == tls
    assert config.raft.node_id == "cp-1"


def test_override_config() -> None:
    base = Config(mode="memory", raft=RaftConfig(node_id="a"))
    assert override_config(base, {}) is base
    changed = override_config(base, {"raft.data_dir": "/d", "watch_retention": 7})
    assert changed == Config(
        mode="memory", raft=RaftConfig(node_id="a", data_dir="/d"), watch_retention=7
    )
    with pytest.raises(InvalidConfigError, match=r"^watch_retention: .*override watch_retention"):
        override_config(base, {"watch_retention": 0})


def test_log_level_is_case_insensitive() -> None:
    assert Config(log_level="warning").log_level == "WARNING"


# --- validation ------------------------------------------------------------------------------


def test_the_documented_example_message() -> None:
    with pytest.raises(InvalidConfigError) as info:
        RaftConfig(election_timeout=0.2)
    assert str(info.value) == (
        f"raft.election_timeout: must be greater than 3 {X} raft.heartbeat_interval (0.1), got 0.2"
    )


INVALID: list[tuple[dict[str, Any], str, str]] = [
    # (overrides, field path, what the message says)
    ({"mode": "paxos"}, "mode", "must be one of auto, k8s, memory, raft, got 'paxos'"),
    ({"watch_retention": 0}, "watch_retention", "must be at least 1, got 0"),
    ({"gc_young_threshold": -1}, "gc_young_threshold", "must be at least 0, got -1"),
    ({"log_level": "loud"}, "log_level", "must be one of"),
    ({"raft.node_id": ""}, "raft.node_id", "must be 1-63 letters"),
    ({"raft.node_id": "a b"}, "raft.node_id", "must be 1-63 letters"),
    ({"raft.node_id": "x" * 64}, "raft.node_id", "must be 1-63 letters"),
    ({"raft.cluster_id": "-c"}, "raft.cluster_id", "must be 1-63 letters"),
    ({"raft.data_dir": " "}, "raft.data_dir", "must not be empty"),
    ({"raft.listen_host": "a b"}, "raft.listen_host", "must be a host name or IP address"),
    ({"raft.listen_port": 65536}, "raft.listen_port", "must be in 0..65535, got 65536"),
    ({"raft.client_port": -1}, "raft.client_port", "must be in 0..65535, got -1"),
    ({"raft.http_port": 7400}, "raft.http_port", "7400 is already raft.listen_port"),
    (
        {"raft.client_port": 7400, "raft.client_host": "0.0.0.0"},
        "raft.client_port",
        "7400 is already raft.listen_port",
    ),
    ({"raft.peers": [{"id": "cp-1", "address": "h"}]}, "raft.peers[0].address", "host:port"),
    (
        {"raft.peers": [{"id": "cp-1", "address": "h:70000"}]},
        "raft.peers[0].address",
        "port must be in 0..65535",
    ),
    (
        {"raft.peers": [{"id": "cp-1", "address": "::1:7400"}]},
        "raft.peers[0].address",
        "expected host:port",
    ),
    ({"raft.peers": [{"id": "a/b", "address": "h:1"}]}, "raft.peers[0].id", "must be 1-63"),
    (
        {"raft.peers": [{"id": "cp-1", "address": "h:1"}, {"id": "cp-1", "address": "h:2"}]},
        "raft.peers[1].id",
        "'cp-1' is already raft.peers[0].id",
    ),
    (
        {"raft.peers": [{"id": "cp-1", "address": "h:1"}, {"id": "cp-2", "address": "h:1"}]},
        "raft.peers[1].address",
        "already raft.peers[0].address",
    ),
    (
        {"raft.peers": [{"id": "cp-2", "address": "h:1"}]},
        "raft.node_id",
        "'cp-1' is not in raft.peers (cp-2)",
    ),
    ({"raft.peers": [{"id": "cp-1"}]}, "raft.peers[0].address", "is required"),
    ({"raft.heartbeat_interval": 0}, "raft.heartbeat_interval", "must be greater than 0"),
    ({"raft.heartbeat_interval": "nan"}, "raft.heartbeat_interval", "must be greater than 0"),
    ({"raft.election_timeout": 0.3}, "raft.election_timeout", f"3 {X} raft.heartbeat_interval"),
    ({"raft.lazy_commit_delay": -1}, "raft.lazy_commit_delay", "must be in 0..raft.heartbeat"),
    ({"raft.lazy_commit_delay": 0.2}, "raft.lazy_commit_delay", "(0.1), got 0.2"),
    ({"raft.snapshot_entries": 0}, "raft.snapshot_entries", "must be at least 1, got 0"),
    ({"raft.snapshot_bytes": 0}, "raft.snapshot_bytes", "must be at least 1, got 0"),
    ({"raft.snapshot_log_ratio": -0.5}, "raft.snapshot_log_ratio", "must be in 0..1000"),
    ({"raft.snapshot_log_ratio": float("nan")}, "raft.snapshot_log_ratio", "must be in 0..1000"),
    ({"raft.max_frame_bytes": 1000}, "raft.max_frame_bytes", "must be in 65536..2147483647"),
    ({"raft.fsync": "maybe"}, "raft.fsync", "expected `bool`, got `str`"),
    ({"raft.tls.cert_file": "c"}, "raft.tls.key_file", "is required"),
    (
        {"raft.tls": {"cert_file": "c", "key_file": "k", "ca_file": ""}},
        "raft.tls.ca_file",
        "must not be empty",
    ),
    ({"k8s.namespace": "Default"}, "k8s.namespace", "must be a DNS label"),
    ({"k8s.kubeconfig": ""}, "k8s.kubeconfig", "must not be empty"),
    ({"k8s.context": " "}, "k8s.context", "must not be empty"),
    ({"k8s.lease_duration": -1}, "k8s.lease_duration", "must be greater than 0"),
    ({"k8s.retry_period": 0}, "k8s.retry_period", "must be greater than 0"),
    ({"k8s.renew_deadline": 15}, "k8s.renew_deadline", "less than k8s.lease_duration (15.0)"),
    ({"k8s.retry_period": 9}, "k8s.renew_deadline", f"greater than 1.2 {X} k8s.retry_period (9.0)"),
    ({"k8s.cluster_name": "Not_Valid"}, "k8s.cluster_name", "must be a DNS subdomain"),
    ({"k8s.cluster_name": "a" * 254}, "k8s.cluster_name", "at most 253 characters"),
    ({"k8s.field_manager": "x" * 129}, "k8s.field_manager", "at most 128 characters"),
    ({"raft.bogus": 1}, "raft.bogus", "unknown field"),
    ({"raft.join": ["h"], "raft.bootstrap": False}, "raft.join[0]", "expected host:port"),
    ({"raft.join": ["h:1"]}, "raft.join", "set raft.bootstrap to false to join"),
    ({"raft.join_timeout": 0}, "raft.join_timeout", "must be greater than 0"),
    ({"raft.advertise_address": "h"}, "raft.advertise_address", "expected host:port"),
    ({"raft.advertise_address": "h:0"}, "raft.advertise_address", "must not be 0"),
    (
        {"raft.join": ["h:1"], "raft.bootstrap": False, "raft.listen_host": "0.0.0.0"},
        "raft.advertise_address",
        "is required to join when raft.listen_host is '0.0.0.0'",
    ),
]


@pytest.mark.parametrize(("overrides", "field", "says"), INVALID)
def test_every_validation_error_names_its_field(
    overrides: dict[str, Any], field: str, says: str
) -> None:
    message = error_of(overrides=overrides)
    assert message.startswith(f"{field}: "), message
    assert says in message
    assert "from override " in message  # the source, or that of the field it relates to


def test_cross_field_error_names_where_the_other_field_was_set() -> None:
    message = error_of(env={"CONTROLPLANE__RAFT__HEARTBEAT_INTERVAL": "0.5"})
    assert message == (
        f"raft.election_timeout: must be greater than 3 {X} raft.heartbeat_interval (0.5), got 1.0"
        " (raft.heartbeat_interval from environment variable"
        " CONTROLPLANE__RAFT__HEARTBEAT_INTERVAL)"
    )


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "raft:\n  election_timeout: 0.2\n")
    assert error_of(path=path) == (
        f"raft.election_timeout: must be greater than 3 {X} raft.heartbeat_interval (0.1), got 0.2"
        f" (from file {path})"
    )
    path = write(tmp_path, "raft:\n  node_id: 12\n")
    assert error_of(path=path) == (
        f"raft.node_id: expected `str`, got `int` (quote the value in YAML) (from file {path})"
    )
    path = write(tmp_path, "raft:\n  peers:\n    - {id: cp-1, address: 'x:1'}\n    - {id: b}\n")
    assert error_of(path=path) == f"raft.peers[1].address: is required (from file {path})"


def test_errors_name_the_environment_variable() -> None:
    assert error_of(env={"RAFT_LISTEN": "0.0.0.0"}) == (
        "raft.listen_host: expected host:port, got '0.0.0.0' "
        "(from environment variable RAFT_LISTEN)"
    )
    assert error_of(env={"HTTP_LISTEN": "h:x"}) == (
        "raft.http_port: expected `int`, got `str` (from environment variable HTTP_LISTEN)"
    )
    assert error_of(env={"RAFT_PEERS": "cp-1=h:1,cp-2"}) == (
        "raft.peers: expected id=host:port, got 'cp-2' (from environment variable RAFT_PEERS)"
    )
    assert error_of(env={"CONTROL_PLANE_MODE": "raf"}) == (
        "mode: must be one of auto, k8s, memory, raft, got 'raf' "
        "(from environment variable CONTROL_PLANE_MODE)"
    )
    assert error_of(env={"CONTROLPLANE__RAFT__SNAPSHOT_ENTRIES": "[1"}).startswith(
        "environment variable CONTROLPLANE__RAFT__SNAPSHOT_ENTRIES: not a valid YAML value"
    )


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({"overrides": {"bogus": 1}}, "bogus: unknown field (valid: mode, raft, k8s, "),
        ({"overrides": {"raft.electon_timeout": 1}}, "raft.electon_timeout: unknown field "),
        ({"env": {"CONTROLPLANE__RAFT__HEARTBEAT": "1"}}, "raft.heartbeat: unknown field "),
        ({"env": {"CONTROLPLANE__K8S__NAMESPACE__X": "1"}}, "k8s.namespace: is not a section"),
        ({"env": {"CONTROLPLANE__RAFT__TLS__PEM": "1"}}, "raft.tls.pem: unknown field (valid"),
    ],
)
def test_unknown_keys_are_errors(where: dict[str, Any], message: str) -> None:
    assert error_of(**where).startswith(message)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "raft:\n  hearbeat_interval: 0.2\n")
    assert error_of(path=path) == (
        f"raft.hearbeat_interval: unknown field (did you mean heartbeat_interval?) "
        f"(from file {path})"
    )
    path = write(tmp_path, "mode: raft\nsnapshots: 3\n")
    assert error_of(path=path).startswith("snapshots: unknown field (valid: mode, raft, ")


def test_bad_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "raft:\n  node_id: [cp-1\n")
    message = error_of(path=path)
    assert re.match(
        rf"configuration file {re.escape(str(path))} is not valid YAML at line \d+", message
    )
    path = write(tmp_path, "- mode: raft\n")
    assert error_of(path=path) == (
        f"configuration file {path}: expected a mapping of settings at the top level, got list"
    )
    path = write(tmp_path, "raft: 3\n")
    assert error_of(path=path).startswith("raft: expected `object`, got `int`")


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert error_of(path=missing) == f"configuration file {missing} does not exist"
    assert error_of(path=tmp_path).startswith(f"cannot read configuration file {tmp_path}")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert error_of(path=binary).startswith(f"cannot read configuration file {binary}")


def test_parse_address() -> None:
    assert parse_address("h:1") == ("h", 1)
    assert parse_address("10.0.0.1:7400") == ("10.0.0.1", 7400)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ["h", ":1", "h:", "h:x", "::1:80", "h:-1", "a b:1", "h:65536"]:
        with pytest.raises(InvalidConfigError):
            parse_address(bad)


# --- mode resolution -------------------------------------------------------------------------


def _pod_root(tmp_path: Path) -> Path:
    token = tmp_path / SERVICE_ACCOUNT_TOKEN
    token.parent.mkdir(parents=True)
    token.write_text("token")
    return tmp_path


@pytest.mark.parametrize("mode", ["raft", "k8s", "memory"])
def test_explicit_mode_is_kept(tmp_path: Path, mode: Any) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert resolve_mode(Config(mode=mode), env=env, fs_root=_pod_root(tmp_path)) == mode


def test_auto_inside_a_pod_is_k8s(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert resolve_mode(Config(), env=env, fs_root=_pod_root(tmp_path)) == "k8s"


@pytest.mark.parametrize("host", [None, ""])
def test_auto_without_the_service_host_is_raft(tmp_path: Path, host: str | None) -> None:
    env = {} if host is None else {"KUBERNETES_SERVICE_HOST": host}
    assert resolve_mode(Config(), env=env, fs_root=_pod_root(tmp_path)) == "raft"


def test_auto_without_a_token_is_raft(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert resolve_mode(Config(), env=env, fs_root=tmp_path) == "raft"
