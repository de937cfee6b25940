"""Linearizability checking for recorded concurrent histories.

A *history* is a list of :class:`Operation` records (who called what, when it was
called, when it returned and what it returned).  :func:`check` decides whether
the history is linearizable with respect to a sequential :class:`Model`: whether
every operation can be assigned a single instant between its call and its return
such that executing the operations one at a time, in the order of those instants,
against the model produces exactly the recorded outputs.

The search is the tree search of Wing & Gong with the memoization of Lowe, the
same algorithm as the Porcupine checker:

* J. M. Wing and C. Gong, "Testing and verifying concurrent objects", Journal of
  Parallel and Distributed Computing 17(1-2):164-182, 1993.
* G. Lowe, "Testing for linearizability", Concurrency and Computation: Practice
  and Experience 29(4):e3928, 2017.
* A. Horn and D. Kroening, "Faster linearizability checking via
  P-compositionality", FORTE 2015 (per-key partitioning, :meth:`KVModel.partition`).

Time semantics: intervals are closed, so an operation that returns at the very
instant another one is called counts as concurrent with it (the conservative
choice, which Porcupine makes too).  An operation whose ``ret`` is ``None`` or
``+inf`` is *pending* (e.g. it timed out): it may take effect at any instant after
its call or never, and its output is unknown.

Example::

    rec = HistoryRecorder[KVInput, object]()
    t = rec.call(client_id=1, input=Put("k", 1))
    rec.ret(t, None)
    result = check(rec.history(), KVModel(), timeout=10.0)
    assert result.outcome is Outcome.OK, result.explanation
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from itertools import count
from pathlib import Path
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, runtime_checkable

import immutables
import msgspec

__all__ = [
    "UNKNOWN",
    "Cas",
    "CheckResult",
    "Delete",
    "Get",
    "HistoryRecorder",
    "KVInput",
    "KVModel",
    "KVState",
    "Model",
    "Operation",
    "Outcome",
    "PartitionedModel",
    "Put",
    "Read",
    "RegisterInput",
    "RegisterModel",
    "Unknown",
    "Write",
    "check",
    "to_porcupine_json",
]

S = TypeVar("S", bound=Hashable)
In = TypeVar("In")
Out = TypeVar("Out")
In_co = TypeVar("In_co", covariant=True)
Out_co = TypeVar("Out_co", covariant=True)
In_contra = TypeVar("In_contra", contravariant=True)
Out_contra = TypeVar("Out_contra", contravariant=True)


class Unknown(enum.Enum):
    """Type of :data:`UNKNOWN`, the "output not observed" marker."""

    UNKNOWN = "unknown"

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = Unknown.UNKNOWN
"""Output of an operation whose result was never observed.

