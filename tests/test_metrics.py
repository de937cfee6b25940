"""The metrics primitives and their Prometheus text exposition (format 0.0.4)."""

from __future__ import annotations

import logging
import math
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.metrics import (
    CONTENT_TYPE,
    DEFAULT_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    NodeMetrics,
    Registry,
    format_value,
    timed,
)

# A sample line: name, optional {labels}, value (no timestamps: we never emit them).
_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\[\\\"n])*\",?)*)\})?"
    r" (?P<value>\S+)"
)
_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"((?:[^\"\\\n]|\\[\\\"n])*)\"")
_META = re.compile(r"# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], text)


def parse(text: str) -> dict[str, dict[str, object]]:
    """A strict parser of the exposition: every line must be valid, every family's HELP and
    TYPE come once and before its samples, samples of a family are contiguous, and a
    histogram's buckets are cumulative and end in +Inf == _count."""
    assert text.endswith("\n")
    families: dict[str, dict[str, object]] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        if meta := _META.fullmatch(line):
            kind, name, rest = meta.groups()
            family = families.setdefault(name, {"samples": []})
            assert kind.lower() not in family, f"second {kind} for {name}"
            if kind == "TYPE":
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped")
                assert not family["samples"], f"TYPE after samples of {name}"
            family[kind.lower()] = rest
            current = name
            continue
        sample = _SAMPLE.fullmatch(line)
        assert sample is not None, f"not a valid line: {line!r}"
        name = sample["name"]
        assert current is not None and name.startswith(current), f"{name} outside its family"
        labels = {k: _unescape(v) for k, v in _LABEL.findall(sample["labels"] or "")}
        value = float(sample["value"])  # accepts NaN, +Inf, -Inf as Go's ParseFloat does
        samples = families[current]["samples"]
        assert isinstance(samples, list)
        samples.append((name, labels, value))
    for name, family in families.items():
        if family.get("type") == "histogram":
            samples = family["samples"]
            assert isinstance(samples, list)
            _check_histogram(name, samples)
    return families


def _check_histogram(name: str, samples: list[tuple[str, dict[str, str], float]]) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for sample, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if sample == name + "_bucket":
            series.setdefault(key, []).append((float(labels["le"]), value))
        elif sample == name + "_count":
            counts[key] = value
        else:
            assert sample == name + "_sum", sample
    for key, buckets in series.items():
        bounds = [b for b, _ in buckets]
        values = [v for _, v in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf
        assert values == sorted(values), "buckets are not cumulative"
        assert values[-1] == counts[key], "+Inf bucket != _count"


# --- counters and gauges ------------------------------------------------------------------------


def test_counter_counts_up_only() -> None:
    c = Counter("jobs_total", "Jobs done.")
    c.inc()
    c.inc(2.5)
    assert c.value == 3.5
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1)
    assert c.value == 3.5


def test_gauge_goes_both_ways() -> None:
    g = Gauge("queue_depth", "Items queued.")
    g.set(10)
    g.inc(3)
    g.dec()
    assert g.value == 12
    g.dec(20)
    assert g.value == -8


def test_labelled_children_by_position_or_name() -> None:
    c = Counter("requests_total", "Requests.", ("method", "code"))
    c.labels("GET", "200").inc()
    c.labels(method="GET", code="200").inc()
    c.labels(code="404", method="GET").inc()
    assert c.labels("GET", "200").value == 2
    assert c.labels("GET", "404").value == 1
    with pytest.raises(ValueError):
        c.inc()  # a labelled metric has no unlabelled value
    with pytest.raises(ValueError):
        c.labels("GET")
    with pytest.raises(ValueError):
        c.labels(method="GET", status="200")
    with pytest.raises(ValueError):
        Counter("plain_total", "No labels.").labels("x")


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é"])
def test_invalid_metric_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        Gauge(name, "x")


@pytest.mark.parametrize("labels", [("a-b",), ("__reserved",), ("x", "x"), ("1x",)])
def test_invalid_label_names_are_refused(labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Gauge("g", "x", labels)


def test_histogram_refuses_the_le_label_and_bad_buckets() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Histogram("h", "x", ("le",))
    with pytest.raises(ValueError, match="increase"):
        Histogram("h", "x", buckets=(1.0, 0.5))
    with pytest.raises(ValueError, match="increase"):
        Histogram("h", "x", buckets=(1.0, 1.0))
    with pytest.raises(ValueError, match="at least one"):
        Histogram("h", "x", buckets=())
    assert Histogram("h", "x", buckets=(1.0, math.inf)).buckets == (1.0,)


# --- histogram math -----------------------------------------------------------------------------


def test_histogram_buckets_are_upper_inclusive_and_cumulative() -> None:
    h = Histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.1000001, 1.0, 3.0, 10.0, 11.0, 1e9):
        h.observe(value)
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (10.0, 6), (math.inf, 8)]
    assert h.count == 8
    assert h.sum == pytest.approx(0.05 + 0.1 + 0.1000001 + 1.0 + 3.0 + 10.0 + 11.0 + 1e9)


