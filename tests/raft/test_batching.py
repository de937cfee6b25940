"""Several proposals in one log entry: what goes together, and how it reads back."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import msgspec
import pytest

from controlplane.backends.raft import batching
from controlplane.errors import InvalidRequestError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def proposals(*sizes: int) -> batching.Proposals:
    loop = asyncio.get_running_loop()
    out: deque[tuple[bytes, asyncio.Future[Any]]] = deque()
    for i, size in enumerate(sizes):
        data = msgspec.msgpack.encode(i) + b"x" * max(0, size - 1)
        out.append((data, loop.create_future()))
    return out


async def test_one_proposal_is_its_own_data() -> None:
    queue = proposals(10)
    data, futures = queue[0]
    assert batching.take(queue) == (data, [futures])
    assert batching.decode(data) is None
    assert batching.take(queue) is None


async def test_proposals_waiting_together_share_an_entry_in_order() -> None:
    queue = proposals(*[10] * 5)
    expected = [d for d, _ in queue]
    queue[2][1].cancel()  # its caller gave up: left out
    taken = batching.take(queue)
    assert taken is not None
    data, futures = taken
    assert data[0] == batching.MARK
    assert batching.decode(data) == [expected[i] for i in (0, 1, 3, 4)]
    assert len(futures) == 4 and not queue


async def test_an_entry_holds_at_most_max_commands_and_max_bytes() -> None:
    queue = proposals(*[1] * (batching.MAX_COMMANDS + 3))
    first = batching.take(queue)
    assert first is not None and len(first[1]) == batching.MAX_COMMANDS
    rest = batching.take(queue)
    assert rest is not None and len(rest[1]) == 3

    big = batching.MAX_BYTES // 2 + 1
    queue = proposals(big, big, 10)
    alone = batching.take(queue)
    assert alone is not None and len(alone[1]) == 1  # two would exceed MAX_BYTES
    pair = batching.take(queue)
    assert pair is not None and len(pair[1]) == 2


async def test_done_proposals_at_the_head_are_skipped() -> None:
    queue = proposals(10, 10)
    queue[0][1].set_result(None)
    queue[1][1].cancel()
    assert batching.take(queue) is None
    assert not queue


def test_data_that_would_read_as_a_batch_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="0xC1"):
        batching.check_data(b"\xc1\x90")
    batching.check_data(msgspec.msgpack.encode([1, 2]))  # any msgpack value is fine