Pending operations always reach :meth:`Model.step` with this output; a completed
operation may also carry it (e.g. a fire-and-forget write).  Models must accept
any output for it, i.e. return ``(True, state_after_executing_input)``.
"""


class Operation(msgspec.Struct, Generic[In_co, Out_co], frozen=True, kw_only=True):
    """One call of one client.

    ``call`` and ``ret`` are timestamps from a single monotonic clock (any unit,
    ints or floats).  ``ret`` of ``None`` or ``math.inf`` marks a *pending*
    operation: it may have taken effect at any time after ``call``, or never, and
    its ``output`` is ignored.  ``output`` defaults to :data:`UNKNOWN`.
    """

    client_id: int
    input: In_co
    output: Out_co | Unknown = UNKNOWN
    call: float
    ret: float | None = None

    @property
    def pending(self) -> bool:
        """True if the operation never returned."""
        return self.ret is None or self.ret == math.inf


@runtime_checkable
class Model(Protocol[S, In_contra, Out_contra]):
    """Sequential specification of an object.

    States must be immutable, hashable and compare by value: the checker memoizes
    on ``(set of linearized operations, state)``.
    """

    def init(self) -> S:
        """The initial state."""
        ...

    def step(self, state: S, input: In_contra, output: Out_contra | Unknown) -> tuple[bool, S]:
        """Run ``input`` on ``state``: ``(output is what the spec allows, next state)``.

        ``output`` may be :data:`UNKNOWN`, in which case any output is allowed.
        """
        ...


@runtime_checkable
class PartitionedModel(Model[S, In, Out], Protocol[S, In, Out]):
    """A model whose histories split into independently checkable sub-histories.

    A history is linearizable iff every partition is (P-compositionality), which
    makes checking much cheaper, e.g. for a key-value store partitioned by key.
    """

    def partition(
        self, history: Sequence[Operation[In, Out]]
    ) -> Sequence[Sequence[Operation[In, Out]]]:
        """Split ``history``; every operation must land in exactly one part."""
        ...


class Outcome(enum.StrEnum):
    """Verdict of :func:`check`."""

    OK = "ok"
    """The history is linearizable."""
    ILLEGAL = "illegal"
    """No linearization exists."""
    UNKNOWN = "unknown"
    """The timeout expired before the search finished."""


class CheckResult(msgspec.Struct, Generic[In_co, Out_co], frozen=True, kw_only=True):
    """Result of :func:`check`.

    For :attr:`Outcome.ILLEGAL`, ``partition`` is the index of the failing
    partition, ``prefix`` the longest linearizable prefix found in it (in
    linearization order), ``state`` the model state after that prefix and
    ``blocked`` the operation that had to come next but could not be placed.
    """

    outcome: Outcome
    partition: int | None = None
    prefix: tuple[Operation[In_co, Out_co], ...] = ()
    blocked: Operation[In_co, Out_co] | None = None
    state: Any = None
    explanation: str = ""


# ---------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------

_DEADLINE_CHECK_EVERY = 2048
_EXPLAIN_LAST = 8


class _Timeout(Exception):
    pass


class _Failure(msgspec.Struct, frozen=True):
    prefix: list[int]
    blocked: int
    state: Any


def _describe(op: Operation[Any, Any]) -> str:
    if op.pending:
        return f"client {op.client_id}: {op.input!r} -> ? [{op.call}, inf)"
    return f"client {op.client_id}: {op.input!r} -> {op.output!r} [{op.call}, {op.ret}]"


def _validate(history: Sequence[Operation[Any, Any]]) -> None:
    for op in history:
        if not math.isfinite(op.call):
            raise ValueError(f"invalid call time in {op!r}")
        if op.ret is not None and (math.isnan(op.ret) or op.ret < op.call):
            raise ValueError(f"return before call in {op!r}")


def _search(
    ops: Sequence[Operation[Any, Out]],
    model: Model[S, Any, Out],
    deadline: float | None,
) -> _Failure | None:
    """Check one partition; ``None`` if linearizable, else the deepest dead end.

    The history is kept as a doubly linked list of call/return events in time
    order (index 0 is the sentinel).  We walk it from the head: at a call event
    we try to linearize that operation now (``step`` accepts it and the
    ``(linearized set, state)`` pair is new), in which case its call and return
    events are unlinked and we restart from the head; at the return event of an
    operation still unlinearized we are stuck and backtrack to the last choice.
    Unlinking keeps each event's own links, so relinking in LIFO order restores
    the list exactly ("dancing links").
    """
    n = len(ops)
    inf = math.inf
    events = sorted(
        [(op.call, 0, i) for i, op in enumerate(ops)]
        + [(inf if op.pending else op.ret, 1, i) for i, op in enumerate(ops)]
    )
    size = 2 * n + 1
    nxt = list(range(1, size + 1))
    nxt[-1] = 0
    prv = list(range(-1, size - 1))
    prv[0] = size - 1
    op_of = [0] * size
    is_call = [False] * size
    partner = [0] * size
    call_entry = [0] * n
    for pos, (_, kind, i) in enumerate(events, start=1):
        op_of[pos] = i
        if kind == 0:
            is_call[pos] = True
            call_entry[i] = pos
        else:
            partner[call_entry[i]] = pos
    pending = [op.pending for op in ops]
    inputs = [op.input for op in ops]
    outputs: list[Out | Unknown] = [UNKNOWN if op.pending else op.output for op in ops]
    bits = [1 << i for i in range(n)]

    step = model.step
    state = model.init()
    linearized = 0
    cache: set[tuple[int, S]] = set()
    stack: list[tuple[int, S]] = []  # (call event, state before it)
    best: _Failure | None = None
    iterations = 0
    entry = nxt[0]
    while entry != 0:
        iterations += 1
        if (
            deadline is not None
            and iterations % _DEADLINE_CHECK_EVERY == 0
            and time.monotonic() >= deadline
        ):
            raise _Timeout
        i = op_of[entry]
        if is_call[entry]:
            legal, new_state = step(state, inputs[i], outputs[i])
            if legal:
                key = (linearized | bits[i], new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state = new_state
                    linearized = key[0]
                    # Unlink the call event, then its return event.
                    ret_entry = partner[entry]
                    nxt[prv[entry]] = nxt[entry]
                    prv[nxt[entry]] = prv[entry]
                    nxt[prv[ret_entry]] = nxt[ret_entry]
                    prv[nxt[ret_entry]] = prv[ret_entry]
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
            continue
        if pending[i]:
            # Return events of pending operations sort after every real return
            # event, so all completed operations are linearized; the remaining
            # pending ones simply never took effect.
            return None
        # Operation i must have taken effect by now but could not: dead end.
        if best is None or len(stack) > len(best.prefix):
            best = _Failure([op_of[e] for e, _ in stack], i, state)
        if not stack:
            return best
        entry, state = stack.pop()
        linearized ^= bits[op_of[entry]]
        # Relink in reverse order of unlinking.
        ret_entry = partner[entry]
        nxt[prv[ret_entry]] = ret_entry
        prv[nxt[ret_entry]] = ret_entry
        nxt[prv[entry]] = entry
        prv[nxt[entry]] = entry
        entry = nxt[entry]
    return None


def check(
    history: Sequence[Operation[In, Out]],
    model: Model[S, In, Out],
    timeout: float | None = None,
) -> CheckResult[In, Out]:
    """Decide whether ``history`` is linearizable with respect to ``model``.

    If ``model`` has a ``partition`` method (see :class:`PartitionedModel`) each
    partition is checked separately.  ``timeout`` (seconds, ``None`` for no
    limit) bounds the whole check; on expiry the outcome is
    :attr:`Outcome.UNKNOWN`.  Runs iteratively, so history length is not bounded
    by the recursion limit; worst-case time is exponential in the number of
    concurrent operations, as the problem is NP-complete.  Pending operations
    stay concurrent with everything after their call, so each one can double the
    work of refuting an illegal history: keep them few per partition.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    history = list(history)
    _validate(history)
    if isinstance(model, PartitionedModel):
        parts: Sequence[Sequence[Operation[In, Out]]] = model.partition(history)
        if sum(len(p) for p in parts) != len(history):
            raise ValueError("model.partition() must put every operation in exactly one part")
    else:
        parts = [history]
    for index, part in enumerate(parts):
        if deadline is not None and time.monotonic() >= deadline:
            return _unknown(timeout)
        try:
            failure = _search(part, model, deadline)
        except _Timeout:
            return _unknown(timeout)
        if failure is not None:
            return _illegal(index, part, failure)
    return CheckResult(outcome=Outcome.OK)