def test_an_empty_histogram_renders_zeros() -> None:
    registry = Registry()
    registry.histogram("empty_seconds", "Nothing yet.", buckets=(1.0,))
    assert registry.render() == (
        "# HELP empty_seconds Nothing yet.\n"
        "# TYPE empty_seconds histogram\n"
        'empty_seconds_bucket{le="1"} 0\n'
        'empty_seconds_bucket{le="+Inf"} 0\n'
        "empty_seconds_sum 0\n"
        "empty_seconds_count 0\n"
    )


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=200))
def test_histogram_matches_a_naive_count(values: list[float]) -> None:
    h = Histogram("h", "x")
    for value in values:
        h.observe(value)
    expected = [(b, sum(1 for v in values if v <= b)) for b in (*DEFAULT_BUCKETS, math.inf)]
    assert h.cumulative() == expected
    assert h.count == len(values)
    assert h.sum == pytest.approx(math.fsum(values))


def test_default_buckets_span_a_tenth_of_a_millisecond_to_ten_seconds() -> None:
    assert DEFAULT_BUCKETS[0] == 0.0001 and DEFAULT_BUCKETS[-1] == 10.0
    assert list(DEFAULT_BUCKETS) == sorted(set(DEFAULT_BUCKETS))


# --- the exposition -----------------------------------------------------------------------------


def test_exposition_of_every_kind_is_exact() -> None:
    registry = Registry()
    c = registry.counter("cp_jobs_total", "Jobs done.", ("kind",))
    c.labels("a").inc(3)
    c.labels("b").inc()
    registry.gauge("cp_temperature", "Degrees.").set(-1.5)
    h = registry.histogram("cp_wait_seconds", "Wait.", ("queue",), buckets=(0.5, 2.0))
    h.labels(queue="q1").observe(0.25)
    h.labels(queue="q1").observe(1.0)
    registry.callback("cp_live", "Read at scrape time.", lambda: 42)
    assert registry.render() == (
        "# HELP cp_jobs_total Jobs done.\n"
        "# TYPE cp_jobs_total counter\n"
        'cp_jobs_total{kind="a"} 3\n'
        'cp_jobs_total{kind="b"} 1\n'
        "# HELP cp_temperature Degrees.\n"
        "# TYPE cp_temperature gauge\n"
        "cp_temperature -1.5\n"
        "# HELP cp_wait_seconds Wait.\n"
        "# TYPE cp_wait_seconds histogram\n"
        'cp_wait_seconds_bucket{queue="q1",le="0.5"} 1\n'
        'cp_wait_seconds_bucket{queue="q1",le="2"} 2\n'
        'cp_wait_seconds_bucket{queue="q1",le="+Inf"} 2\n'
        'cp_wait_seconds_sum{queue="q1"} 1.25\n'
        'cp_wait_seconds_count{queue="q1"} 2\n'
        "# HELP cp_live Read at scrape time.\n"
        "# TYPE cp_live gauge\n"
        "cp_live 42\n"
    )
    parse(registry.render())


