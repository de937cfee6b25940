"""A large state (10,000 indices) round-trips exactly, on real member processes.

One cluster of three ``controlplane serve`` processes builds the state through a network
client, with real commands: nodes in three zones, 10,000 indices of 1-3 shards and a replica
(so every shard is allocated), some copies started, locks, feature flags, cluster settings and
a hash ring. Its members snapshot every ``SNAPSHOT_ENTRIES`` entries, so the log is compacted
many times while the state grows, and one member is down during the whole build.

Then:

* the member that was down comes back behind the leader's compacted log: it can only catch up
  by ``InstallSnapshot`` (streamed in chunks of 256 KiB, many of them for this state), and ends
  with exactly the leader's state;
* every member is killed (SIGKILL) and started again: each recovers from its own snapshot and
  log tail, exactly the state it had;
* ``controlplane snapshot save`` (the CLI), then ``controlplane snapshot restore`` into a
  brand-new cluster; ``controlplane export-state`` (JSON), then ``controlplane import-state``
  into another brand-new cluster: both give the state back exactly.

"Exactly", for a restore or an import (``RestoreState``, DESIGN 2.2): a restore is one more
mutation of the target cluster, so its state gets one new version, larger than any it had and
than the source's (``source.version + 1`` into a fresh cluster), and the replicated time
``now`` never goes back (it becomes the restoring command's time, which is later than the
source's). The restoring client's own retry-deduplication session is recorded in the same
command, so the target's ``sessions`` are the source's plus that one. Every other field --
nodes, indices with their routing tables, locks with their tokens and expiry times, the hash
ring, the configuration, the feature flags -- is equal to the source's, compared as whole
values. Between members of one cluster (catch-up by snapshot, restart) the states are equal
in every field, version and time included.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from controlplane.backends.raft.client import RaftClient, connect
from controlplane.codec import decode_state, encode_state, state_from_json
from controlplane.types import ClusterConfig, ClusterState, IndexSettings, Node, ShardState

from .cluster import ProcessCluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

INDICES = 10_000
SNAPSHOT_ENTRIES = 2_000
CHUNK = 256 << 10
"""The leader streams a snapshot in chunks of this size (``NodeOptions.snapshot_chunk_bytes``)."""
TIMEOUT = 120.0
"""Bound of every wait (a 2-core machine shared with other tests)."""


async def _build(client: RaftClient) -> None:
    """10,000 indices and the rest of a realistic state, through real commands."""
    # The nodes do not heart-beat: give them a timeout longer than the test.
    await client.set_cluster_config(
        ClusterConfig(node_timeout=3600.0, settings={"refresh_interval": "1s", "shards": 50_000})
    )
    zones = ["z1", "z2", "z3"]
    for i in range(6):
        await client.register_node(
            Node(id=f"data-{i}", address=f"10.0.0.{i}:9300", zone=zones[i % 3])
        )
    limit = asyncio.Semaphore(256)

    async def create(i: int) -> None:
        settings = IndexSettings(number_of_shards=1 + i % 3, number_of_replicas=1)
        async with limit:
            await client.create_index(f"index-{i:05d}", settings)

    await asyncio.gather(*(create(i) for i in range(INDICES)))
    for i in range(0, INDICES, 97):  # start some copies
        for routing in await client.get_shard_routing(f"index-{i:05d}"):
            for copy in routing.copies:
                if copy.node_id is not None:
                    await client.update_shard_state(
                        f"index-{i:05d}", routing.shard, copy.node_id, ShardState.STARTED
                    )
    for i in range(40):
        await client.acquire_lock(f"locks/{i}", f"holder-{i % 7}", 3600)
    for i in range(25):
        await client.set_feature_flag(f"flag-{i}", i % 2 == 0)
    await client.update_hash_ring(follow_membership=True, vnodes=64)


async def _member_state(cluster: ProcessCluster, i: int) -> ClusterState:
    """Member ``i``'s own replica (``/v1/state``), read once it is current."""
    answer = await cluster.http_get(i, "/v1/state?consistent=true", within=TIMEOUT)
    assert answer is not None and answer[0] == 200, f"/v1/state of member {i}: {answer}"
    return state_from_json(answer[1])


async def _wait_version(cluster: ProcessCluster, i: int, version: int) -> ClusterState:
    deadline = time.monotonic() + TIMEOUT
    while True:
        answer = await cluster.http_get(i, "/v1/state", within=TIMEOUT)
        if answer is not None and answer[0] == 200:
            state = state_from_json(answer[1])
            if state.version >= version:
                return state
        assert time.monotonic() < deadline, f"member {i} did not reach version {version}"
        await asyncio.sleep(0.2)


def _differences(actual: ClusterState, expected: ClusterState) -> list[str]:
    """The fields (and for maps, a few keys) where two states differ, for messages."""
    out = []
    for field in ClusterState.__struct_fields__:
        a, e = getattr(actual, field), getattr(expected, field)
        if a == e:
            continue
        if hasattr(a, "keys") and hasattr(e, "keys"):
            keys = sorted({*a.keys(), *e.keys()})
            bad = [k for k in keys if a.get(k) != e.get(k)]
            out.append(f"{field}: {len(bad)} keys differ, e.g. {bad[:3]}")
        else:
            out.append(f"{field}: {a!r} != {e!r}")
    return out


def _assert_same(actual: ClusterState, expected: ClusterState, what: str) -> None:
    assert actual == expected, f"{what}: {_differences(actual, expected)}"


