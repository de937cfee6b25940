"""Seeded random schedules of whole clusters under faults (see ``sim.Simulation``).

``RAFT_SIM_SEEDS=<n>`` runs seeds ``0..n-1`` (default 1000); ``RAFT_SIM_SEED=<n>`` runs just
seed ``n`` - the command a failure prints. Every schedule checks Raft's safety properties
after every step, then heals all faults and requires the cluster to converge.
"""

from __future__ import annotations

import os

import pytest

from .sim import SimParams, Simulation


def _seeds() -> list[int]:
    one = os.environ.get("RAFT_SIM_SEED")
    if one is not None:
        return [int(one)]
    return list(range(int(os.environ.get("RAFT_SIM_SEEDS", "1000"))))


@pytest.mark.parametrize("seed", _seeds())
def test_random_schedule(seed: int) -> None:
    params = SimParams.from_seed(seed)
    try:
        Simulation(params).run()
    except Exception as exc:
        pytest.fail(
            f"{type(exc).__name__}: {exc}\n{params}\n"
            f"reproduce: RAFT_SIM_SEED={seed} .venv/bin/pytest tests/raft/test_simulation.py",
            pytrace=True,
        )


def test_seed_mix_covers_the_features() -> None:
    params = [SimParams.from_seed(seed) for seed in range(200)]
    assert {p.voters for p in params} == {3, 5}
    assert sum(p.conf_rate > 0 and p.spares > 0 for p in params) >= 20
    assert sum(p.snapshot_every > 0 for p in params) >= 50
    assert sum(p.nemesis for p in params) >= 20
    assert sum(not p.pre_vote for p in params) >= 5
    assert sum(p.lazy_rate > 0 for p in params) >= 100
    assert sum(p.report_crashes for p in params) >= 100
    assert sum(p.false_report_rate > 0 for p in params) >= 50


def test_simulation_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        sim = Simulation(SimParams.from_seed(11))
        sim.run()
        runs.append((sim.now, sim.stats, sim.checker.leaders, sim.checker.applied))
    assert runs[0] == runs[1]