def test_label_values_and_help_are_escaped() -> None:
    registry = Registry()
    g = registry.gauge("cp_g", 'Help with a \\ backslash,\na newline and "quotes".', ("path",))
    nasty = 'C:\\dir "quoted"\nnext line'
    g.labels(nasty).set(1)
    text = registry.render()
    assert text.splitlines()[0] == (
        '# HELP cp_g Help with a \\\\ backslash,\\na newline and "quotes".'
    )
    assert 'cp_g{path="C:\\\\dir \\"quoted\\"\\nnext line"} 1' in text.splitlines()
    samples = parse(text)["cp_g"]["samples"]
    assert samples == [("cp_g", {"path": nasty}, 1.0)]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3, "3"),
        (-7.0, "-7"),
        (0.25, "0.25"),
        (1e-05, "1e-05"),
        (2.0**60, "1.152921504606847e+18"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_are_formatted_as_prometheus_parses_them(value: float, text: str) -> None:
    assert format_value(value) == text
    if not math.isnan(value):
        assert float(text) == value


def test_callbacks_are_read_at_each_scrape() -> None:
    registry = Registry()
    box = {"term": 1.0}
    peers: dict[str, float] = {}
    registry.callback("cp_term", "Term.", lambda: box["term"])
    registry.callback(
        "cp_lag", "Lag.", lambda: [({"peer": p}, v) for p, v in peers.items()], labelnames=("peer",)
    )
    registry.callback("cp_unknown", "Not known now.", lambda: None)
    first = parse(registry.render())
    assert first["cp_term"]["samples"] == [("cp_term", {}, 1.0)]
    assert first["cp_lag"]["samples"] == []
    assert first["cp_unknown"]["samples"] == [] and first["cp_unknown"]["type"] == "gauge"
    box["term"] = 5
    peers.update({"b": 3, "c": 0})
    second = parse(registry.render())
    assert second["cp_term"]["samples"] == [("cp_term", {}, 5.0)]
    assert second["cp_lag"]["samples"] == [
        ("cp_lag", {"peer": "b"}, 3.0),
        ("cp_lag", {"peer": "c"}, 0.0),
    ]


def test_a_failing_callback_is_left_out_and_the_rest_still_renders(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry()
    registry.gauge("cp_before", "Before.").set(1)
    registry.callback("cp_broken", "Broken.", lambda: 1 / 0)
    registry.callback("cp_bad_labels", "Wrong labels.", lambda: [({"x": "1"}, 1.0)])
    registry.gauge("cp_after", "After.").set(2)
    with caplog.at_level(logging.WARNING, logger="controlplane.metrics"):
        families = parse(registry.render())
    assert set(families) == {"cp_before", "cp_after"}
    assert len([r for r in caplog.records if r.name == "controlplane.metrics"]) == 2


def test_duplicate_names_are_refused() -> None:
    registry = Registry()
    registry.counter("cp_x_total", "X.")
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("cp_x_total", "X again.")


def test_node_metrics_render_as_a_valid_exposition() -> None:
    metrics = NodeMetrics()
    metrics.proposal_seconds.observe(0.002)
    metrics.fsync_seconds.observe(0.0004)
    metrics.leader_changes.inc()
    metrics.snapshots_taken.inc()
    metrics.snapshot_bytes.set(4096)
    registry = Registry()
    for metric in (
        metrics.proposal_seconds,
        metrics.fsync_seconds,
        metrics.leader_changes,
        metrics.snapshot_bytes,
    ):
        registry.register(metric)
    families = parse(registry.render())
    assert families["controlplane_raft_proposal_seconds"]["type"] == "histogram"
    assert families["controlplane_raft_leader_changes_total"]["type"] == "counter"
    assert families["controlplane_raft_snapshot_bytes"]["samples"] == [
        ("controlplane_raft_snapshot_bytes", {}, 4096.0)
    ]


def test_timed_measures_a_call_and_lets_its_errors_through() -> None:
    took = timed(time.sleep, 0.001)
    assert took > 0
    with pytest.raises(ZeroDivisionError):
        timed(lambda: 1 / 0)


def test_content_type_is_the_text_format_0_0_4() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