def _unknown(timeout: float | None) -> CheckResult[Any, Any]:
    return CheckResult(
        outcome=Outcome.UNKNOWN,
        explanation=f"timed out after {timeout}s before the search finished",
    )


def _illegal(
    index: int, part: Sequence[Operation[In, Out]], failure: _Failure
) -> CheckResult[In, Out]:
    prefix = tuple(part[i] for i in failure.prefix)
    blocked = part[failure.blocked]
    shown = prefix[-_EXPLAIN_LAST:]
    lines = [
        f"not linearizable (partition {index}): longest linearizable prefix has "
        f"{len(prefix)} operation(s)"
        + (f", the last {len(shown)} being:" if len(shown) < len(prefix) else ":")
    ]
    lines += [f"  {_describe(op)}" for op in shown]
    lines.append(f"model state after it: {failure.state!r}")
    lines.append(f"cannot place next: {_describe(blocked)}")
    return CheckResult(
        outcome=Outcome.ILLEGAL,
        partition=index,
        prefix=prefix,
        blocked=blocked,
        state=failure.state,
        explanation="\n".join(lines),
    )


# ---------------------------------------------------------------------------
# Ready-made models
# ---------------------------------------------------------------------------


class Put(msgspec.Struct, frozen=True, tag=str.lower):
    """``put(key, value)``; output ignored (``None`` by convention)."""

    key: Hashable
    value: Hashable


