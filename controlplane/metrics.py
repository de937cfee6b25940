"""Small, dependency-free metrics: counters, gauges, histograms and a Prometheus text renderer.

Metrics are plain objects; a :class:`Registry` collects those registered with it at scrape time
and renders them in the Prometheus text exposition format 0.0.4. Values that already live
elsewhere (a Raft member's term, its indexes, a peer's lag) are not pushed into gauges but read
when scraped, through :class:`CallbackMetric`.

Updates are not locked: record them from one thread (the event loop). Time spent in a worker
thread can be measured there with :func:`timed` and observed back on the loop.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "CallbackMetric",
    "Collector",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricFamily",
    "MetricType",
    "NodeMetrics",
    "Registry",
    "Sample",
    "format_value",
    "timed",
]

_log = logging.getLogger("controlplane.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The ``Content-Type`` of :meth:`Registry.render`'s output."""

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Latency buckets in seconds, 0.1 ms to 10 s (an implicit ``+Inf`` bucket follows)."""

MetricType = Literal["counter", "gauge", "histogram", "untyped"]
LabelPairs = tuple[tuple[str, str], ...]

ChildT = TypeVar("ChildT")
C = TypeVar("C", bound="Collector")

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class Sample:
    """One line of the exposition: ``name + suffix``, its labels and its value."""

    suffix: str
    """Appended to the family name: ``""``, or ``_bucket``, ``_sum``, ``_count``."""
    labels: LabelPairs
    value: float


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """A metric as scraped: name, help text, type and samples."""

    name: str
    help: str
    type: MetricType
    samples: tuple[Sample, ...]


class Collector(Protocol):
    """Anything that yields metric families when scraped."""

    def collect(self) -> Iterable[MetricFamily]:
        """The current families (evaluated at scrape time)."""
        ...


def _check_name(name: str) -> None:
    if not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")


def _check_labelnames(labelnames: Sequence[str], reserved: Iterable[str] = ()) -> tuple[str, ...]:
    names = tuple(labelnames)
    for label in names:
        if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
            raise ValueError(f"invalid label name {label!r}")
        if label in reserved:
            raise ValueError(f"label name {label!r} is reserved")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names in {names!r}")
    return names


class _Family(Generic[ChildT]):
    """A named metric with optional labels; each label-value combination is one child."""

    _type: MetricType = "untyped"
    _reserved: tuple[str, ...] = ()

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        _check_name(name)
        self.name = name
        self.help = help
        self.labelnames = _check_labelnames(labelnames, self._reserved)
        self._children: dict[tuple[str, ...], ChildT] = {}
        self._unlabeled: ChildT | None = None if self.labelnames else self._new_child()

    def _new_child(self) -> ChildT:
        raise NotImplementedError

    def labels(self, *values: str, **by_name: str) -> ChildT:
        """The child for these label values (positionally or by name), created on first use."""
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels")
        if by_name:
            if values:
                raise ValueError("pass label values by position or by name, not both")
            if set(by_name) != set(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {self.labelnames!r}")
            values = tuple(by_name[n] for n in self.labelnames)
        elif len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames!r}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _only(self) -> ChildT:
        if self._unlabeled is None:
            raise ValueError(f"{self.name} has labels: use .labels(...)")
        return self._unlabeled

    def _items(self) -> list[tuple[LabelPairs, ChildT]]:
        if self._unlabeled is not None:
            return [((), self._unlabeled)]
        return [(tuple(zip(self.labelnames, k, strict=True)), c) for k, c in self._children.items()]

    def _samples(self, labels: LabelPairs, child: ChildT) -> Iterable[Sample]:
        raise NotImplementedError

    def collect(self) -> Iterable[MetricFamily]:
        """This metric as one family."""
        samples = tuple(s for labels, child in self._items() for s in self._samples(labels, child))
        yield MetricFamily(self.name, self.help, self._type, samples)


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class CounterChild(_Value):
    """One labelled series of a :class:`Counter`."""

    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0)."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class Counter(_Family[CounterChild]):
    """A monotonically increasing count. By convention its name ends in ``_total``."""

    _type = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0) to the unlabelled counter."""
        self._only().inc(amount)

    @property
    def value(self) -> float:
        """The unlabelled counter's value."""
        return self._only().value

    def _samples(self, labels: LabelPairs, child: CounterChild) -> Iterable[Sample]:
        yield Sample("", labels, child.value)


