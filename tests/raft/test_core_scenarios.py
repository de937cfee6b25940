"""Scenario tests for the Raft core, in the spirit of etcd's raft tests and the MIT 6.824 labs.

Each test drives whole clusters of cores through :class:`Cluster` (synchronous delivery, no
clock); the cluster's :class:`Checker` asserts Raft's safety properties after every step, so
every scenario is also a safety test. "§" references are to the Raft paper (Ongaro and
Ousterhout, "In Search of an Understandable Consensus Algorithm", 2014); "thesis §" to
Ongaro's dissertation ("Consensus: Bridging Theory and Practice", 2014).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from controlplane.backends.raft.core import (
    ConfChangeInProgress,
    ConfChangeType,
    CoreConfig,
    InvalidRequest,
    LeadershipTransferInProgress,
    LearnerNotCaughtUp,
    NotLeader,
    RaftCore,
    Role,
    UncommittedLimitExceeded,
    encode_conf_state,
)
from controlplane.backends.raft.memstorage import MemoryStorage
from controlplane.backends.raft.messages import (
    Append,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
    decode,
    encode,
)
from controlplane.backends.raft.records import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    SnapshotMeta,
)

from .sim import Cluster, InvariantViolation, SimParams, Simulation

ABC = ("a", "b", "c")
FIVE = ("a", "b", "c", "d", "e")


def log_of(c: Cluster, member: str) -> list[tuple[int, int]]:
    """(index, term) of every entry the member's log holds."""
    log = c.core(member).log
    return [(i, log.term(i)) for i in range(log.first_index(), log.last_index() + 1)]


def elect(c: Cluster, member: str) -> None:
    c.campaign(member)
    assert c.leader() == member


def committed_everywhere(c: Cluster, index: int, members: tuple[str, ...] = ()) -> bool:
    return all(c.nodes[m].applied >= index for m in members or tuple(c.nodes))


# -- elections (§5.2) ------------------------------------------------------------------------------


def test_initial_election() -> None:
    # §5.2: members start as followers; one times out, wins a majority and stays leader.
    c = Cluster(ABC)
    c.run_until(lambda: c.leader() is not None, 40)
    leader = c.leader()
    assert leader is not None
    term = c.core(leader).term
    assert all(c.core(m).lead == leader and c.core(m).term == term for m in ABC)
    c.tick(n=100)  # no failures: no new election
    assert c.leader() == leader and c.core(leader).term == term


def test_reelection_after_leader_failure() -> None:
    # §5.2: a follower that stops hearing from the leader starts an election.
    c = Cluster(ABC)
    elect(c, "a")
    c.crash("a")
    c.run_until(lambda: c.leader() in ("b", "c"), 60)
    new = c.leader()
    assert new is not None
    term = c.core(new).term
    assert term > 1
    # The old leader rejoins as a follower without disturbing the new one.
    c.restart("a")
    c.tick(n=30)
    assert c.leader() == new and c.core(new).term == term and c.core("a").lead == new
    # Without a majority no leader can be elected.
    c.crash(new)
    c.crash("a")
    c.tick(n=60)
    assert c.leader() is None


def test_many_elections_under_churn() -> None:
    # §5.2 (6.824's "multiple elections"): repeatedly cut random members off; whenever a
    # majority is connected a leader emerges, and never two in one term (the checker).
    rng = random.Random(7)
    members = ("a", "b", "c", "d", "e", "f", "g")
    c = Cluster(members, seed=7)

    def following(group: list[str]) -> int:
        leader = c.leader()
        return sum(c.core(m).lead == leader for m in group) if leader in group else 0

    for _ in range(15):
        c.heal()
        leader = c.leader()
        others = [m for m in members if m != leader]
        isolated = rng.sample(others, 3 if leader is None else 2) + ([leader] if leader else [])
        for m in isolated:
            c.isolate(m)
        connected = [m for m in members if m not in isolated]
        c.run_until(lambda: following(connected) >= 4, 100)  # noqa: B023
    c.heal()
    c.run_until(lambda: c.leader() is not None and c.core(c.leader() or "a").lead is not None)
    assert len(c.checker.leaders) >= 10


def test_leader_lease_ignores_disruptive_votes() -> None:
    # Thesis §4.2.3: members that heard from a live leader within the election timeout
    # ignore vote requests, unless they are part of a leadership transfer.
    c = Cluster(ABC)
    elect(c, "a")
    b = c.core("b")
    b.step(VoteRequest(9, "c", "b", last_index=100, last_term=9))
    assert b.term == 1 and b.lead == "a" and not b.has_ready()
    b.step(VoteRequest(9, "c", "b", last_index=100, last_term=9, transfer=True))
    assert b.term == 9 and b.vote == "c"


# -- replication (§5.3) ----------------------------------------------------------------------------


def test_basic_agreement() -> None:
    # §5.3: each proposal is committed at the next index on every member, in order.
    c = Cluster(ABC)
    elect(c, "a")
    for n in range(1, 4):
        index = c.propose("a", b"cmd%d" % n)
        assert index == n + 1  # index 1 is the leader's no-op (§8)
        assert all(c.nodes[m].applied >= index for m in ABC)
    assert all(c.data(m) == [b"cmd1", b"cmd2", b"cmd3"] for m in ABC)


def test_agreement_despite_follower_failure() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.propose("a", b"x")
    c.crash("c")
    index = c.propose("a", b"y")  # a majority (a, b) is enough
    assert c.nodes["a"].applied >= index and c.nodes["b"].applied >= index
    c.restart("c")
    c.tick(n=3)
    assert c.data("c") == [b"x", b"y"]


def test_no_agreement_without_majority() -> None:
    c = Cluster(FIVE)
    elect(c, "a")
    for m in ("c", "d", "e"):
        c.isolate(m)
    index = c.propose("a", b"x")
    c.tick(["a", "b"], n=5)  # less than an election timeout: a is still leader
    assert c.core("a").role is Role.LEADER
    assert c.core("a").log.committed < index and c.nodes["a"].applied < index
    c.heal()
    c.tick(n=2)
    assert committed_everywhere(c, index)


