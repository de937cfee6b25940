"""Porcupine, the Go linearizability checker, agrees with controlplane's own checker.

The known histories are those of ``tests/test_linearizability.py`` (built with its helpers),
and the random ones come from its generators: small arbitrary histories, and longer
simulated ones that are linearizable by construction, then mutated.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_linearizability import (  # the engine's own test histories and generators
    PROPERTY,
    _hard_history,
    op,
    simulate_kv,
    small_kv_histories,
    small_register_histories,
)

from controlplane.testing import gobuild
from controlplane.testing.linearizability import (
    UNKNOWN,
    Cas,
    Delete,
    Get,
    KVModel,
    Model,
    Operation,
    Outcome,
    Put,
    Read,
    RegisterModel,
    Write,
    check,
    to_porcupine_json,
)

from . import porcupine_check
from .porcupine_check import GoMissingError, check_with_porcupine, find_go, porcupine_version

OK, ILLEGAL = Outcome.OK, Outcome.ILLEGAL
History = list[Operation[Any, Any]]

_lost_update = [
    op(0, Put("n", 0), None, 0, 1),
    op(1, Cas("n", 0, 1), True, 10, 20),
    op(2, Cas("n", 0, 1), True, 11, 21),
]
_lost_write = [
    op(1, Put("k", "a"), None, 0, 10),
    op(2, Put("k", "b"), None, 5, 15),
    op(3, Get("k"), "b", 20, 30),
    op(3, Get("k"), "a", 40, 50),
]
_delete = [
    op(1, Get("k"), None, 0, 1),
    op(1, Put("k", 1), None, 2, 3),
    op(1, Delete("k"), None, 4, 5),
    op(1, Get("k"), None, 6, 7),
    op(1, Delete("k"), None, 8, 9),
]
_pending_cas = [op(1, Put("k", 1), None, 0, 1), op(2, Cas("k", 1, 2), None, 2, None)]

# (name, history, model, expected verdict): the known histories of test_linearizability.py.
KNOWN: list[tuple[str, History, Model[Any, Any, Any], Outcome]] = [
    ("empty", [], KVModel(), OK),
    (
        "write then read",
        [op(1, Write(1), None, 0, 10), op(2, Read(), 1, 20, 30)],
        RegisterModel(),
        OK,
    ),
    (
        "stale read",
        [op(1, Write(1), None, 0, 10), op(2, Read(), None, 20, 30)],
        RegisterModel(),
        ILLEGAL,
    ),
    (
        "concurrent read sees old",
        [op(1, Write(1), None, 0, 30), op(2, Read(), None, 10, 20)],
        RegisterModel(),
        OK,
    ),
    (
        "concurrent read sees new",
        [op(1, Write(1), None, 0, 30), op(2, Read(), 1, 10, 20)],
        RegisterModel(),
        OK,
    ),
    (
        "new value then old value",
        [op(1, Write(1), None, 0, 100), op(2, Read(), 1, 10, 20), op(3, Read(), None, 30, 40)],
        RegisterModel(),
        ILLEGAL,
    ),
    (
        "touching intervals",
        [op(1, Write(1), None, 0, 10), op(2, Read(), None, 10, 20)],
        RegisterModel(),
        OK,
    ),
    (
        "disjoint intervals",
        [op(1, Write(1), None, 0, 10), op(2, Read(), None, 11, 20)],
        RegisterModel(),
        ILLEGAL,
    ),
    (
        "unknown output",
        [op(1, Write(1), None, 0, 10), op(2, Read(), UNKNOWN, 20, 30)],
        RegisterModel(),
        OK,
    ),
    (
        "pending write applied",
        [op(1, Write(1), None, 0, None), op(2, Read(), 1, 50, 60)],
        RegisterModel(),
        OK,
    ),
    (
        "pending write not applied",
        [op(1, Write(1), None, 0, None), op(2, Read(), None, 50, 60)],
        RegisterModel(),
        OK,
    ),
    (
        "pending write cannot unapply",
        [op(1, Write(1), None, 0, math.inf), op(2, Read(), 1, 10, 20), op(2, Read(), None, 30, 40)],
        RegisterModel(),
        ILLEGAL,
    ),
    (
        "pending write not before its call",
        [op(2, Read(), 1, 0, 10), op(1, Write(1), None, 20, None)],
        RegisterModel(),
        ILLEGAL,
    ),
    ("pending cas applied", [*_pending_cas, op(3, Get("k"), 2, 10, 11)], KVModel(), OK),
    ("pending cas not applied", [*_pending_cas, op(3, Get("k"), 1, 10, 11)], KVModel(), OK),
    (
        "pending cas, value never written",
        [*_pending_cas, op(3, Get("k"), 3, 10, 11)],
        KVModel(),
        ILLEGAL,
    ),
    ("lost update", _lost_update, KVModel(), ILLEGAL),
    (
        "one cas of two fails",
        [*_lost_update[:2], op(2, Cas("n", 0, 1), False, 11, 21)],
        KVModel(),
        OK,
    ),
    ("lost write", _lost_write, KVModel(), ILLEGAL),
    ("last write wins", _lost_write[:3], KVModel(), OK),
    ("delete and absent keys", _delete, KVModel(), OK),
    ("get after delete", [*_delete[:3], op(1, Get("k"), 1, 6, 7)], KVModel(), ILLEGAL),
    (
        "cas create",
        [
            op(1, Cas("k", None, 1), True, 0, 1),
            op(1, Cas("k", None, 2), False, 2, 3),
            op(1, Get("k"), 1, 4, 5),
        ],
        KVModel(),
        OK,
    ),
    ("cas create on empty fails", [op(1, Cas("k", None, 1), False, 0, 1)], KVModel(), ILLEGAL),
    (
        "cas result checked",
        [op(1, Put("k", 1), None, 0, 1), op(1, Cas("k", 2, 3), True, 2, 3)],
        KVModel(),
        ILLEGAL,
    ),
    (
        "cas with unknown output",
        [
            op(1, Put("k", 1), None, 0, 1),
            op(1, Cas("k", 1, 3), UNKNOWN, 2, 3),
            op(1, Get("k"), 3, 4, 5),
        ],
        KVModel(),
        OK,
    ),
    (
        "keys are independent",
        [
            op(1, Put("a", 1), None, 0, 10),
            op(2, Put("b", 1), None, 0, 10),
            op(1, Get("a"), 1, 20, 30),
            op(2, Get("b"), None, 20, 30),
        ],
        KVModel(),
        ILLEGAL,
    ),
    ("hard history", _hard_history(8), RegisterModel(), ILLEGAL),
    (
        "fractional times",
        [op(1, Write(1), None, 0.5, 1.5), op(2, Read(), 1, 1.25, 2.0)],
        RegisterModel(),
        OK,
    ),
    (
        "2000 operations",
        simulate_kv(random.Random(20240601), 2_000, clients=8, keys=10, pending_rate=0.005),
        KVModel(),
        OK,
    ),
]


def test_porcupine_is_pinned() -> None:
    version = porcupine_version()
    assert version.startswith("v1.")
    assert version in (porcupine_check.PORCUPINE_SOURCE / "go.sum").read_text()


@pytest.mark.parametrize(
    ("history", "model", "expected"),
    [pytest.param(h, m, e, id=name) for name, h, m, e in KNOWN],
)
def test_known_histories(
    porcupine: Path, history: History, model: Model[Any, Any, Any], expected: Outcome
) -> None:
    assert check(history, model, timeout=30).outcome is expected
    result = check_with_porcupine(history, binary=porcupine)
    assert result.outcome is expected, result.verdict


def test_verdict_line_and_history_file(porcupine: Path, tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    to_porcupine_json(_lost_write, path)
    result = check_with_porcupine(path, binary=porcupine, visualize=tmp_path / "lost.html")
    assert result.outcome is ILLEGAL
    assert result.verdict == "not linearizable (4 operations, 1 keys)"
    assert "<html" in (tmp_path / "lost.html").read_text().lower()
    to_porcupine_json(_lost_write[:3], path)
    assert check_with_porcupine(path, binary=porcupine).verdict == (
        "linearizable (3 operations, 1 keys)"
    )


def test_timeout_gives_unknown(porcupine: Path) -> None:
    result = check_with_porcupine(_hard_history(40), binary=porcupine, timeout=0.2)
    assert result.outcome is Outcome.UNKNOWN, result.verdict
    assert result.verdict.startswith("unknown: timed out")


def test_bad_input_is_an_error(porcupine: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"client_id": 0, "input": {"type": "enqueue"}, "call": 0, "return": 1}]')
    with pytest.raises(RuntimeError, match="unknown type"):
        check_with_porcupine(path, binary=porcupine)


def test_missing_go_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("GOROOT", raising=False)
    monkeypatch.setattr(gobuild, "GO_FALLBACKS", ())
    with pytest.raises(GoMissingError, match=r"Go toolchain .* not found"):
        find_go()


# --- randomized: both checkers agree ---------------------------------------------------------

AGREE = settings(PROPERTY, max_examples=150)


def _agree(porcupine: Path, history: History, model: Model[Any, Any, Any]) -> Outcome:
    ours = check(history, model, timeout=30).outcome
    theirs = check_with_porcupine(history, binary=porcupine, timeout=30)
    assert ours is not Outcome.UNKNOWN
    assert theirs.outcome is ours, f"{theirs.verdict}; ours: {ours}\n{to_porcupine_json(history)}"
    return ours


@AGREE
@given(history=small_kv_histories())
def test_small_kv_histories_agree(porcupine: Path, history: History) -> None:
    _agree(porcupine, history, KVModel())


@AGREE
@given(history=small_register_histories())
def test_small_register_histories_agree(porcupine: Path, history: History) -> None:
    _agree(porcupine, history, RegisterModel())


@settings(PROPERTY, max_examples=60)
@given(
    seed=st.integers(0, 2**32),
    shape=st.tuples(st.integers(1, 60), st.integers(1, 5), st.integers(1, 3)),
    mutate=st.booleans(),
)
def test_simulated_and_mutated_histories_agree(
    porcupine: Path, seed: int, shape: tuple[int, int, int], mutate: bool
) -> None:
    n_ops, clients, keys = shape
    rng = random.Random(seed)
    history = simulate_kv(rng, n_ops, clients=clients, keys=keys, max_pending=2)
    reads = [i for i, o in enumerate(history) if isinstance(o.input, Get) and not o.pending]
    if mutate and reads:
        i = rng.choice(reads)
        wrong = rng.choice([v for v in (None, 1, 2, 3, 4) if v != history[i].output])
        history[i] = op(
            history[i].client_id, history[i].input, wrong, history[i].call, history[i].ret
        )
    verdict = _agree(porcupine, history, KVModel())
    if not mutate:
        assert verdict is OK
