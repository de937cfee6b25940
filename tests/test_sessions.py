"""Client sessions: a retried request is applied at most once (Raft dissertation, 6.3)."""

from __future__ import annotations

import msgspec
import pytest

from controlplane.codec import decode_state, encode_state
from controlplane.commands import (
    AcquireLock,
    ClientCommand,
    CreateIndex,
    SetClusterConfig,
    SetFeatureFlag,
)
from controlplane.errors import AlreadyExistsError, ConflictError, InvalidRequestError
from controlplane.state import StateMachine
from controlplane.types import ClusterConfig, EventKind, Index, Lock

T0 = 1_700_000_000.0


def client(
    seq: int, command: object, *, ack: int = 0, time: float = T0, cid: str = "c1"
) -> ClientCommand:
    return ClientCommand(client_id=cid, seq=seq, command=command, ack=ack, time=time)  # type: ignore[arg-type]


def test_a_retried_request_returns_the_recorded_result_and_applies_nothing() -> None:
    sm = StateMachine()
    first = sm.apply(client(1, CreateIndex(name="logs")))
    assert first.error is None and first.events[0].kind is EventKind.INDEX_CREATED
    index = msgspec.msgpack.decode(first.value.value, type=Index)
    assert index.name == "logs"
    again = sm.apply(client(1, CreateIndex(name="logs")))
    assert again.error is None, "a retry must not fail with already-exists"
    assert again.events == () and again.version == first.version
    assert again.value == first.value


def test_a_new_request_is_applied_normally() -> None:
    sm = StateMachine()
    sm.apply(client(1, CreateIndex(name="logs")))
    second = sm.apply(client(2, CreateIndex(name="logs")))
    assert isinstance(second.error, AlreadyExistsError)


def test_lock_retry_returns_the_same_token() -> None:
    sm = StateMachine()
    first = sm.apply(client(1, AcquireLock(key="k", holder="h", ttl=10)))
    again = sm.apply(client(1, AcquireLock(key="k", holder="h", ttl=10)))
    lock_a = msgspec.msgpack.decode(first.value.value, type=Lock)
    lock_b = msgspec.msgpack.decode(again.value.value, type=Lock)
    assert lock_a == lock_b


def test_acknowledged_results_are_dropped_and_their_retries_refused() -> None:
    sm = StateMachine()
    sm.apply(client(1, SetFeatureFlag(name="a", enabled=True)))
    sm.apply(client(2, SetFeatureFlag(name="b", enabled=True), ack=1))
    session = sm.state.sessions["c1"]
    assert session.acked == 1 and set(session.results) == {2}
    late = sm.apply(client(1, SetFeatureFlag(name="a", enabled=False)))
    assert isinstance(late.error, ConflictError)
    assert sm.state.feature_flags["a"] is True


def test_failed_and_no_op_requests_record_nothing() -> None:
    sm = StateMachine()
    sm.apply(client(1, SetFeatureFlag(name="a", enabled=True)))
    version = sm.state.version
    noop = sm.apply(client(2, SetFeatureFlag(name="a", enabled=True)))
    assert noop.error is None and noop.version == version
    failed = sm.apply(client(3, SetClusterConfig(config=ClusterConfig(), expected_version=99)))
    assert isinstance(failed.error, ConflictError)
    assert set(sm.state.sessions["c1"].results) == {1}


def test_sessions_expire_after_their_ttl() -> None:
    sm = StateMachine()
    sm.apply(client(1, SetFeatureFlag(name="a", enabled=True), cid="old"))
    ttl = sm.state.config.session_ttl
    sm.apply(client(1, SetFeatureFlag(name="b", enabled=True), cid="new", time=T0 + ttl + 1))
    assert "old" not in sm.state.sessions and "new" in sm.state.sessions


def test_sessions_survive_a_snapshot_and_restored_machines_agree() -> None:
    sm = StateMachine()
    sm.apply(client(1, CreateIndex(name="logs")))
    restored = StateMachine(decode_state(encode_state(sm.state)))
    assert restored.state == sm.state
    retry = client(1, CreateIndex(name="logs"))
    assert restored.apply(retry) == sm.apply(retry)


@pytest.mark.parametrize(
    ("seq", "ack", "inner"),
    [
        (0, 0, SetFeatureFlag(name="a", enabled=True)),
        (2, 2, SetFeatureFlag(name="a", enabled=True)),
        (1, 0, SetFeatureFlag(name="Bad Name", enabled=True)),
    ],
)
def test_invalid_client_commands_are_refused(seq: int, ack: int, inner: object) -> None:
    sm = StateMachine()
    out = sm.apply(client(seq, inner, ack=ack))
    assert isinstance(out.error, InvalidRequestError)
    assert sm.state.version == 0


def test_a_session_written_to_again_is_kept_and_the_expiry_heap_stays_small() -> None:
    sm = StateMachine()
    ttl = sm.state.config.session_ttl
    for seq in range(1, 1001):  # one session, many writes, acknowledged as it goes
        sm.apply(client(seq, SetFeatureFlag(name="a", enabled=seq % 2 == 0), ack=seq - 1))
    assert len(sm._session_expiry) == 1  # one entry per session, not one per write
    late = T0 + ttl + 5
    sm.apply(client(1001, SetFeatureFlag(name="b", enabled=True), ack=1000, time=late))
    # c1's first write is older than the ttl, its latest is not: it stays.
    sm.apply(client(1, SetFeatureFlag(name="c", enabled=True), cid="other", time=late + 1))
    assert set(sm.state.sessions) == {"c1", "other"}
    assert sm.state.sessions["c1"].last_seen == late


def test_expiry_drops_the_same_sessions_on_a_restored_replica_as_on_the_log() -> None:
    """Sessions expire in (last_seen, client_id) order, 64 per command, whatever the heap's
    history: a replica restored from a snapshot stays equal to the one that applied the log."""
    sm = StateMachine()
    ttl = sm.state.config.session_ttl
    for i in range(150):
        cid = f"c{i:03d}"
        sm.apply(client(1, SetFeatureFlag(name="a", enabled=i % 2 == 0), cid=cid, time=T0 + i))
        if i % 3 == 0:  # seen again later: must outlive the others
            sm.apply(
                client(2, SetFeatureFlag(name="b", enabled=i % 2 == 0), cid=cid, time=T0 + 200 + i)
            )
    restored = StateMachine(decode_state(encode_state(sm.state)))
    assert restored.state == sm.state
    for step in range(4):
        cmd = client(
            1,
            SetFeatureFlag(name="z", enabled=step % 2 == 0),
            cid=f"late{step}",
            time=T0 + ttl + 160 + step * 30,
        )
        assert restored.apply(cmd) == sm.apply(cmd)
        assert restored.state == sm.state
    assert sm.state.sessions != {}