def test_concurrent_proposals_are_batched() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    leader = c.core("a")
    before = c.count(Append, src="a", dst="b")
    indexes = [leader.propose(b"p%d" % n) for n in range(100)]
    c.settle()
    assert indexes == list(range(2, 102))
    assert all(c.data(m) == [b"p%d" % n for n in range(100)] for m in ABC)
    # 100 proposals made between two Readys travel in one Append (plus one carrying the
    # new commit index).
    assert c.count(Append, src="a", dst="b") - before <= 2


def test_rejoin_of_partitioned_leader() -> None:
    # §5.4.1 / 6.824 "rejoin": a deposed leader's uncommitted entries are overwritten.
    c = Cluster(ABC)
    elect(c, "a")
    c.propose("a", b"committed")
    c.isolate("a")
    stale = c.core("a").propose(b"lost")
    c.run_until(lambda: c.core("b").role is Role.LEADER or c.core("c").role is Role.LEADER)
    new = "b" if c.core("b").role is Role.LEADER else "c"
    c.propose(new, b"new")
    assert c.core(new).log.term(stale) > 1  # the deposed leader's index holds something else
    c.heal()
    c.tick(n=3)
    assert c.core("a").role is Role.FOLLOWER and c.core("a").lead == new
    assert log_of(c, "a") == log_of(c, new)
    assert all(c.data(m) == [b"committed", b"new"] for m in ABC)


def test_fast_backup_over_long_divergent_log() -> None:
    # §5.3 (end): a rejection carries the follower's conflict hint, so the leader skips a
    # whole divergent term per round trip instead of one entry.
    a_log = [1] + [4] * 200
    c = Cluster(
        ("a", "b", "c", "d"),
        logs={
            "a": a_log,
            "b": [1] + [2] * 100 + [3] * 100,  # divergent, two terms deep
            "c": a_log,
            "d": [1],  # far behind
        },
        config=CoreConfig(max_size_per_msg=64 << 10),
    )
    elect(c, "a")
    assert c.core("a").term == 5
    for member in ("b", "c", "d"):
        assert log_of(c, member) == log_of(c, "a")
    rejections = c.count(AppendResponse, src="b", where=lambda m: m.reject)
    assert 1 <= rejections <= 2
    assert c.count(AppendResponse, src="d", where=lambda m: m.reject) <= 2
    assert c.count(Append, src="a", dst="b") <= 5


def test_duplicated_and_reordered_appends_never_truncate() -> None:
    # §5.3: "If an existing entry conflicts with a new one (same index but different
    # terms), delete the existing entry and all that follow it" - and only then.
    storage = MemoryStorage(ConfState(("a", "b")))
    core = RaftCore("b", storage, CoreConfig(), random.Random(0))

    def ents(lo: int, hi: int, term: int = 1) -> tuple[Entry, ...]:
        return tuple(Entry(i, term, EntryType.NORMAL, b"%d" % i) for i in range(lo, hi))

    def append(prev: int, entries: tuple[Entry, ...], commit: int = 0) -> AppendResponse:
        prev_term = 1 if prev else 0
        core.step(Append(1, "a", "b", prev, prev_term, commit, entries))
        msg = core.msgs[-1]
        assert isinstance(msg, AppendResponse)
        return msg

    assert append(0, ents(1, 6)).index == 5
    assert append(0, ents(1, 4)).index == 3  # stale duplicate: acknowledged, nothing dropped
    assert append(2, ents(3, 5)).index == 4  # reordered older append
    assert core.log.last_index() == 5
    assert append(5, (), commit=3).index == 5
    assert core.log.committed == 3
    # A stale append from before the commit point is answered with the commit index.
    assert append(0, ents(1, 2)).index == 3
    assert core.log.last_index() == 5
    # A real conflict (term 2 at index 4) truncates from there.
    core.step(Append(2, "a", "b", 3, 1, 3, (Entry(4, 2, EntryType.NORMAL, b"new"),)))
    assert core.log.last_index() == 4 and core.log.term(4) == 2


def test_figure8_old_term_entries_are_not_committed_by_counting() -> None:
    # §5.4.2, Figure 8: a leader must not count replicas of an entry from an earlier term.
    # s1 leads term 4 and brings index 2 (term 2) to a majority, but not its term-4 entry.
    members = ("s1", "s2", "s3", "s4", "s5")
    logs = {"s1": [1, 2], "s2": [1], "s3": [1], "s4": [1], "s5": [1, 3]}
    config = CoreConfig(max_size_per_msg=1, check_quorum=False)
    c = Cluster(members, logs=logs, terms=dict.fromkeys(members, 3), config=config)
    c.isolate("s4")
    c.isolate("s5")

    def no_term4_once_caught_up(m: Message) -> bool:
        if isinstance(m, Append) and any(e.term == 4 for e in m.entries):
            return c.core(m.dst).log.last_index() < 2  # let probes fail, drop the rest
        return True

    c.hook = no_term4_once_caught_up
    elect(c, "s1")
    assert c.core("s1").term == 4
    assert [c.core(m).log.last_index() for m in ("s1", "s2", "s3")] == [3, 2, 2]
    assert c.core("s1").log.committed < 2  # on a majority, but from term 2
    # s1 crashes; s5 (whose last term, 3, beats 2) can win and overwrite index 2, which is
    # safe only because nobody considered it committed (the checker would object).
    c.crash("s1")
    c.heal()
    while c.leader() != "s5":
        c.campaign("s5")
    c.propose("s5", b"after")
    assert all(c.core(m).log.term(2) == 3 for m in ("s2", "s3", "s4", "s5"))
    c.restart("s1")
    c.tick(n=3)
    assert log_of(c, "s1") == log_of(c, "s5")


def test_figure8_committed_once_current_term_entry_is_replicated() -> None:
    # Figure 8 (e): once s1's term-4 entry is on a majority, both are committed and s5 can
    # no longer win an election.
    members = ("s1", "s2", "s3", "s4", "s5")
    logs = {"s1": [1, 2], "s2": [1], "s3": [1], "s4": [1], "s5": [1, 3]}
    c = Cluster(members, logs=logs, terms=dict.fromkeys(members, 3))
    c.isolate("s4")
    c.isolate("s5")
    elect(c, "s1")
    assert c.core("s1").log.committed == 3
    c.crash("s1")
    c.heal()
    for _ in range(3):
        c.tick(["s4", "s5"], n=12)
        c.campaign("s5")
        assert c.core("s5").role is not Role.LEADER
    c.run_until(lambda: c.leader() is not None)
    assert c.leader() in ("s2", "s3")
    assert c.core(c.leader() or "").log.term(2) == 2