class Get(msgspec.Struct, frozen=True, tag=str.lower):
    """``get(key)``; output is the value, or ``None`` if the key is absent."""

    key: Hashable


class Cas(msgspec.Struct, frozen=True, tag=str.lower):
    """``cas(key, expected, new)``; output is whether the swap happened.

    ``expected=None`` means "only if the key is absent".
    """

    key: Hashable
    expected: Hashable
    new: Hashable


class Delete(msgspec.Struct, frozen=True, tag=str.lower):
    """``delete(key)``; output ignored (``None`` by convention)."""

    key: Hashable


KVInput: TypeAlias = Put | Get | Cas | Delete
KVState: TypeAlias = immutables.Map[Hashable, Hashable]


class KVModel:
    """Linearizable key-value map, partitioned by key.

    Inputs are :class:`Put`, :class:`Get`, :class:`Cas` and :class:`Delete`.
    Values must be hashable and not ``None`` (``None`` means "absent"); outputs
    are compared with ``==``.
    """

    def init(self) -> KVState:
        """Empty map."""
        return immutables.Map()

    def step(self, state: KVState, input: KVInput, output: object) -> tuple[bool, KVState]:
        """Apply one operation."""
        if isinstance(input, Get):
            return (output is UNKNOWN or output == state.get(input.key)), state
        if isinstance(input, Put):
            return True, state.set(input.key, input.value)
        if isinstance(input, Cas):
            swapped = state.get(input.key) == input.expected
            if output is not UNKNOWN and output != swapped:
                return False, state
            return True, (state.set(input.key, input.new) if swapped else state)
        if isinstance(input, Delete):
            return True, (state.delete(input.key) if input.key in state else state)
        raise TypeError(f"not a KV input: {input!r}")

    def partition(
        self, history: Sequence[Operation[KVInput, object]]
    ) -> list[list[Operation[KVInput, object]]]:
        """One partition per key, in order of first appearance."""
        by_key: dict[Hashable, list[Operation[KVInput, object]]] = {}
        for op in history:
            by_key.setdefault(op.input.key, []).append(op)
        return list(by_key.values())


class Read(msgspec.Struct, frozen=True, tag=str.lower):
    """Read the register; output is its value."""


class Write(msgspec.Struct, frozen=True, tag=str.lower):
    """Write the register; output ignored."""

    value: Hashable


RegisterInput: TypeAlias = Read | Write


class RegisterModel:
    """A single read/write register holding ``initial`` at first."""

    def __init__(self, initial: Hashable = None) -> None:
        self.initial = initial

    def init(self) -> Hashable:
        """The initial value."""
        return self.initial

    def step(self, state: Hashable, input: RegisterInput, output: object) -> tuple[bool, Hashable]:
        """Apply one operation."""
        if isinstance(input, Read):
            return (output is UNKNOWN or output == state), state
        if isinstance(input, Write):
            return True, input.value
        raise TypeError(f"not a register input: {input!r}")


