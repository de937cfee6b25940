"""The latency tracer behind ``CONTROLPLANE_TRACE``: off by default, lines per process."""

from __future__ import annotations

import os
from pathlib import Path

from controlplane.backends.raft import framing


def test_tracing_is_off_unless_asked() -> None:
    if not os.environ.get("CONTROLPLANE_TRACE"):
        assert framing.TRACE is None


def test_tracer_writes_name_key_and_monotonic_ns(tmp_path: Path) -> None:
    tracer = framing._Tracer(str(tmp_path))
    for i in range(70):  # past one buffer of 64 lines: written without a flush
        tracer("n.idx", i)
    path = tmp_path / f"trace.{os.getpid()}"
    assert len(path.read_text().splitlines()) == 64
    tracer.flush()
    lines = [line.split() for line in path.read_text().splitlines()]
    assert [(name, int(key)) for name, key, _ in lines] == [("n.idx", i) for i in range(70)]
    times = [int(t) for _, _, t in lines]
    assert times == sorted(times)