@pytest.mark.parametrize("seed", range(40))
def test_figure8_unreliable(seed: int) -> None:
    # 6.824's "Figure 8 (unreliable)" with a nemesis: over a lossy, reordering network that
    # is especially bad at delivering entries of the leader's own term, leaders crash right
    # after winning and while an older-term entry sits on a majority without one of their
    # own - the moments where committing by counting old entries would lose data (§5.4.2).
    rng = random.Random(seed)
    config = CoreConfig(max_size_per_msg=1, max_inflight_msgs=2, check_quorum=False)
    c = Cluster(FIVE, config=config, seed=seed)
    c.unreliable = rng

    def lossy(m: Message) -> bool:
        if isinstance(m, Append) and any(e.term == m.term for e in m.entries):
            return rng.random() < 0.5
        return rng.random() > 0.1

    c.hook = lossy
    terms_seen: set[int] = set()
    for n in range(200):
        leader = c.leader()
        if leader is not None:
            c.core(leader).propose(b"f%d" % n)
        c.tick()
        leader = c.leader()
        if leader is not None:
            core = c.core(leader)
            fresh = core.term not in terms_seen
            terms_seen.add(core.term)
            quorum_index = core.tracker.committed_index()
            window = quorum_index >= 1 and core.log.term(quorum_index) != core.term
            chance = 0.3 if fresh else 0.5 if window else 0.1
            if rng.random() < chance:
                c.crash(leader)
        down = [m for m in FIVE if not c.nodes[m].up]
        if down and (len(down) > 2 or rng.random() < 0.2):
            c.restart(rng.choice(down))
    for m in FIVE:
        if not c.nodes[m].up:
            c.restart(m)
    c.hook = None
    c.unreliable = None
    c.run_until(lambda: c.leader() is not None, 200)
    index = c.propose(c.leader() or "", b"final")
    c.run_until(lambda: committed_everywhere(c, index), 50)
    assert len({tuple(c.data(m)) for m in FIVE}) == 1


# -- persistence -----------------------------------------------------------------------------------


def test_persistence_across_full_cluster_restart() -> None:
    # §5.1 / Figure 2: term, vote and log are durable; a full restart loses nothing committed.
    c = Cluster(ABC)
    elect(c, "a")
    for n in range(5):
        c.propose("a", b"v%d" % n)
    terms = {m: c.core(m).term for m in ABC}
    for m in ABC:
        c.crash(m)
    for m in ABC:
        c.restart(m)
        assert c.core(m).term == terms[m]
        assert c.data(m) == []  # the state machine is rebuilt by replaying the log
    c.run_until(lambda: c.leader() is not None)
    index = c.propose(c.leader() or "", b"after")
    expected = [b"v%d" % n for n in range(5)] + [b"after"]
    c.run_until(lambda: committed_everywhere(c, index))
    assert all(c.data(m) == expected for m in ABC)


def test_vote_is_durable_before_it_is_sent() -> None:
    # Figure 2 ("persistent state ... updated on stable storage before responding"): a
    # voter that crashes before its Ready is synced never sent the vote; one that crashes
    # after remembers it and does not vote twice in the term.
    c = Cluster(ABC, config=CoreConfig(pre_vote=False))
    b = c.nodes["b"]
    c.core("b").step(VoteRequest(1, "a", "b", 0, 0))
    rd = b.take_ready()
    assert rd is not None and any(isinstance(m, VoteResponse) for m in rd.messages)
    b.crash()  # before sync: the vote is lost, and so is the response
    b.start()
    assert b.must_core().vote is None and b.storage.hard_state().vote is None
    c.core("b").step(VoteRequest(1, "a", "b", 0, 0))
    c.settle()
    c.crash("b")
    c.restart("b")
    assert c.core("b").vote == "a"
    c.core("b").step(VoteRequest(1, "c", "b", 0, 0))
    reply = c.core("b").msgs[-1]
    assert isinstance(reply, VoteResponse) and not reply.granted


def test_torn_write_on_restart() -> None:
    # The hard state may survive a crash that tore the entries it refers to: commit and
    # apply never go past the last durable entry.
    storage = MemoryStorage(ConfState(("a",)))
    storage.append([Entry(1, 1), Entry(2, 1, EntryType.NORMAL, b"x")])
    storage.set_hard_state(HardState(term=1, vote="a", commit=5))
    storage.sync()
    core = RaftCore("a", storage, CoreConfig(), random.Random(0))
    assert core.log.committed == 2
    rd = core.ready()
    assert [e.index for e in rd.committed_entries] == [1, 2]


def test_committed_entries_are_durable_locally() -> None:
    # The Ready contract: entries are handed out for applying only once persisted here.
    c = Cluster(ABC)
    elect(c, "a")
    b = c.nodes["b"]
    b.deliver(Append(1, "a", "b", 1, 1, 2, (Entry(2, 1, EntryType.NORMAL, b"x"),)), None)
    rd = b.take_ready()
    assert rd is not None and [e.index for e in rd.entries] == [2]
    assert rd.committed_entries == []
    assert rd.hard_state is not None and rd.hard_state.commit == 2
    b.finish_ready()
    rd = b.take_ready()
    assert rd is not None and [e.index for e in rd.committed_entries] == [2]


