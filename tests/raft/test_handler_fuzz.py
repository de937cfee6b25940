"""Fuzzing of the Raft message handlers (hypothesis).

Raft trusts its peers, so a fuzzed message must be one a correct peer could send at some point:
a stale one (an older term, any content), or a response of the current term that a network
could duplicate, delay or reorder (any index the leader holds, any hint). Whatever arrives, the
core must not raise, must keep every safety property (the simulation's checker runs after each
step), and the cluster must still commit new entries afterwards.
"""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.backends.raft.core import Role
from controlplane.backends.raft.messages import (
    Append,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from controlplane.backends.raft.node import PeerMessage
from controlplane.backends.raft.records import Entry

from .sim import Cluster

MEMBERS = ("a", "b", "c")
_PEER_DECODER = msgspec.msgpack.Decoder(PeerMessage)


def _cluster() -> Cluster:
    cluster = Cluster(MEMBERS)
    cluster.campaign("a")
    for i in range(5):
        cluster.propose("a", b"x%d" % i)
    return cluster


small = st.integers(min_value=0, max_value=12)


@st.composite
def stale_messages(draw: st.DrawFn, term: int) -> Message:
    """Any message of an older term, with any content."""
    old = draw(st.integers(min_value=0, max_value=max(0, term - 1)))
    src, dst = draw(st.sampled_from(MEMBERS)), draw(st.sampled_from(MEMBERS))
    entries = tuple(
        Entry(index=i, term=draw(st.integers(0, old)), data=b"stale")
        for i in range(draw(small), draw(small))
    )
    options: list[Message] = [
        VoteRequest(old, src, dst, draw(small), draw(small), draw(st.booleans())),
        VoteResponse(old, src, dst, draw(st.booleans()), draw(st.booleans())),
        Append(old, src, dst, draw(small), draw(small), draw(small), entries),
        AppendResponse(old, src, dst, draw(small), draw(st.booleans()), draw(small), draw(small)),
        Heartbeat(old, src, dst, draw(small), draw(small)),
        HeartbeatResponse(old, src, dst, draw(small)),
        TimeoutNow(old, src, dst),
        ReadIndexRequest(old, src, dst, b"r"),
        ReadIndexResponse(old, src, dst, b"r", draw(small)),
    ]
    return draw(st.sampled_from(options))


@st.composite
def replayed_responses(draw: st.DrawFn, term: int, leader: str, last: int) -> Message:
    """Responses of the current term to the leader, as a network may replay or reorder them."""
    src = draw(st.sampled_from([m for m in MEMBERS if m != leader]))
    index = draw(st.integers(min_value=0, max_value=last))
    options: list[Message] = [
        AppendResponse(
            term, src, leader, index, draw(st.booleans()), draw(st.integers(0, last)), term
        ),
        HeartbeatResponse(term, src, leader, draw(small)),
        VoteResponse(term, src, leader, draw(st.booleans()), False),
        ReadIndexRequest(term, src, leader, b"fuzz"),
    ]
    return draw(st.sampled_from(options))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stale_and_replayed_messages_keep_raft_safe_and_live(data: st.DataObject) -> None:
    cluster = _cluster()
    leader = cluster.leader()
    assert leader == "a"
    term = cluster.core(leader).term
    last = cluster.core(leader).log.last_index()
    fuzz = st.one_of(stale_messages(term), replayed_responses(term, leader, last))
    for msg in data.draw(st.lists(fuzz, max_size=30), label="messages"):
        node = cluster.nodes[msg.dst]
        node.deliver(msg, None)  # the checker asserts every safety property after each step
        cluster.settle()
    cluster.tick(n=30)  # a leader may have stepped down: let the cluster elect again
    new_leader = cluster.leader()
    assert new_leader is not None, "no leader after the fuzzed messages"
    assert cluster.core(new_leader).role is Role.LEADER
    before = {m: len(cluster.data(m)) for m in MEMBERS}
    cluster.propose(new_leader, b"after-fuzz")
    cluster.tick(n=3)
    for member in MEMBERS:
        assert cluster.data(member)[-1:] == [b"after-fuzz"], f"{member} did not apply it"
        assert len(cluster.data(member)) == max(before.values()) + 1


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=256))
def test_arbitrary_bytes_decode_to_a_peer_message_or_a_decode_error(payload: bytes) -> None:
    try:
        msg = _PEER_DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    assert isinstance(msg, msgspec.Struct)