# ---------------------------------------------------------------------------
# Recording and export
# ---------------------------------------------------------------------------


class HistoryRecorder(Generic[In, Out]):
    """Collects a history from a running test (threads or asyncio tasks).

    Call :meth:`call` right before issuing a request and :meth:`ret` right after
    its response arrives; requests that never got a response (timeouts,
    cancellations) are left without :meth:`ret` and become pending operations.
    Timestamps come from ``clock`` (default :func:`time.monotonic_ns`).
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = count()
        self._calls: dict[int, tuple[int, In, int]] = {}
        self._returns: dict[int, tuple[Out, int]] = {}

    def call(self, client_id: int, input: In) -> int:
        """Record an invocation; returns a token for :meth:`ret`."""
        with self._lock:
            token = next(self._tokens)
            self._calls[token] = (client_id, input, self._clock())
        return token

    def ret(self, token: int, output: Out) -> None:
        """Record the response to the invocation identified by ``token``."""
        now = self._clock()
        with self._lock:
            if token not in self._calls:
                raise KeyError(f"unknown token {token}")
            if token in self._returns:
                raise ValueError(f"token {token} already returned")
            self._returns[token] = (output, now)

    def history(self) -> list[Operation[In, Out]]:
        """All operations so far, in call order; unreturned ones are pending."""
        with self._lock:
            ops: list[Operation[In, Out]] = []
            for token, (client_id, input, call) in self._calls.items():
                if token in self._returns:
                    output, ret = self._returns[token]
                    ops.append(
                        Operation(
                            client_id=client_id, input=input, output=output, call=call, ret=ret
                        )
                    )
                else:
                    ops.append(Operation(client_id=client_id, input=input, call=call))
            return ops


def _integer_times(history: Sequence[Operation[Any, Any]]) -> dict[float, int]:
    """Map every finite timestamp to an integer, preserving order and ties."""
    times = {op.call for op in history}
    times.update(op.ret for op in history if op.ret is not None and not op.pending)
    if all(float(t).is_integer() for t in times):
        return {t: int(t) for t in times}
    return {t: rank for rank, t in enumerate(sorted(times))}


def to_porcupine_json(
    history: Sequence[Operation[Any, Any]], path: str | Path | None = None
) -> str:
    """Serialize ``history`` for an external (e.g. Go/Porcupine) checker.

    The document is a JSON array with one object per operation::

        {"client_id": 3, "input": {"type": "put", "key": "k", "value": 1},
         "call": 1200, "output": null, "return": 1350}

    * ``input``/``output`` are encoded by msgspec; the ready-made inputs are
      tagged objects (``"type"``: ``put``, ``get``, ``cas``, ``delete``, ``read``
      or ``write``) carrying their fields.
    * ``call``/``return`` are integers (Porcupine uses ``int64``): integral
      timestamps are kept as they are, otherwise every timestamp is replaced by
      its rank among all distinct timestamps, which preserves the real-time order
      and ties (the only thing the checker uses).
    * A pending operation has ``"return": null`` and ``"output": null``; map it
      to ``math.MaxInt64`` and an "unknown" output on the Go side.  A completed
      operation with an :data:`UNKNOWN` output has ``"output": null`` and an
      extra ``"output_unknown": true``.

    If ``path`` is given the document is also written there (UTF-8).
    """
    times = _integer_times(history)
    records: list[dict[str, Any]] = []
    for op in history:
        record: dict[str, Any] = {
            "client_id": op.client_id,
            "input": op.input,
            "call": times[op.call],
            "output": None if op.pending or op.output is UNKNOWN else op.output,
            "return": None if op.pending or op.ret is None else times[op.ret],
        }
        if not op.pending and op.output is UNKNOWN:
            record["output_unknown"] = True
        records.append(record)
    text = msgspec.json.encode(records).decode()
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