def test_stepping_while_a_ready_is_being_persisted() -> None:
    # A driver may keep stepping the core while it syncs a Ready in a thread. If a newer
    # leader truncates entries of that Ready meanwhile, advancing it must not mark the
    # replacement entries durable: they come again in the next Ready.
    storage = MemoryStorage(ConfState(("a", "b", "c")))
    core = RaftCore("b", storage, CoreConfig(), random.Random(0))
    old = tuple(Entry(i, 1, EntryType.NORMAL, b"old%d" % i) for i in (1, 2, 3))
    core.step(Append(1, "a", "b", 0, 0, 0, old))
    rd = core.ready()
    assert rd.entries == list(old)
    new = (Entry(2, 2, EntryType.NORMAL, b"new2"), Entry(3, 2, EntryType.NORMAL, b"new3"))
    core.step(Append(2, "c", "b", 1, 1, 2, new))  # conflicts at 2, commits 2
    storage.append(rd.entries)
    if rd.hard_state is not None:
        storage.set_hard_state(rd.hard_state)
    storage.sync()
    core.advance(rd)
    assert core.log.persisted == 0 and core.log.last_index() == 3
    rd = core.ready()
    assert rd.entries == list(new) and rd.committed_entries == []
    storage.append(rd.entries)
    storage.sync()
    core.advance(rd)
    assert core.log.persisted == 3
    assert [e.data for e in core.ready().committed_entries] == [b"old1", b"new2"]
    with pytest.raises(RuntimeError):
        core.ready()  # one Ready at a time


# -- the leader persists in parallel with its followers (thesis §10.2.1) ---------------------------


def test_leader_sends_entries_before_persisting_them() -> None:
    # A settled leader's Appends are early messages: they go out while its own write is in
    # flight. Followers still persist before they acknowledge (their replies are late).
    c = Cluster(ABC)
    elect(c, "a")
    c.hold("a")
    index = c.propose("a", b"x")
    a = c.nodes["a"]
    assert a.pending is not None and [e.index for e in a.pending.entries] == [index]
    assert not any(isinstance(m, Append) and m.entries for m in a.pending.messages)
    for member in ("b", "c"):
        assert c.nodes[member].storage.last_index() == index  # durable on the followers
    assert a.storage.last_index() < index and c.core("a").log.persisted < index
    b = c.nodes["b"]
    b.deliver(Append(c.core("a").term, "a", "b", index, 1, index, ()), None)
    rd = b.take_ready()
    assert rd is not None and rd.early_messages == []
    assert any(isinstance(m, AppendResponse) for m in rd.messages)
    b.finish_ready()
    c.release("a")
    assert committed_everywhere(c, index)


def test_leaders_unpersisted_entry_is_not_counted_towards_commit() -> None:
    # Three voters: the leader plus one follower form a quorum, but only once the leader's
    # own write is durable. Until then it needs the other follower's acknowledgement.
    c = Cluster(ABC)
    elect(c, "a")
    c.cut("a", "c")
    c.hold("a")
    index = c.propose("a", b"x")
    core = c.core("a")
    assert core.tracker.progress["b"].match == index  # b acknowledged
    assert core.tracker.progress["a"].match < index
    assert core.log.committed < index  # a's own copy is not durable: no quorum yet
    c.release("a")  # the persistence acknowledgement
    assert core.tracker.progress["a"].match == index and core.log.committed == index
    c.heal()
    c.tick()
    assert committed_everywhere(c, index)


def test_followers_commit_without_the_leaders_own_copy() -> None:
    # Both followers acknowledged: committed without the leader's vote; the leader applies it
    # only once its own copy is durable (committed entries are durable locally).
    c = Cluster(ABC)
    elect(c, "a")
    c.hold("a")
    index = c.propose("a", b"x")
    core = c.core("a")
    assert core.log.committed == index and core.tracker.progress["a"].match < index
    assert c.nodes["a"].applied < index
    c.release("a")
    assert c.nodes["a"].applied == index and c.data("a")[-1] == b"x"


def test_leader_crash_loses_sent_entries_the_followers_committed() -> None:
    # The new risk: the leader sends an entry, the followers persist it, the leader crashes
    # before its own write is durable. The entry is committed (a quorum holds it), so the
    # next leader has it and the old leader gets it back.
    c = Cluster(ABC)
    elect(c, "a")
    c.hold("a")
    index = c.propose("a", b"x")
    assert c.core("a").log.committed == index
    c.crash("a")  # unsynced: lost here
    c.held.clear()
    assert c.nodes["a"].storage.last_index() < index
    c.run_until(lambda: c.leader() in ("b", "c"), 100)
    c.restart("a")
    c.run_until(lambda: committed_everywhere(c, index + 1), 100)
    assert all(b"x" in c.data(m) for m in ABC)


def test_leader_crash_loses_sent_entries_only_one_follower_holds() -> None:
    # Sent to one follower only, then the leader crashes unsynced: never committed (the leader
    # did not count itself), so either outcome is allowed and the checker sees no violation.
    c = Cluster(ABC)
    elect(c, "a")
    c.cut("a", "c")
    c.hold("a")
    index = c.propose("a", b"x")
    assert c.core("a").log.committed < index
    c.crash("a")
    c.held.clear()
    c.heal()
    c.run_until(lambda: c.leader() in ("b", "c"), 100)
    leader = c.leader()
    assert leader is not None
    c.restart("a")
    marker = c.propose(leader, b"marker")
    c.run_until(lambda: committed_everywhere(c, marker), 100)
    assert c.data("a") == c.data("b") == c.data("c")


def test_stale_persist_ack_after_a_term_change_is_ignored() -> None:
    # The leader's write of an entry is in flight when a newer leader overwrites that entry.
    # Acknowledging the old write must not mark the replacement durable nor count anything.
    c = Cluster(ABC)
    elect(c, "a")
    c.isolate("a")
    c.hold("a")
    index = c.propose("a", b"lost")
    a = c.nodes["a"]
    stale = a.pending
    assert stale is not None and [(e.index, e.data) for e in stale.entries] == [(index, b"lost")]
    c.run_until(lambda: c.leader() in ("b", "c"), 100)
    new = c.leader()
    assert new is not None
    new_term = c.core(new).term
    c.propose(new, b"y")
    nlog = c.core(new).log
    assert nlog.term(index - 1) == 1
    tail = tuple(nlog.entries(index, nlog.last_index() + 1))
    # The new leader's Append reaches a while a's write is in flight: a steps down and its
    # tail is replaced.
    a.deliver(Append(new_term, new, "a", index - 1, 1, 0, tail), None)
    c.heal()
    core = a.must_core()
    assert core.role is Role.FOLLOWER and core.term == new_term
    assert core.log.term(index) == new_term
    assert core.log.persisted < index
    a.finish_ready()  # the old write completes now: (index, old term) no longer exists
    assert core.log.persisted < index
    assert core.log.term(index) == new_term
    assert core.log.committed_limit() < index  # nothing of the new tail applies yet
    c.release("a")
    assert core.log.persisted == core.log.last_index()
    c.tick(n=3)
    assert c.data("a") == c.data(new) and b"lost" not in c.data("a")