def _assert_restored(restored: ClusterState, source: ClusterState, what: str) -> None:
    """``restored`` is ``source`` restored into a fresh cluster (see the module's docstring)."""
    assert restored.version == source.version + 1, what
    assert restored.now >= source.now, what
    extra = set(restored.sessions.keys()) - set(source.sessions.keys())
    assert len(extra) == 1, f"{what}: sessions added by the restore: {extra}"
    expected_sessions = source.sessions.set(next(iter(extra)), restored.sessions[next(iter(extra))])
    expected = msgspec.structs.replace(
        source, version=restored.version, now=restored.now, sessions=expected_sessions
    )
    _assert_same(restored, expected, what)


async def _cli(*args: str) -> str:
    """Run ``python -m controlplane.cli ARGS``; its stdout (it must succeed)."""
    env = {k: v for k, v in os.environ.items() if k != "CONTROLPLANE_MEMBERS"}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controlplane.cli", *args, "--timeout", str(TIMEOUT)],
        capture_output=True,
        env=env,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert done.returncode == 0, f"controlplane {' '.join(args)}: {done.stderr.decode()}"
    return done.stdout.decode()


def _members_option(cluster: ProcessCluster) -> list[str]:
    return ["--members", ",".join(cluster.client_addresses()), "--cluster-id", cluster.cluster_id]


async def _fresh_state(cluster: ProcessCluster) -> ClusterState:
    client = await connect(
        cluster.client_addresses(), cluster_id=cluster.cluster_id, request_timeout=TIMEOUT
    )
    try:
        return await client.get_cluster_state(consistent=True)
    finally:
        await client.stop()


async def test_large_state_round_trips(
    process_cluster: Callable[..., ProcessCluster], tmp_path: Path
) -> None:
    source = process_cluster(
        3,
        cluster_id="large-source",
        # By entry count only: the log is then compacted every SNAPSHOT_ENTRIES while the
        # state grows (by default a growing state is snapshotted less and less often).
        raft={"snapshot_entries": SNAPSHOT_ENTRIES, "snapshot_log_ratio": 0},
    )
    async with source:
        await source.wait_ready(TIMEOUT)
        await source.kill(2)  # down during the whole build: it will need the snapshot
        await source.wait_leader(TIMEOUT)
        started = time.monotonic()
        client = await connect(
            source.client_addresses()[:2], cluster_id=source.cluster_id, request_timeout=TIMEOUT
        )
        try:
            await _build(client)
            state = await client.get_cluster_state(consistent=True)
        finally:
            await client.stop()
        built = time.monotonic() - started
        assert len(state.indices) == INDICES
        assert all(
            c.node_id is not None
            for i in state.indices.values()
            for s in i.routing
            for c in s.copies
        )
        size = len(encode_state(state))
        print(f"built {INDICES} indices (version {state.version}, {size} bytes) in {built:.1f} s")

        # (c) the lagging member: only InstallSnapshot can bring it up to date.
        leader = source.leader()
        assert leader is not None
        snapshots = re.findall(r"snapshot at (\d+) \((\d+) bytes\)", source.log_text(leader))
        assert len(snapshots) >= 3, f"the leader compacted its log only {len(snapshots)} times"
        # The leader has probed the member since its connection failed (nothing pipelined
        # piles up for it): on its return it is found below the snapshot and must get it.
        await source.start_member(2)
        caught_up = await _wait_version(source, 2, state.version)
        assert "installed snapshot at" in source.log_text(2), source.log_text(2)[-2000:]
        metrics = await source.http_get(2, "/metrics", within=TIMEOUT)
        assert metrics is not None
        found = re.search(rb"^controlplane_raft_snapshot_bytes\S* (\S+)$", metrics[1], re.M)
        assert found is not None, metrics[1][:2000]
        installed = float(found.group(1))
        assert installed > 4 * CHUNK, f"a {installed}-byte snapshot is not streamed in chunks"
        print(f"lagging member installed a {installed:.0f}-byte snapshot (chunks of {CHUNK})")
        _assert_same(caught_up, await _member_state(source, leader), "lagging member")
        _assert_same(await _member_state(source, 2), state, "lagging member vs the client")

        # (c) every member killed and restarted after compaction recovers the same state.
        for i in range(3):
            await source.kill(i)
        for i in range(3):
            await source.start_member(i)
        await source.wait_ready(TIMEOUT)
        for i in range(3):
            _assert_same(await _wait_version(source, i, state.version), state, f"restarted {i}")

        # (a) snapshot save / restore, with the CLI, into a brand-new cluster.
        snapshot = tmp_path / "large.snapshot"
        await _cli("snapshot", "save", str(snapshot), *_members_option(source))
        saved = decode_state(snapshot.read_bytes())
        _assert_same(saved, state, "the saved snapshot")
        # (b) export-state, with the CLI.
        export = tmp_path / "large.json"
        await _cli("export-state", str(export), *_members_option(source))
        _assert_same(state_from_json(export.read_bytes()), state, "the exported JSON")
        print(f"snapshot {snapshot.stat().st_size} bytes, export {export.stat().st_size} bytes")

    for name, command, path in [
        ("large-snapshot", ["snapshot", "restore"], snapshot),
        ("large-import", ["import-state"], export),
    ]:
        target = process_cluster(3, cluster_id=name)
        async with target:
            await target.wait_ready(TIMEOUT)
            started = time.monotonic()
            await _cli(*command, str(path), *_members_option(target))
            print(f"{' '.join(command)}: {time.monotonic() - started:.1f} s")
            restored = await _fresh_state(target)
            _assert_restored(restored, state, f"{' '.join(command)} into a fresh cluster")
            for i in range(3):  # and every member holds it
                _assert_same(await _wait_version(target, i, restored.version), restored, f"{i}")
            target.check_exits()
        source.check_exits()
