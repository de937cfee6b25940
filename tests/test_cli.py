"""The client subcommands of ``controlplane``, run in a subprocess against members in this
process (the cluster runs on the test's event loop, so the subprocess is awaited, not blocked
on). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from raft.cluster_util import client_address

from controlplane import cli as cli_module
from controlplane.backends.raft.backend import RaftControlPlane
from controlplane.config import Config, load_config
from controlplane.testing.raft_harness import RaftHarness
from controlplane.types import Node

pytestmark = pytest.mark.anyio

TIMEOUT = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def members_of(cluster: list[RaftControlPlane]) -> str:
    return ",".join(map(client_address, cluster))


async def cli(*args: str) -> tuple[int, str, str]:
    """Run ``python -m controlplane.cli ARGS``; its exit status, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "CONTROLPLANE_MEMBERS"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        with anyio.fail_after(TIMEOUT):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def cluster() -> AsyncIterator[list[RaftControlPlane]]:
    async with RaftHarness(3).cluster() as members:
        cp = members[0]
        await cp.register_node(Node(id="data-1", address="10.0.0.1:9300"))
        await cp.register_node(Node(id="data-2", address="10.0.0.2:9300"))
        await cp.create_index("logs", {"number_of_shards": 2, "number_of_replicas": 1})
        yield members


async def test_status_nodes_indices_routing(cluster: list[RaftControlPlane]) -> None:
    members = members_of(cluster)
    code, out, err = await cli("status", "--members", members)
    assert code == 0, err
    lines = out.splitlines()
    rows = [line.split() for line in lines[1:] if not line.startswith("health:")]
    assert sorted(row[0] for row in rows) == ["cp-1", "cp-2", "cp-3"]
    assert sum(row[1] == "leader" for row in rows) == 1
    leader = next(row[0] for row in rows if row[1] == "leader")
    assert all(row[2] == leader for row in rows)
    assert lines[-1].startswith("health: ")

    code, out, err = await cli("nodes", "--members", members)
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["data-1", "data-2"]

    code, out, err = await cli("indices", "--members", members)
    assert code == 0, err
    assert out.splitlines()[1].split()[0] == "logs"

    code, out, err = await cli("routing", "logs", "--members", members)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert sorted((row[0], row[1]) for row in rows) == [
        ("0", "primary"),
        ("0", "replica"),
        ("1", "primary"),
        ("1", "replica"),
    ]

    code, out, err = await cli("watch", "--since", "0", "--count", "3", "--members", members)
    assert code == 0, err
    events = [line.split() for line in out.splitlines()]
    assert len(events) == 3
    assert events[0] == ["1", "node_joined", "data-1"]
    assert all(int(event[0]) >= 1 for event in events)


async def test_export_then_import_round_trips(
    cluster: list[RaftControlPlane], tmp_path: Path
) -> None:
    export = tmp_path / "state.json"
    code, _, err = await cli("export-state", str(export), "--members", members_of(cluster))
    assert code == 0, err
    async with RaftHarness(1).cluster() as fresh:
        code, _, err = await cli("import-state", str(export), "--members", members_of(fresh))
        assert code == 0, err
        assert await fresh[0].list_nodes() == await cluster[0].list_nodes()
        assert await fresh[0].list_indices() == await cluster[0].list_indices()


async def test_unreachable_member_is_one_line_error() -> None:
    code, out, err = await cli("status", "--members", "127.0.0.1:1", "--timeout", "1")
    assert code == 1
    assert out == ""
    assert err.startswith("controlplane: error: ")
    assert len(err.splitlines()) == 1
    code, _, err = await cli("nodes", "--members", "nonsense")
    assert code == 1
    assert err.splitlines() == ["controlplane: error: expected host:port, got 'nonsense'"]


async def test_locks_snapshot_and_transfer_leader(
    cluster: list[RaftControlPlane], tmp_path: Path
) -> None:
    members = members_of(cluster)
    await cluster[0].acquire_lock("allocator", "worker-1", 3600.0)
    code, out, err = await cli("locks", "--members", members)
    assert code == 0, err
    assert out.splitlines()[1].split()[:2] == ["allocator", "worker-1"]

    snapshot = tmp_path / "snapshot.bin"
    code, _, err = await cli("snapshot", "save", str(snapshot), "--members", members)
    assert code == 0, err
    assert snapshot.stat().st_size > 0
    code, _, err = await cli("snapshot", "restore", str(snapshot), "--members", members)
    assert code == 0, err
    assert [n.id for n in await cluster[0].list_nodes()] == ["data-1", "data-2"]

    leader = next(cp for cp in cluster if cp.node.is_leader)
    code, _, err = await cli("transfer-leader", "--members", members)
    assert code == 0, err
    assert not leader.node.is_leader

    code, _, err = await cli("member", "remove", "no-such-member", "--members", members)
    assert code == 1
    assert err.startswith("controlplane: error: ")
    assert len(err.splitlines()) == 1


def test_serve_runs_on_uvloop_when_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed: import fails
    factory, name = cli_module._event_loop()
    assert factory is None and name.startswith("asyncio")
    fake = types.ModuleType("uvloop")
    fake.new_event_loop = asyncio.new_event_loop  # type: ignore[attr-defined]
    fake.__version__ = "0.21.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", fake)
    factory, name = cli_module._event_loop()
    assert factory is asyncio.new_event_loop and name == "uvloop 0.21.0"


def test_tune_collector_sets_only_the_young_threshold() -> None:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        cli_module.tune_collector(Config(gc_young_threshold=0))  # 0: Python's left alone
        assert gc.get_threshold() == (700, 11, 12)
        env = {"CONTROLPLANE__GC_YOUNG_THRESHOLD": "5000"}
        cli_module.tune_collector(load_config(env=env))
        assert gc.get_threshold() == (5000, 11, 12)  # the older generations' are kept
    finally:
        gc.set_threshold(*saved)