def test_no_early_messages_until_the_leaders_term_is_durable() -> None:
    # A lone voter wins at once: its first Appends (to a learner) share the Ready with its
    # new term and vote, so they wait for the sync like everything else.
    c = Cluster(("a",), learners=("l",))
    a = c.nodes["a"]
    c.core("a").campaign()
    rd = a.take_ready()
    assert rd is not None and rd.hard_state is not None and c.core("a").role is Role.LEADER
    assert rd.early_messages == []
    assert any(isinstance(m, Append) for m in rd.messages)
    for msg, payload in a.finish_ready():
        c.nodes["l"].deliver(msg, payload)
    c.settle()
    index = c.core("a").propose(b"x")
    rd = a.take_ready()
    assert rd is not None and (rd.hard_state is None or rd.hard_state.term == c.core("a").term)
    assert any(isinstance(m, Append) and m.entries for m in rd.early_messages)
    a.finish_ready()
    c.settle()
    assert committed_everywhere(c, index)


# -- snapshots (§7) --------------------------------------------------------------------------------


def test_snapshot_installed_on_lagging_follower() -> None:
    # §7: a follower that needs compacted entries gets a snapshot instead.
    c = Cluster(ABC)
    elect(c, "a")
    c.crash("c")
    for n in range(30):
        c.propose("a", b"s%d" % n)
    for m in ("a", "b"):
        assert c.nodes[m].snapshot() is not None
    assert c.nodes["a"].storage.first_index() > 2
    c.restart("c")
    c.tick(n=5)
    assert c.count(InstallSnapshot, src="a", dst="c", delivered=True) == 1
    assert c.nodes["c"].storage.snapshot_meta().index == c.nodes["a"].storage.snapshot_meta().index
    index = c.propose("a", b"after")
    assert committed_everywhere(c, index)
    assert c.data("c") == c.data("a") == [b"s%d" % n for n in range(30)] + [b"after"]


def test_snapshot_matching_the_log_keeps_the_suffix() -> None:
    # §7: "If existing log entry has same index and term as snapshot's last included entry,
    # retain log entries following it"; otherwise the whole log is discarded.
    storage = MemoryStorage(ConfState(("a", "b")))
    storage.append([Entry(i, 1) for i in range(1, 6)])
    storage.set_hard_state(HardState(term=1))
    storage.sync()
    core = RaftCore("b", storage, CoreConfig(), random.Random(0))
    core.step(InstallSnapshot(1, "a", "b", SnapshotMeta(3, 1, ConfState(("a", "b")))))
    assert core.log.last_index() == 5 and core.log.committed == 3
    assert core.ready().snapshot is None
    core2 = RaftCore("c", storage, CoreConfig(), random.Random(0))
    core2.step(InstallSnapshot(2, "a", "c", SnapshotMeta(4, 2, ConfState(("a", "b", "c")))))
    assert core2.log.last_index() == 4 and core2.log.first_index() == 5
    assert core2.ready().snapshot == SnapshotMeta(4, 2, ConfState(("a", "b", "c")))


def test_failed_snapshot_transfer_is_retried() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.crash("c")
    for n in range(10):
        c.propose("a", b"s%d" % n)
    c.nodes["a"].snapshot()
    c.restart("c")
    c.hook = lambda m: not isinstance(m, InstallSnapshot)
    c.tick(n=3)
    assert c.count(InstallSnapshot, src="a") >= 1 and c.nodes["c"].applied == 1
    c.hook = None
    c.tick(n=3)
    assert c.data("c") == c.data("a")


# -- membership (§6, thesis §4) --------------------------------------------------------------------


def test_membership_change_while_a_member_is_down() -> None:
    c = Cluster(ABC, spares=("d",))
    elect(c, "a")
    c.propose("a", b"one")
    c.crash("c")
    c.conf_change("a", ConfChangeType.ADD_VOTER, "d")
    assert c.core("a").conf.voters == ("a", "b", "c", "d")
    index = c.propose("a", b"two")  # needs 3 of 4: a, b and the new d
    assert committed_everywhere(c, index, ("a", "b", "d"))
    c.conf_change("a", ConfChangeType.REMOVE, "c")
    index = c.propose("a", b"three")
    assert committed_everywhere(c, index, ("a", "b", "d"))
    c.restart("c")  # it learns nothing: it is no longer a member
    c.tick(n=50)
    assert c.leader() == "a" and c.core("a").term == 1
    assert c.data("d") == [b"one", b"two", b"three"]


def test_learner_catches_up_then_is_promoted() -> None:
    # Thesis §4.2.1: new members join as non-voting learners until they are caught up.
    c = Cluster(ABC, spares=("d",))
    elect(c, "a")
    for n in range(20):
        c.propose("a", b"l%d" % n)
    c.isolate("d")
    c.conf_change("a", ConfChangeType.ADD_LEARNER, "d")
    with pytest.raises(LearnerNotCaughtUp):
        c.core("a").propose_conf_change(ConfChangeType.PROMOTE_LEARNER, "d")
    # A learner is never asked to vote and never counts towards a commit.
    c.heal()
    c.tick(n=3)
    assert c.data("d") == c.data("a")
    c.cut("a", "b")
    c.cut("a", "c")
    index = c.core("a").propose(b"not yet")
    c.tick(["a", "d"], n=3)
    assert c.nodes["d"].must_core().log.last_index() >= index
    assert c.core("a").log.committed < index
    c.heal()
    c.tick(n=2)
    assert committed_everywhere(c, index)
    c.conf_change("a", ConfChangeType.PROMOTE_LEARNER, "d")
    assert c.core("a").conf == ConfState(("a", "b", "c", "d"), ())
    assert all(c.core(m).conf.voters == ("a", "b", "c", "d") for m in ("a", "b", "c", "d"))
    assert c.count(VoteRequest, dst="d") == 0