class GaugeChild(_Value):
    """One labelled series of a :class:`Gauge`."""

    __slots__ = ()

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = value

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        self.value -= amount


class Gauge(_Family[GaugeChild]):
    """A value that goes up and down, set by the code that knows it."""

    _type = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def set(self, value: float) -> None:
        """Set the unlabelled gauge."""
        self._only().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` to the unlabelled gauge."""
        self._only().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount`` from the unlabelled gauge."""
        self._only().dec(amount)

    @property
    def value(self) -> float:
        """The unlabelled gauge's value."""
        return self._only().value

    def _samples(self, labels: LabelPairs, child: GaugeChild) -> Iterable[Sample]:
        yield Sample("", labels, child.value)


class HistogramChild:
    """One labelled series of a :class:`Histogram`: a count per bucket and a sum."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is the +Inf bucket
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (seconds, for a latency)."""
        # bisect_left: the first bound >= value, i.e. the bucket with le >= value.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    @property
    def count(self) -> int:
        """How many observations were recorded."""
        return sum(self._counts)

    @property
    def sum(self) -> float:
        """The sum of the observations."""
        return self._sum

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, observations <= le)`` for each bucket, ``+Inf`` last."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self._bounds, math.inf), self._counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Histogram(_Family[HistogramChild]):
    """Observations counted in fixed buckets (cumulative ``le`` buckets, ``_sum``, ``_count``).

    ``observe`` is one bisection and two additions.
    """

    _type = "histogram"
    _reserved = ("le",)

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if b != math.inf)
        if not bounds or any(math.isnan(b) for b in bounds):
            raise ValueError("a histogram needs at least one finite bucket bound")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError("bucket bounds must increase strictly")
        self.buckets = bounds
        """The upper bounds, without the implicit ``+Inf``."""
        super().__init__(name, help, labelnames)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        """Record one observation in the unlabelled histogram."""
        self._only().observe(value)

    @property
    def count(self) -> int:
        """The unlabelled histogram's number of observations."""
        return self._only().count

    @property
    def sum(self) -> float:
        """The unlabelled histogram's sum of observations."""
        return self._only().sum

    def cumulative(self) -> list[tuple[float, int]]:
        """The unlabelled histogram's cumulative buckets (see :meth:`HistogramChild.cumulative`)."""
        return self._only().cumulative()

    def _samples(self, labels: LabelPairs, child: HistogramChild) -> Iterable[Sample]:
        buckets = child.cumulative()
        for bound, running in buckets:
            yield Sample("_bucket", (*labels, ("le", format_value(bound))), running)
        yield Sample("_sum", labels, child.sum)
        yield Sample("_count", labels, buckets[-1][1])  # == the +Inf bucket, always


CallbackResult = float | None | Iterable[tuple[Mapping[str, str], float]]
"""What a :class:`CallbackMetric` function returns: one value, None (no sample now), or
``(labels, value)`` pairs."""


class CallbackMetric:
    """A gauge or counter whose value is computed by ``fn`` at each scrape.

    ``fn`` returns a number (one unlabelled sample), None (no sample, e.g. the value is not
    known right now) or an iterable of ``(labels, value)`` pairs whose label names are
    ``labelnames``.
    """

    def __init__(
        self,
        name: str,
        help: str,
        fn: Callable[[], CallbackResult],
        *,
        type: Literal["counter", "gauge"] = "gauge",
        labelnames: Sequence[str] = (),
    ) -> None:
        _check_name(name)
        self.name = name
        self.help = help
        self.type: MetricType = type
        self.labelnames = _check_labelnames(labelnames)
        self._fn = fn

    def collect(self) -> Iterable[MetricFamily]:
        """Call ``fn`` and turn its result into one family."""
        result = self._fn()
        samples: tuple[Sample, ...]
        if result is None:
            samples = ()
        elif isinstance(result, int | float):
            if self.labelnames:
                raise ValueError(f"{self.name}: expected labelled values, got one number")
            samples = (Sample("", (), float(result)),)
        else:
            pairs = []
            for labels, value in result:
                if set(labels) != set(self.labelnames):
                    raise ValueError(
                        f"{self.name}: labels {sorted(labels)} are not {list(self.labelnames)}"
                    )
                ordered = tuple((n, str(labels[n])) for n in self.labelnames)
                pairs.append(Sample("", ordered, float(value)))
            samples = tuple(pairs)
        yield MetricFamily(self.name, self.help, self.type, samples)


class Registry:
    """The collectors to scrape, rendered in registration order."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()

    def register(self, collector: C) -> C:
        """Add ``collector`` (a metric, or anything with ``collect()``); return it.

        A metric with a ``name`` already registered is refused.
        """
        name = getattr(collector, "name", None)
        if isinstance(name, str):
            if name in self._names:
                raise ValueError(f"a metric named {name!r} is already registered")
            self._names.add(name)
        self._collectors.append(collector)
        return collector

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Create and register a :class:`Counter`."""
        return self.register(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Create and register a :class:`Gauge`."""
        return self.register(Gauge(name, help, labelnames))

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Create and register a :class:`Histogram`."""
        return self.register(Histogram(name, help, labelnames, buckets))

    def callback(
        self,
        name: str,
        help: str,
        fn: Callable[[], CallbackResult],
        *,
        type: Literal["counter", "gauge"] = "gauge",
        labelnames: Sequence[str] = (),
    ) -> CallbackMetric:
        """Create and register a :class:`CallbackMetric` (read at scrape time)."""
        return self.register(CallbackMetric(name, help, fn, type=type, labelnames=labelnames))

    def collect(self) -> list[MetricFamily]:
        """Every family, now. A collector that raises is left out (and logged), so one broken
        callback does not take the whole scrape down."""
        families: list[MetricFamily] = []
        for collector in self._collectors:
            try:
                families.extend(collector.collect())
            except Exception:
                _log.warning("collecting metrics from %r failed", collector, exc_info=True)
        return families

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every family."""
        return render(self.collect())


def render(families: Iterable[MetricFamily]) -> str:
    """Render ``families`` in the Prometheus text format 0.0.4 (``# HELP``, ``# TYPE``, one
    line per sample, a newline after the last line)."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            labels = ""
            if sample.labels:
                inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels)
                labels = "{" + inner + "}"
            lines.append(f"{family.name}{sample.suffix}{labels} {format_value(sample.value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Prometheus parses it: ``+Inf``, ``-Inf``, ``NaN``, integers without a
    fraction, other floats in Python's shortest round-tripping form."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def timed(fn: Callable[..., Any], *args: Any) -> float:
    """Call ``fn(*args)``; return how long it took in seconds (for a worker thread: the
    caller observes the result on the loop)."""
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


class NodeMetrics:
    """What a Raft member records as it runs: latencies and counts that exist nowhere else.

    Its live values (term, role, indexes, replication lag) are read at scrape time instead.
    """

    def __init__(self) -> None:
        self.proposal_seconds = Histogram(
            "controlplane_raft_proposal_seconds",
            "Time from a proposal to its result on this member (successful proposals).",
        )
        self.fsync_seconds = Histogram(
            "controlplane_raft_fsync_seconds",
            "Time to persist (write and sync) new log entries and the hard state.",
        )
        self.leader_changes = Counter(
            "controlplane_raft_leader_changes_total",
            "Times this member saw a new leader.",
        )
        self.snapshots_taken = Counter(
            "controlplane_raft_snapshots_taken_total",
            "Snapshots this member took of its own state machine.",
        )
        self.snapshot_bytes = Gauge(
            "controlplane_raft_snapshot_bytes",
            "Size of the last snapshot this member took or installed.",
        )
