"""Tests for controlplane.testing.linearizability."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Hashable, Sequence
from itertools import combinations, count, permutations
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from controlplane.testing.linearizability import (
    UNKNOWN,
    Cas,
    Delete,
    Get,
    HistoryRecorder,
    KVInput,
    KVModel,
    Model,
    Operation,
    Outcome,
    PartitionedModel,
    Put,
    Read,
    RegisterModel,
    Unknown,
    Write,
    check,
    to_porcupine_json,
)

# No example database: it would write a .hypothesis/ directory into the tree.
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ORACLE = settings(PROPERTY, max_examples=300)


def op(client: int, input: Any, output: Any, call: float, ret: float | None) -> Operation[Any, Any]:
    """Shorthand; ``ret=None`` makes a pending operation (its output is ignored)."""
    if ret is None:
        return Operation(client_id=client, input=input, call=call)
    return Operation(client_id=client, input=input, output=output, call=call, ret=ret)


def outcome(history: Sequence[Operation[Any, Any]], model: Model[Any, Any, Any]) -> Outcome:
    return check(history, model, timeout=30).outcome


OK, ILLEGAL = Outcome.OK, Outcome.ILLEGAL


# ---------------------------------------------------------------------------
# Known histories: register
# ---------------------------------------------------------------------------


def test_empty_history_is_linearizable() -> None:
    assert outcome([], RegisterModel()) is OK
    assert outcome([], KVModel()) is OK


def test_sequential_write_then_read() -> None:
    h = [op(1, Write(1), None, 0, 10), op(2, Read(), 1, 20, 30)]
    assert outcome(h, RegisterModel()) is OK


def test_stale_read_after_write_returned_is_illegal() -> None:
    w = op(1, Write(1), None, 0, 10)
    r = op(2, Read(), None, 20, 30)
    result = check([w, r], RegisterModel())
    assert result.outcome is ILLEGAL
    assert result.prefix == (w,)
    assert result.blocked == r
    assert result.state == 1
    assert result.partition == 0
    assert "cannot place next: client 2: Read() -> None [20, 30]" in result.explanation


@pytest.mark.parametrize("seen", [None, 1])
def test_read_concurrent_with_write_may_see_either_value(seen: int | None) -> None:
    h = [op(1, Write(1), None, 0, 30), op(2, Read(), seen, 10, 20)]
    assert outcome(h, RegisterModel()) is OK


@pytest.mark.parametrize("reverse", [False, True])
def test_overlapping_writes_in_either_order(reverse: bool) -> None:
    first, second = (2, 1) if reverse else (1, 2)
    h = [
        op(1, Write(1), None, 0, 10),
        op(2, Write(2), None, 5, 15),
        op(3, Read(), first, 20, 25),
        op(3, Read(), second, 30, 35),
    ]
    assert outcome(h, RegisterModel()) is ILLEGAL  # 2 reads, 2 different final values
    assert outcome(h[:3], RegisterModel()) is OK
    assert outcome([h[0], h[1], h[3]], RegisterModel()) is OK


def test_new_value_then_old_value_is_illegal() -> None:
    # Both reads overlap the write, but once a read saw the new value a later read
    # cannot see the old one.
    h = [
        op(1, Write(1), None, 0, 100),
        op(2, Read(), 1, 10, 20),
        op(3, Read(), None, 30, 40),
    ]
    assert outcome(h, RegisterModel()) is ILLEGAL
    # In the other order (old, then new) it is fine.
    h2 = [h[0], op(2, Read(), None, 10, 20), op(3, Read(), 1, 30, 40)]
    assert outcome(h2, RegisterModel()) is OK


def test_touching_intervals_count_as_concurrent() -> None:
    h = [op(1, Write(1), None, 0, 10), op(2, Read(), None, 10, 20)]
    assert outcome(h, RegisterModel()) is OK
    h = [op(1, Write(1), None, 0, 10), op(2, Read(), None, 11, 20)]
    assert outcome(h, RegisterModel()) is ILLEGAL


def test_register_initial_value() -> None:
    assert outcome([op(1, Read(), "x", 0, 1)], RegisterModel("x")) is OK
    assert outcome([op(1, Read(), None, 0, 1)], RegisterModel("x")) is ILLEGAL


def test_unknown_output_on_completed_operation_matches_anything() -> None:
    h = [op(1, Write(1), None, 0, 10), op(2, Read(), UNKNOWN, 20, 30)]
    assert outcome(h, RegisterModel()) is OK


# ---------------------------------------------------------------------------
# Pending operations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seen", [None, 1])
def test_pending_write_may_or_may_not_have_applied(seen: int | None) -> None:
    h = [op(1, Write(1), None, 0, None), op(2, Read(), seen, 50, 60)]
    assert outcome(h, RegisterModel()) is OK


def test_pending_write_can_apply_long_after_later_reads() -> None:
    h = [
        op(1, Write(1), None, 0, None),
        op(2, Read(), None, 10, 20),
        op(2, Read(), None, 30, 40),
        op(2, Read(), 1, 50, 60),
    ]
    assert outcome(h, RegisterModel()) is OK


def test_pending_write_cannot_unapply() -> None:
    h = [
        op(1, Write(1), None, 0, math.inf),
        op(2, Read(), 1, 10, 20),
        op(2, Read(), None, 30, 40),
    ]
    assert outcome(h, RegisterModel()) is ILLEGAL


def test_pending_write_cannot_apply_before_its_call() -> None:
    h = [op(2, Read(), 1, 0, 10), op(1, Write(1), None, 20, None)]
    assert outcome(h, RegisterModel()) is ILLEGAL


def test_pending_output_is_ignored() -> None:
    # The recorded output of a pending op is meaningless; the model gets UNKNOWN.
    pending = Operation(client_id=1, input=Read(), output=42, call=0, ret=None)
    assert pending.pending
    assert outcome([pending], RegisterModel()) is OK


def test_pending_cas_applies_only_if_it_would_succeed() -> None:
    kv = KVModel()
    base = [op(1, Put("k", 1), None, 0, 1), op(2, Cas("k", 1, 2), None, 2, None)]
    assert outcome([*base, op(3, Get("k"), 2, 10, 11)], kv) is OK
    assert outcome([*base, op(3, Get("k"), 1, 10, 11)], kv) is OK
    assert outcome([*base, op(3, Get("k"), 3, 10, 11)], kv) is ILLEGAL
    wrong = [op(1, Put("k", 5), None, 0, 1), op(2, Cas("k", 1, 2), None, 2, None)]
    assert outcome([*wrong, op(3, Get("k"), 2, 10, 11)], kv) is ILLEGAL


# ---------------------------------------------------------------------------
# Known histories: key-value store
# ---------------------------------------------------------------------------


def test_kv_lost_update_is_illegal() -> None:
    # Two read-modify-write increments both succeed from the same version.
    h = [
        op(0, Put("n", 0), None, 0, 1),
        op(1, Cas("n", 0, 1), True, 10, 20),
        op(2, Cas("n", 0, 1), True, 11, 21),
    ]
    result = check(h, KVModel())
    assert result.outcome is ILLEGAL
    assert len(result.prefix) == 2
    assert result.blocked in h[1:]
    # One of them failing is fine.
    h[2] = op(2, Cas("n", 0, 1), False, 11, 21)
    assert outcome(h, KVModel()) is OK


def test_kv_lost_write_is_illegal() -> None:
    h = [
        op(1, Put("k", "a"), None, 0, 10),
        op(2, Put("k", "b"), None, 5, 15),
        op(3, Get("k"), "b", 20, 30),
        op(3, Get("k"), "a", 40, 50),
    ]
    assert outcome(h, KVModel()) is ILLEGAL
    assert outcome(h[:3], KVModel()) is OK


def test_kv_delete_and_absent_keys() -> None:
    kv = KVModel()
    h = [
        op(1, Get("k"), None, 0, 1),
        op(1, Put("k", 1), None, 2, 3),
        op(1, Delete("k"), None, 4, 5),
        op(1, Get("k"), None, 6, 7),
        op(1, Delete("k"), None, 8, 9),
    ]
    assert outcome(h, kv) is OK
    h[3] = op(1, Get("k"), 1, 6, 7)
    assert outcome(h, kv) is ILLEGAL


def test_kv_cas_expected_none_means_absent() -> None:
    kv = KVModel()
    create = [op(1, Cas("k", None, 1), True, 0, 1), op(1, Cas("k", None, 2), False, 2, 3)]
    assert outcome([*create, op(1, Get("k"), 1, 4, 5)], kv) is OK
    assert outcome([op(1, Cas("k", None, 1), False, 0, 1)], kv) is ILLEGAL


def test_kv_cas_result_is_checked() -> None:
    kv = KVModel()
    h = [op(1, Put("k", 1), None, 0, 1), op(1, Cas("k", 2, 3), True, 2, 3)]
    assert outcome(h, kv) is ILLEGAL
    h = [op(1, Put("k", 1), None, 0, 1), op(1, Cas("k", 1, 3), UNKNOWN, 2, 3)]
    assert outcome([*h, op(1, Get("k"), 3, 4, 5)], kv) is OK


def test_kv_keys_are_independent_and_failure_names_partition() -> None:
    h = [
        op(1, Put("a", 1), None, 0, 10),
        op(2, Put("b", 1), None, 0, 10),
        op(1, Get("a"), 1, 20, 30),
        op(2, Get("b"), None, 20, 30),  # stale
    ]
    result = check(h, KVModel())
    assert result.outcome is ILLEGAL
    assert result.partition == 1
    assert result.prefix == (h[1],)
    assert result.blocked == h[3]
    assert "partition 1" in result.explanation


def test_kv_partition_groups_by_key() -> None:
    h = [op(1, Put(k, 1), None, i, i + 1) for i, k in enumerate("abab")]
    parts = KVModel().partition(h)
    assert [[o.input.key for o in p] for p in parts] == [["a", "a"], ["b", "b"]]


def test_models_satisfy_protocols() -> None:
    assert isinstance(KVModel(), PartitionedModel)
    assert isinstance(RegisterModel(), Model)
    assert not isinstance(RegisterModel(), PartitionedModel)


def test_bad_partition_is_rejected() -> None:
    class Dropping(KVModel):
        def partition(
            self, history: Sequence[Operation[KVInput, object]]
        ) -> list[list[Operation[KVInput, object]]]:
            return super().partition(history)[:1]

    h = [op(1, Put("a", 1), None, 0, 1), op(1, Put("b", 1), None, 0, 1)]
    with pytest.raises(ValueError, match="exactly one part"):
        check(h, Dropping())


def test_invalid_times_are_rejected() -> None:
    with pytest.raises(ValueError, match="return before call"):
        check([op(1, Read(), None, 10, 5)], RegisterModel())
    with pytest.raises(ValueError, match="invalid call time"):
        check([op(1, Read(), None, math.nan, 5)], RegisterModel())


def test_user_defined_queue_model() -> None:
    class QueueModel:
        def init(self) -> tuple[int, ...]:
            return ()

        def step(
            self, state: tuple[int, ...], input: tuple[str, int], output: object
        ) -> tuple[bool, tuple[int, ...]]:
            kind, value = input
            if kind == "enq":
                return True, (*state, value)
            head = state[0] if state else None
            return (output is UNKNOWN or output == head), state[1:]

    q = QueueModel()
    enqs = [op(1, ("enq", 1), None, 0, 10), op(2, ("enq", 2), None, 0, 10)]
    assert outcome([*enqs, op(3, ("deq", 0), 2, 20, 30), op(3, ("deq", 0), 1, 40, 50)], q) is OK
    assert outcome([*enqs, op(3, ("deq", 0), 2, 20, 30), op(3, ("deq", 0), 2, 40, 50)], q) is (
        ILLEGAL
    )


def test_long_history_needs_no_recursion() -> None:
    h = [op(1, Write(i), None, 2 * i, 2 * i + 1) for i in range(5_000)]
    h.append(op(2, Read(), 4_999, 10_000, 10_001))
    assert outcome(h, RegisterModel()) is OK


def test_explanation_shows_only_the_end_of_a_long_prefix() -> None:
    h = [op(1, Write(i), None, 2 * i, 2 * i + 1) for i in range(20)]
    h.append(op(2, Read(), 3, 100, 101))
    result = check(h, RegisterModel())
    assert result.outcome is ILLEGAL
    assert len(result.prefix) == 20
    assert "20 operation(s), the last 8 being:" in result.explanation
    assert "Write(value=19)" in result.explanation
    assert "Write(value=0)" not in result.explanation


# ---------------------------------------------------------------------------
# Timeout
# ---------------------------------------------------------------------------


def _hard_history(writers: int) -> list[Operation[Any, Any]]:
    """Many overlapping writes, then a read of a value nobody wrote: the checker
    has to refute every (subset, last value) pair before saying illegal."""
    h = [op(i, Write(i), None, 0, 100) for i in range(writers)]
    h.append(op(writers, Read(), -1, 200, 300))
    return h


def test_timeout_gives_unknown() -> None:
    result = check(_hard_history(24), RegisterModel(), timeout=0.2)
    assert result.outcome is Outcome.UNKNOWN
    assert "timed out" in result.explanation
    assert check(_hard_history(3), RegisterModel(), timeout=0).outcome is Outcome.UNKNOWN


def test_small_hard_history_is_refuted() -> None:
    assert outcome(_hard_history(8), RegisterModel()) is ILLEGAL


# ---------------------------------------------------------------------------
# Randomized: simulate a sequential KV store under random concurrency
# ---------------------------------------------------------------------------


def random_kv_input(rng: random.Random, keys: Sequence[str], values: int) -> KVInput:
    key = rng.choice(keys)
    kind = rng.random()
    if kind < 0.3:
        return Put(key, rng.randint(1, values))
    if kind < 0.7:
        return Get(key)
    if kind < 0.9:
        expected = rng.choice([None, *range(1, values + 1)])
        return Cas(key, expected, rng.randint(1, values))
    return Delete(key)


def simulate_kv(
    rng: random.Random,
    n_ops: int,
    *,
    clients: int,
    keys: int,
    values: int = 4,
    pending_rate: float = 0.03,
    max_pending: int = 4,
) -> list[Operation[KVInput, object]]:
    """A linearizable history by construction.

    Every client issues operations one after another; each takes effect at a
    random instant inside its interval (pending ones take effect at a random later
    instant, or never), and outputs come from a sequential dict applied in the
    order of those instants.  Pending operations are capped: each one stays
    concurrent with everything after it, so refuting a mutated history costs up
    to 2**pending times more.
    """
    names = [f"k{i}" for i in range(keys)]
    free_at = [rng.randint(0, 5) for _ in range(clients)]
    planned: list[tuple[int, int, KVInput, int, int | None, bool]] = []
    pending_left = max_pending
    for _ in range(n_ops):
        client = min(range(clients), key=lambda c: (free_at[c], rng.random()))
        call = free_at[client] + rng.randint(0, 3)
        inp = random_kv_input(rng, names, values)
        if pending_left and rng.random() < pending_rate:
            pending_left -= 1
            applied = rng.random() < 0.5
            lin = call + rng.randint(0, 60)
            planned.append((client, call, inp, lin, None, applied))
            free_at[client] = call + 15  # the client gave up and moved on
        else:
            lin = call + rng.randint(0, 6)
            ret = lin + rng.randint(0, 6)
            planned.append((client, call, inp, lin, ret, True))
            free_at[client] = ret
    outputs: dict[int, object] = {}
    store: dict[Hashable, Hashable] = {}
    for i in sorted(range(len(planned)), key=lambda i: planned[i][3]):
        _, _, inp, _, _, applied = planned[i]
        if not applied:
            continue
        if isinstance(inp, Put):
            store[inp.key] = inp.value
            outputs[i] = None
        elif isinstance(inp, Get):
            outputs[i] = store.get(inp.key)
        elif isinstance(inp, Cas):
            swapped = store.get(inp.key) == inp.expected
            if swapped:
                store[inp.key] = inp.new
            outputs[i] = swapped
        else:
            store.pop(inp.key, None)
            outputs[i] = None
    return [
        Operation(client_id=client, input=inp, call=call)
        if ret is None
        else Operation(client_id=client, input=inp, output=outputs[i], call=call, ret=ret)
        for i, (client, call, inp, _, ret, _) in enumerate(planned)
    ]


@PROPERTY
@given(
    seed=st.integers(0, 2**32),
    n_ops=st.integers(0, 120),
    clients=st.integers(1, 6),
    keys=st.integers(1, 3),
)
def test_simulated_histories_are_linearizable(
    seed: int, n_ops: int, clients: int, keys: int
) -> None:
    rng = random.Random(seed)
    h = simulate_kv(rng, n_ops, clients=clients, keys=keys)
    result = check(h, KVModel(), timeout=30)
    assert result.outcome is OK, result.explanation


@PROPERTY
@given(
    seed=st.integers(0, 2**32),
    n_ops=st.integers(1, 120),
    clients=st.integers(1, 6),
)
def test_get_of_a_never_written_value_is_illegal(seed: int, n_ops: int, clients: int) -> None:
    rng = random.Random(seed)
    h = simulate_kv(rng, n_ops, clients=clients, keys=2)
    gets = [i for i, o in enumerate(h) if isinstance(o.input, Get) and not o.pending]
    if not gets:
        h.append(op(99, Get("k0"), None, 10_000, 10_001))
        gets = [len(h) - 1]
    i = rng.choice(gets)
    h[i] = op(h[i].client_id, h[i].input, "never-written", h[i].call, h[i].ret)
    result = check(h, KVModel(), timeout=30)
    assert result.outcome is ILLEGAL
    assert h[i] not in result.prefix
    assert result.blocked is not None


@PROPERTY
@given(
    seed=st.integers(0, 2**32),
    n_ops=st.integers(5, 80),
    clients=st.integers(2, 6),
)
def test_random_mutation_is_usually_illegal(seed: int, n_ops: int, clients: int) -> None:
    rng = random.Random(seed)
    # Changing one read to another plausible value may or may not keep the
    # history linearizable, so only the verdict's sanity is asserted here.
    h = simulate_kv(rng, n_ops, clients=clients, keys=1, pending_rate=0.0)
    gets = [i for i, o in enumerate(h) if isinstance(o.input, Get)]
    if not gets:
        return
    i = rng.choice(gets)
    new = rng.choice([v for v in (None, 1, 2, 3, 4) if v != h[i].output])
    h[i] = op(h[i].client_id, h[i].input, new, h[i].call, h[i].ret)
    result = check(h, KVModel(), timeout=30)
    assert result.outcome in (OK, ILLEGAL)
    event(f"mutated: {result.outcome}")
    if result.outcome is ILLEGAL:
        assert result.blocked is not None
        assert len(result.prefix) < len(h)


def test_two_thousand_ops_ten_keys_eight_clients() -> None:
    h = simulate_kv(random.Random(20240601), 2_000, clients=8, keys=10, pending_rate=0.005)
    assert any(o.pending for o in h)
    result = check(h, KVModel(), timeout=60)
    assert result.outcome is OK, result.explanation


# ---------------------------------------------------------------------------
# Randomized: agreement with a brute-force oracle on small arbitrary histories
# ---------------------------------------------------------------------------


class Unpartitioned:
    """KVModel without ``partition``: exercises the search on multi-key states."""

    def __init__(self) -> None:
        self.inner = KVModel()

    def init(self) -> Any:
        return self.inner.init()

    def step(self, state: Any, input: KVInput, output: object) -> tuple[bool, Any]:
        return self.inner.step(state, input, output)


def brute_force(history: Sequence[Operation[Any, Any]], model: Model[Any, Any, Any]) -> bool:
    """Try every subset of pending ops and every real-time-respecting order."""
    done = [o for o in history if not o.pending]
    pending = [o for o in history if o.pending]

    def ret(o: Operation[Any, Any]) -> float:
        return math.inf if o.pending or o.ret is None else o.ret

    for r in range(len(pending) + 1):
        for chosen in combinations(pending, r):
            for order in permutations([*done, *chosen]):
                if any(
                    ret(order[q]) < order[p].call
                    for p in range(len(order))
                    for q in range(p + 1, len(order))
                ):
                    continue
                state = model.init()
                for o in order:
                    legal, state = model.step(state, o.input, UNKNOWN if o.pending else o.output)
                    if not legal:
                        break
                else:
                    return True
    return False


_values = st.sampled_from([1, 2])


@st.composite
def small_kv_histories(draw: st.DrawFn) -> list[Operation[Any, Any]]:
    history: list[Operation[Any, Any]] = []
    for client in range(draw(st.integers(0, 6))):
        call = draw(st.integers(0, 8))
        ret = None if draw(st.integers(0, 5)) == 0 else call + draw(st.integers(0, 8))
        key = draw(st.sampled_from("ab"))
        inp, out = draw(
            st.one_of(
                st.tuples(st.builds(Put, st.just(key), _values), st.none()),
                st.tuples(st.builds(Get, st.just(key)), st.none() | _values),
                st.tuples(
                    st.builds(Cas, st.just(key), st.none() | _values, _values), st.booleans()
                ),
                st.tuples(st.builds(Delete, st.just(key)), st.none()),
            )
        )
        history.append(op(client, inp, out, call, ret))
    return history


@ORACLE
@given(small_kv_histories())
def test_kv_agrees_with_brute_force(history: list[Operation[Any, Any]]) -> None:
    expected = OK if brute_force(history, KVModel()) else ILLEGAL
    event(f"expected: {expected}")
    assert check(history, KVModel()).outcome is expected
    assert check(history, Unpartitioned()).outcome is expected


@st.composite
def small_register_histories(draw: st.DrawFn) -> list[Operation[Any, Any]]:
    history: list[Operation[Any, Any]] = []
    for client in range(draw(st.integers(0, 6))):
        call = draw(st.integers(0, 8))
        ret = None if draw(st.integers(0, 5)) == 0 else call + draw(st.integers(0, 8))
        if draw(st.booleans()):
            history.append(op(client, Write(draw(_values)), None, call, ret))
        else:
            history.append(op(client, Read(), draw(st.none() | _values), call, ret))
    return history


@ORACLE
@given(small_register_histories())
def test_register_agrees_with_brute_force(history: list[Operation[Any, Any]]) -> None:
    expected = OK if brute_force(history, RegisterModel()) else ILLEGAL
    event(f"expected: {expected}")
    result = check(history, RegisterModel())
    assert result.outcome is expected
    if result.outcome is ILLEGAL:
        assert result.blocked is not None
        assert result.blocked not in result.prefix
        # The reported prefix really is a valid sequential run.
        state = RegisterModel().init()
        for o in result.prefix:
            legal, state = RegisterModel().step(state, o.input, UNKNOWN if o.pending else o.output)
            assert legal
        assert state == result.state


# ---------------------------------------------------------------------------
# Recorder and exporter
# ---------------------------------------------------------------------------


def test_recorder_with_fake_clock() -> None:
    ticks = count(100)
    rec: HistoryRecorder[KVInput, object] = HistoryRecorder(clock=lambda: next(ticks))
    a = rec.call(1, Put("k", 1))
    b = rec.call(2, Get("k"))
    rec.ret(a, None)
    c = rec.call(3, Put("k", 2))  # never returns
    rec.ret(b, 1)
    h = rec.history()
    assert h == [
        Operation(client_id=1, input=Put("k", 1), output=None, call=100, ret=102),
        Operation(client_id=2, input=Get("k"), output=1, call=101, ret=104),
        Operation(client_id=3, input=Put("k", 2), call=103),
    ]
    assert h[2].pending
    assert h[2].output is UNKNOWN
    with pytest.raises(ValueError, match="already returned"):
        rec.ret(a, None)
    with pytest.raises(KeyError):
        rec.ret(c + 1, None)
    assert check(h, KVModel()).outcome is OK


def test_recorder_in_async_test() -> None:
    async def scenario() -> list[Operation[KVInput, object]]:
        rec: HistoryRecorder[KVInput, object] = HistoryRecorder()
        store: dict[Hashable, Hashable] = {}
        lock = asyncio.Lock()

        async def client(cid: int) -> None:
            for i in range(20):
                inp: KVInput = Put("k", cid * 100 + i) if i % 2 else Get("k")
                token = rec.call(cid, inp)
                await asyncio.sleep(0)
                async with lock:
                    if isinstance(inp, Put):
                        store["k"] = inp.value
                        out: object = None
                    else:
                        out = store.get("k")
                await asyncio.sleep(0)
                rec.ret(token, out)

        async def timed_out() -> None:
            rec.call(99, Put("k", -1))  # request lost, no response
            await asyncio.sleep(0)

        await asyncio.gather(*(client(c) for c in range(4)), timed_out())
        return rec.history()

    h = asyncio.run(scenario())
    assert len(h) == 81
    assert all(isinstance(o.call, int) for o in h)
    assert sum(o.pending for o in h) == 1
    assert check(h, KVModel(), timeout=30).outcome is OK


def test_porcupine_json_shape(tmp_path: Path) -> None:
    h = [
        op(1, Put("k", 1), None, 10, 20),
        op(2, Get("k"), 1, 15, 30),
        op(3, Cas("k", 1, 2), None, 16, None),
        op(4, Delete("k"), UNKNOWN, 40, 50),
    ]
    target = tmp_path / "history.json"
    text = to_porcupine_json(h, target)
    assert target.read_text(encoding="utf-8") == text
    assert json.loads(text) == [
        {
            "client_id": 1,
            "input": {"type": "put", "key": "k", "value": 1},
            "call": 10,
            "output": None,
            "return": 20,
        },
        {
            "client_id": 2,
            "input": {"type": "get", "key": "k"},
            "call": 15,
            "output": 1,
            "return": 30,
        },
        {
            "client_id": 3,
            "input": {"type": "cas", "key": "k", "expected": 1, "new": 2},
            "call": 16,
            "output": None,
            "return": None,
        },
        {
            "client_id": 4,
            "input": {"type": "delete", "key": "k"},
            "call": 40,
            "output": None,
            "return": 50,
            "output_unknown": True,
        },
    ]


def test_porcupine_json_ranks_fractional_times() -> None:
    h = [
        op(1, Write(1), None, 0.5, 1.25),
        op(2, Read(), 1, 1.25, 3.0),
        op(3, Write(2), None, 0.1, math.inf),
    ]
    records = json.loads(to_porcupine_json(h))
    assert [(r["call"], r["return"]) for r in records] == [(1, 2), (2, 3), (0, None)]
    assert records[1]["input"] == {"type": "read"}
    integral = json.loads(to_porcupine_json([op(1, Read(), None, 3.0, 7.0)]))
    assert (integral[0]["call"], integral[0]["return"]) == (3, 7)


def test_unknown_sentinel() -> None:
    assert repr(UNKNOWN) == "UNKNOWN"
    assert isinstance(UNKNOWN, Unknown)