def test_one_membership_change_at_a_time() -> None:
    c = Cluster(ABC, spares=("d", "e"))
    elect(c, "a")
    c.isolate("b")
    c.isolate("c")
    c.core("a").propose_conf_change(ConfChangeType.ADD_LEARNER, "d")
    with pytest.raises(ConfChangeInProgress):
        c.core("a").propose_conf_change(ConfChangeType.ADD_LEARNER, "e")
    with pytest.raises(InvalidRequest):
        c.core("a").propose_conf_change(ConfChangeType.REMOVE, "x")
    c.heal()
    c.tick(n=2)
    c.conf_change("a", ConfChangeType.ADD_LEARNER, "e")
    assert c.core("a").conf.learners == ("d", "e")


def test_uncommitted_conf_change_is_reverted_when_truncated() -> None:
    # Thesis §4.1: a member uses the latest configuration in its log, committed or not, and
    # falls back to the previous one if that entry is overwritten by a newer leader.
    base = ConfState(("a", "b", "c"))
    core = RaftCore("b", MemoryStorage(base), CoreConfig(), random.Random(0))
    change = ConfState(("a", "b", "c"), ("d",))
    entry = Entry(1, 1, EntryType.CONF_CHANGE, encode_conf_state(change))
    core.step(Append(1, "a", "b", 0, 0, 0, (entry,)))
    assert core.conf == change and "d" in core.tracker.progress
    core.step(Append(2, "c", "b", 0, 0, 0, (Entry(1, 2),)))
    assert core.conf == base and "d" not in core.tracker.progress


def test_removed_member_stops_campaigning() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.conf_change("a", ConfChangeType.REMOVE, "c")
    assert "c" not in c.core("c").conf.voters
    c.isolate("c")
    term = c.core("c").term
    c.tick(["c"], n=100)
    assert c.core("c").term == term and c.count(VoteRequest, src="c") == 0
    with pytest.raises(InvalidRequest):
        c.core("c").campaign()


def test_removed_leader_steps_down_and_hands_over() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.conf_change("a", ConfChangeType.REMOVE, "a")
    assert c.core("a").role is Role.FOLLOWER
    assert c.count(TimeoutNow, src="a") == 1
    new = c.leader()
    assert new in ("b", "c")
    index = c.propose(new or "", b"x")
    assert committed_everywhere(c, index, ("b", "c"))


# -- leadership transfer (thesis §3.10) ------------------------------------------------------------


def test_leadership_transfer() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.cut("a", "c")
    c.propose("a", b"x")  # c lags behind
    c.core("a").transfer_leadership("c")
    with pytest.raises(LeadershipTransferInProgress):
        c.core("a").propose(b"refused")
    c.heal()
    c.tick(n=2)  # the heartbeat answer lets a catch c up, then send TimeoutNow
    assert c.leader() == "c" and c.core("c").term == 2
    assert c.count(TimeoutNow, src="a", dst="c") == 1
    index = c.propose("c", b"y")
    assert committed_everywhere(c, index)
    assert c.data("a") == [b"x", b"y"]


def test_leadership_transfer_gives_up_after_an_election_timeout() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.isolate("c")
    c.core("a").transfer_leadership("c")
    with pytest.raises(LeadershipTransferInProgress):
        c.core("a").propose(b"refused")
    c.tick(["a", "b"], n=10)
    assert c.leader() == "a"
    c.propose("a", b"accepted")
    with pytest.raises(InvalidRequest):
        c.core("a").transfer_leadership("x")
    with pytest.raises(NotLeader) as info:
        c.core("b").transfer_leadership("a")
    assert info.value.leader == "a"


# -- pre-vote and check-quorum (thesis §9.6, §6.2) -------------------------------------------------


@pytest.mark.parametrize("pre_vote", [True, False])
def test_prevote_keeps_a_partitioned_member_from_disrupting(pre_vote: bool) -> None:
    c = Cluster(ABC, config=CoreConfig(pre_vote=pre_vote))
    elect(c, "a")
    c.isolate("c")
    c.tick(["c"], n=100)
    c.heal()
    c.tick(n=5)
    if pre_vote:
        assert c.core("c").term == 1 and c.leader() == "a" and c.core("a").term == 1
    else:
        # Without pre-vote the returning member's inflated term deposes the leader.
        assert c.core("a").term > 1
    c.run_until(lambda: c.leader() is not None)


def test_a_lost_leader_is_replaced_within_the_leader_loss_ticks() -> None:
    # The leader crashed and the transport says so (its connections closed): the followers
    # elect a new one within leader_loss_ticks (2), not an election timeout (10-19 ticks).
    c = Cluster(FIVE)
    elect(c, "a")
    c.tick(n=5)  # heard from the leader half an election timeout ago
    c.crash("a")
    for m in FIVE[1:]:
        c.core(m).report_unreachable("a")
    ticks = c.run_until(lambda: c.leader() not in (None, "a"), 10)
    assert ticks <= 2
    assert c.core(c.leader() or "a").term == 2  # one election, no split vote


def test_a_live_leader_survives_a_lost_connection() -> None:
    # A follower told its live leader is unreachable campaigns early; its pre-vote is
    # refused by the members that still hear from the leader (their lease): no new term, and
    # the follower follows the leader again.
    c = Cluster(ABC)
    elect(c, "a")
    c.cut("a", "c")  # long enough for c's early campaign to happen unanswered by a
    c.core("c").report_unreachable("a")
    c.tick(n=3)
    assert c.count(VoteRequest, src="c", where=lambda m: m.pre) >= 1
    assert c.leader() == "a" and all(c.core(m).term == 1 for m in ABC)
    c.heal()
    c.tick(n=2)
    assert c.core("c").lead == "a" and c.core("c").role is Role.FOLLOWER
    c.propose("a", b"x")
    assert c.data("c") == [b"x"]


@pytest.mark.parametrize(
    "config",
    [
        CoreConfig(leader_loss_ticks=0),
        CoreConfig(check_quorum=False),
        CoreConfig(pre_vote=False),
    ],
    ids=["off", "no-check-quorum", "no-pre-vote"],
)
def test_a_lost_leader_waits_for_the_timeout_without_lease_and_pre_vote(
    config: CoreConfig,
) -> None:
    # Without pre-vote and the lease an early campaign could depose a live leader: the report
    # then changes nothing, and the followers wait for their election timeout.
    c = Cluster(ABC, config=config)
    elect(c, "a")
    c.crash("a")
    for m in ("b", "c"):
        c.core(m).report_unreachable("a")
    ticks = c.run_until(lambda: c.leader() not in (None, "a"), 60)
    assert ticks >= config.election_tick


def test_only_the_leader_counts_as_lost() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.crash("b")
    c.core("c").report_unreachable("b")  # another follower: nothing to do
    c.tick(["c"], n=c.config.election_tick - 1)
    assert c.core("c").role is Role.FOLLOWER and c.core("c").lead == "a"


def test_check_quorum_steps_down_a_leader_without_replies() -> None:
    for check_quorum in (True, False):
        c = Cluster(ABC, config=CoreConfig(check_quorum=check_quorum))
        elect(c, "a")
        c.isolate("a")
        c.tick(["a"], n=20)
        role = c.core("a").role
        assert role is (Role.FOLLOWER if check_quorum else Role.LEADER)
        if check_quorum:
            with pytest.raises(NotLeader):
                c.core("a").propose(b"x")


def test_check_quorum_counts_replies_not_sends() -> None:
    # One-way partition: a's messages reach b and c, but their answers are lost.
    c = Cluster(ABC)
    elect(c, "a")
    c.cut_links |= {("b", "a"), ("c", "a")}
    c.tick(["a"], n=20)  # the answers to the election count for the first round
    assert c.core("a").role is Role.FOLLOWER


# -- reads (thesis §6.4) ---------------------------------------------------------------------------


def test_read_index_on_leader_and_follower() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    index = c.propose("a", b"w")
    c.core("a").read_index(b"r1")
    assert c.nodes["a"].reads == []  # waits for a heartbeat round
    c.settle()
    assert [(r.ctx, r.index) for r in c.nodes["a"].reads] == [(b"r1", index)]
    c.core("b").read_index(b"r2")  # forwarded to the leader
    c.settle()
    assert [(r.ctx, r.index) for r in c.nodes["b"].reads] == [(b"r2", index)]
    assert c.count(ReadIndexRequest, src="b") == 1 and c.count(ReadIndexResponse, dst="b") == 1
    with pytest.raises(NotLeader):
        RaftCore("z", MemoryStorage(), CoreConfig(), random.Random(0)).read_index(b"x")


def test_read_index_waits_for_the_first_commit_of_the_term() -> None:
    c = Cluster(ABC)
    c.hook = lambda m: not (isinstance(m, AppendResponse) and m.term == 1)
    elect(c, "a")
    c.core("a").read_index(b"early")
    c.settle()
    assert c.nodes["a"].reads == []
    c.hook = None
    c.tick(["a"])
    assert [r.ctx for r in c.nodes["a"].reads] == [b"early"]


def test_partitioned_old_leader_cannot_serve_a_read() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.propose("a", b"v1")
    c.isolate("a")
    c.core("a").read_index(b"stale?")
    c.run_until(lambda: c.core("b").role is Role.LEADER or c.core("c").role is Role.LEADER)
    new = "b" if c.core("b").role is Role.LEADER else "c"
    index = c.propose(new, b"v2")
    c.tick(["a"], n=5)
    assert c.nodes["a"].reads == []  # never confirmed by a quorum
    c.core(new).read_index(b"fresh")
    c.settle()
    assert [(r.ctx, r.index) for r in c.nodes[new].reads] == [(b"fresh", index)]


# -- flow control ----------------------------------------------------------------------------------


def test_uncommitted_size_limit_refuses_proposals() -> None:
    c = Cluster(ABC, config=CoreConfig(max_uncommitted_entries_size=1000))
    elect(c, "a")
    c.isolate("a")
    leader = c.core("a")
    accepted = 0
    with pytest.raises(UncommittedLimitExceeded):
        for _ in range(100):
            leader.propose(b"x" * 100)
            accepted += 1
    assert 5 <= accepted <= 10
    c.heal()
    c.tick(n=2)
    c.propose("a", b"x" * 100)  # room again once committed


def test_flow_control_bounds_inflight_appends() -> None:
    config = CoreConfig(max_inflight_msgs=3, max_size_per_msg=1)
    c = Cluster(ABC, config=config)
    elect(c, "a")
    c.propose("a", b"warm-up")  # b and c are in REPLICATE state now
    c.hook = lambda m: not (isinstance(m, AppendResponse) and m.src == "b")
    before = c.count(Append, src="a", dst="b", where=lambda m: bool(m.entries))
    for n in range(20):
        c.core("a").propose(b"f%d" % n)
    c.settle()
    assert c.count(Append, src="a", dst="b", where=lambda m: bool(m.entries)) - before == 3
    assert c.nodes["c"].applied == c.core("a").log.last_index()
    c.hook = None
    c.tick(n=4)
    assert c.data("b") == c.data("a")


def test_flow_control_bounds_inflight_bytes() -> None:
    config = CoreConfig(max_inflight_bytes=300, max_size_per_msg=100)
    c = Cluster(ABC, config=config)
    elect(c, "a")
    c.propose("a", b"warm-up")
    c.hook = lambda m: not (isinstance(m, AppendResponse) and m.src == "b")
    before = c.count(Append, src="a", dst="b", where=lambda m: bool(m.entries))
    for _ in range(20):
        c.core("a").propose(b"y" * 84)  # exactly 100 bytes with the per-entry overhead
    c.settle()
    assert c.count(Append, src="a", dst="b", where=lambda m: bool(m.entries)) - before == 3


# -- commit propagation ----------------------------------------------------------------------------


def commit_only(m: Any) -> bool:
    return not m.entries


def test_commit_only_appends_are_not_answered() -> None:
    # The commit index alone, to a member known to hold the entries: its answer would tell the
    # leader nothing, so it is not sent (and is not missed).
    c = Cluster(ABC)
    elect(c, "a")
    c.propose("a", b"warm-up")
    sent = c.count(Append, src="a", dst="b", where=commit_only)
    answers = c.count(AppendResponse, src="b")
    index = c.propose("a", b"x")
    assert c.count(Append, src="a", dst="b", where=commit_only) == sent + 1
    assert c.count(AppendResponse, src="b") == answers + 1  # to the Append with the entry
    assert c.core("b").log.committed == index


def test_a_rejected_quiet_append_is_still_answered() -> None:
    # quiet only silences success: a follower whose log does not match still says so.
    c = Cluster(ABC)
    elect(c, "a")
    index = c.propose("a", b"x")
    term = c.core("a").term
    b = c.nodes["b"]
    b.deliver(Append(term, "a", "b", index + 5, term, index, (), True), None)
    rd = b.take_ready()
    assert rd is not None
    answers = [m for m in rd.messages if isinstance(m, AppendResponse)]
    assert len(answers) == 1 and answers[0].reject
    b.finish_ready()


def test_a_lazy_follower_learns_the_commit_from_the_next_append_or_heartbeat() -> None:
    # A follower whose driver says nothing there waits on applies is not sent the commit index
    # alone; the next Append (or Heartbeat) carries it. An eager one gets it at once.
    c = Cluster(ABC)
    elect(c, "a")
    c.core("b").lazy_commit = True
    c.propose("a", b"warm-up")  # b's answer tells the leader it is lazy
    assert c.core("a").tracker.progress["b"].lazy
    to_b = c.count(Append, src="a", dst="b", where=commit_only)
    to_c = c.count(Append, src="a", dst="c", where=commit_only)
    first = c.propose("a", b"x")
    assert c.count(Append, src="a", dst="b", where=commit_only) == to_b
    assert c.count(Append, src="a", dst="c", where=commit_only) == to_c + 1
    assert c.core("c").log.committed == first
    assert c.core("b").log.committed < first and c.nodes["b"].applied < first
    second = c.propose("a", b"y")  # its Append carries the commit of the first
    assert c.core("b").log.committed == first and c.data("b")[-1] == b"x"
    c.tick(n=c.config.heartbeat_tick)  # and a heartbeat the rest
    assert c.core("b").log.committed == second and c.data("b")[-1] == b"y"
    assert c.count(Append, src="a", dst="b", where=commit_only) == to_b


def test_broadcast_commit_tells_the_lazy_followers_too() -> None:
    # The driver's bound on how long a lazy follower may go without the commit index.
    c = Cluster(ABC)
    elect(c, "a")
    c.core("b").lazy_commit = True
    c.propose("a", b"warm-up")
    leader = c.core("a")
    assert leader.holds_commit()  # b was not told that warm-up is committed...
    c.tick(["a"], n=c.config.heartbeat_tick)
    assert not leader.holds_commit()  # ...until a heartbeat did
    index = c.propose("a", b"x")
    assert leader.holds_commit() and leader.holds_commit(index)
    assert not leader.holds_commit(index - 1)  # that one went out with x's Append
    assert c.core("b").log.committed < index
    leader.broadcast_commit()
    c.settle()
    assert c.core("b").log.committed == index and c.data("b")[-1] == b"x"
    assert not leader.holds_commit()
    assert not c.core("b").holds_commit()  # a follower holds nothing back


def test_a_follower_that_stops_being_lazy_gets_the_commit_at_once() -> None:
    c = Cluster(ABC)
    elect(c, "a")
    c.core("b").lazy_commit = True
    c.propose("a", b"warm-up")
    index = c.propose("a", b"x")
    assert c.core("b").log.committed < index
    c.core("b").lazy_commit = False  # a reader appeared on b: its next answer says so
    c.tick(n=c.config.heartbeat_tick)
    assert not c.core("a").tracker.progress["b"].lazy
    assert c.core("b").log.committed == index
    again = c.propose("a", b"y")
    assert c.core("b").log.committed == again  # eager again: the commit came on its own


# -- messages --------------------------------------------------------------------------------------


def test_messages_round_trip() -> None:
    meta = SnapshotMeta(5, 2, ConfState(("a", "b"), ("c",)))
    samples: list[Message] = [
        VoteRequest(3, "a", "b", 10, 2, pre=True, transfer=True),
        VoteResponse(3, "b", "a", True, pre=True),
        Append(3, "a", "b", 4, 2, 3, (Entry(5, 3, EntryType.CONF_CHANGE, b"\x01"),)),
        Append(3, "a", "b", 4, 2, 3, (), True),
        AppendResponse(3, "b", "a", 4, True, 2, 1),
        AppendResponse(3, "b", "a", 4, lazy=True),
        Heartbeat(3, "a", "b", 4, 7),
        HeartbeatResponse(3, "b", "a", 7),
        HeartbeatResponse(3, "b", "a", 7, True),
        InstallSnapshot(3, "a", "b", meta),
        TimeoutNow(3, "a", "b"),
        ReadIndexRequest(3, "b", "a", b"ctx"),
        ReadIndexResponse(3, "a", "b", b"ctx", 9),
    ]
    for msg in samples:
        assert decode(encode(msg)) == msg


def test_checker_catches_a_broken_core(monkeypatch: pytest.MonkeyPatch) -> None:
    # The harness itself: a core that votes without the up-to-date check (§5.4.1) elects a
    # leader missing committed entries, and the checker must notice.
    def vote_blindly(self: RaftCore, msg: VoteRequest) -> None:
        self.msgs.append(VoteResponse(msg.term, self.id, msg.src, True, msg.pre))
        if not msg.pre:
            self.vote = msg.src

    monkeypatch.setattr(RaftCore, "_handle_vote_request", vote_blindly)
    c = Cluster(ABC, config=CoreConfig(pre_vote=False, check_quorum=False))
    elect(c, "a")
    c.isolate("c")
    c.propose("a", b"committed")
    c.heal()
    with pytest.raises(InvariantViolation, match="leader completeness"):
        c.campaign("c")


def test_simulation_reports_progress() -> None:
    sim = Simulation(SimParams(seed=1, chaos_ticks=100, conf_rate=0.05, snapshot_every=5))
    sim.run()
    assert sim.checker.max_applied > 20 and sim.stats["snapshots"] > 0
