"""Conformance checks of indices: create, read, list, update settings, delete; validation,
errors, and concurrent creation."""

from __future__ import annotations

from typing import Any

import anyio

from ..errors import AlreadyExistsError, InvalidRequestError, NotFoundError
from ..types import EventKind, Index, IndexSettings
from .conformance_harness import (
    BackendHarness,
    check,
    collect_until_marker,
    describe,
    expect_error,
    index_settings,
    nothing_written,
    register_data_nodes,
    require,
    require_equal,
    version_now,
    write_marker,
)

__all__: tuple[str, ...] = ()

AREA = "indices"

BAD_NAMES = (
    "",
    "Logs",
    "has_underscore",
    "has space",
    "dot.ted",
    "-leading",
    "trailing-",
    "slash/name",
    "ünïcode",
    "x" * 64,
)


@check(AREA)
async def check_create_and_get_index(harness: BackendHarness) -> None:
    """``create_index`` stores settings, mappings and a routing table (one primary and
    ``number_of_replicas`` replicas per shard); get/list return it; ``INDEX_CREATED``."""
    async with harness.open() as cp:
        v0 = await version_now(cp)
        mappings = {"properties": {"title": {"type": "text"}}}
        index = await cp.create_index(
            "products",
            {"number_of_shards": 3, "number_of_replicas": 2, "refresh_interval": "1s"},
            mappings,
        )
        require_equal(index.name, "products", "name")
        require_equal(
            (index.settings.number_of_shards, index.settings.number_of_replicas),
            (3, 2),
            "(shards, replicas) from a settings mapping",
        )
        require_equal(index.settings.extra.get("refresh_interval"), "1s", "an extra setting")
        require_equal(index.mappings, mappings, "mappings")
        require_equal([r.shard for r in index.routing], [0, 1, 2], "shard numbers")
        for routing in index.routing:
            require_equal(
                sorted(c.primary for c in routing.copies),
                [False, False, True],
                f"shard {routing.shard}: one primary and two replicas",
            )
        require(index.created_version > v0, f"created_version must be set: {index}")
        require_equal(await cp.get_index("products"), index, "get_index")
        await cp.create_index("alpha", IndexSettings(number_of_shards=1, number_of_replicas=0))
        await cp.create_index("zulu")
        require_equal(
            [i.name for i in await cp.list_indices()],
            ["alpha", "products", "zulu"],
            "list_indices (by name)",
        )
        default = await cp.get_index("zulu")
        require_equal(
            (default.settings.number_of_shards, default.settings.number_of_replicas),
            (1, 1),
            "default settings",
        )
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        created = [e for e in events if e.kind is EventKind.INDEX_CREATED]
        require_equal(
            [(e.key, e.version) for e in created][:1],
            [("products", index.created_version)],
            "the first INDEX_CREATED event",
        )
        require_equal(created[0].index, index, "the INDEX_CREATED event's index")


@check(AREA)
async def check_index_name_and_settings_validation(harness: BackendHarness) -> None:
    """Bad index names and settings are ``InvalidRequestError`` and write nothing."""
    async with harness.open() as cp:
        await cp.create_index("existing")
        v0 = await version_now(cp)
        for name in BAD_NAMES:
            await expect_error(InvalidRequestError, cp.create_index(name), f"create {name!r}")
            await expect_error(InvalidRequestError, cp.get_index(name), f"get {name!r}")
            await expect_error(InvalidRequestError, cp.delete_index(name), f"delete {name!r}")
        bad_settings: list[dict[str, Any]] = [
            {"number_of_shards": 0},
            {"number_of_shards": -1},
            {"number_of_shards": 100_000},
            {"number_of_replicas": -1},
            {"number_of_shards": "three"},
            {"number_of_replicas": 1.5},
        ]
        for settings in bad_settings:
            await expect_error(
                InvalidRequestError,
                cp.create_index("valid-name", settings),
                f"create with settings {settings}",
            )
            await expect_error(
                InvalidRequestError,
                cp.update_index_settings("existing", settings),
                f"update with settings {settings}",
            )
        await nothing_written(cp, v0, "rejected index requests", harness.timeout)
        await expect_error(NotFoundError, cp.get_index("valid-name"), "the rejected index")


@check(AREA)
async def check_index_exists_and_not_found(harness: BackendHarness) -> None:
    """Creating a taken name is ``AlreadyExistsError``; reading, updating or deleting an
    unknown index is ``NotFoundError``; neither writes anything."""
    async with harness.open() as cp:
        first = await cp.create_index("taken", index_settings(2, 0))
        v0 = await version_now(cp)
        await expect_error(
            AlreadyExistsError, cp.create_index("taken", index_settings(5, 5)), "create twice"
        )
        require_equal(await cp.get_index("taken"), first, "the index after a failed re-create")
        await expect_error(NotFoundError, cp.get_index("missing"), "get_index")
        await expect_error(NotFoundError, cp.delete_index("missing"), "delete_index")
        await expect_error(
            NotFoundError,
            cp.update_index_settings("missing", index_settings(1, 0)),
            "update_index_settings",
        )
        await expect_error(NotFoundError, cp.get_shard_routing("missing"), "get_shard_routing")
        await nothing_written(cp, v0, "failed index requests", harness.timeout)


@check(AREA)
async def check_delete_index(harness: BackendHarness) -> None:
    """``delete_index`` removes the index and frees its copies (``INDEX_DELETED``); the name
    can be reused."""
    async with harness.open() as cp:
        await register_data_nodes(cp, ["a", "b"])
        index = await cp.create_index("doomed", index_settings(2, 1))
        v0 = await version_now(cp)
        await cp.delete_index("doomed")
        await expect_error(NotFoundError, cp.get_index("doomed"), "get_index after delete")
        require_equal(await cp.list_indices(), [], "list_indices after delete")
        state = await cp.get_cluster_state(consistent=True)
        require("doomed" not in state.indices, "the deleted index is gone from the state")
        health = await cp.get_cluster_health()
        require_equal(
            (health.active_shards, health.initializing_shards, health.unassigned_shards),
            (0, 0, 0),
            "shard counts after the only index was deleted",
        )
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        require_equal(
            [(e.kind, e.key) for e in events],
            [(EventKind.INDEX_DELETED, "doomed")],
            "events of delete_index",
        )
        require(
            events[0].index is not None and events[0].index.name == index.name,
            f"INDEX_DELETED carries the last value: {describe(events)}",
        )
        again = await cp.create_index("doomed", index_settings(1, 0))
        require(again.created_version > index.created_version, "a re-created index is new")


@check(AREA)
async def check_update_index_settings(harness: BackendHarness) -> None:
    """``update_index_settings`` changes the replica count (copies added or removed) and extra
    settings, keeps the shard count, and rejects changing it; ``INDEX_UPDATED``."""
    async with harness.open() as cp:
        await register_data_nodes(cp, ["a", "b", "c"])
        index = await cp.create_index("tunable", index_settings(2, 1))
        more = await cp.update_index_settings(
            "tunable", IndexSettings(number_of_shards=2, number_of_replicas=2)
        )
        require_equal(more.settings.number_of_replicas, 2, "replicas after the update")
        require(more.updated_version > index.updated_version, "updated_version must move")
        for routing in more.routing:
            require_equal(len(routing.copies), 3, f"copies of shard {routing.shard}")
            require_equal(
                sorted(c.node_id or "" for c in routing.copies),
                ["a", "b", "c"],
                f"the new replica of shard {routing.shard} is placed",
            )
        partial = await cp.update_index_settings(
            "tunable", {"number_of_replicas": 0, "codec": "best_compression"}
        )
        require_equal(
            (partial.settings.number_of_shards, partial.settings.number_of_replicas),
            (2, 0),
            "a mapping without number_of_shards keeps the shard count",
        )
        require_equal(partial.settings.extra.get("codec"), "best_compression", "extra setting")
        require(
            all(len(r.copies) == 1 and r.copies[0].primary for r in partial.routing),
            f"replicas removed, primaries kept: {partial.routing}",
        )
        v0 = await version_now(cp)
        await expect_error(
            InvalidRequestError,
            cp.update_index_settings(
                "tunable", IndexSettings(number_of_shards=4, number_of_replicas=0)
            ),
            "changing number_of_shards",
        )
        await nothing_written(cp, v0, "a rejected shard-count change", harness.timeout)
        marker = await write_marker(cp)
        async with cp.watch(since=index.created_version) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        updates = [e for e in events if e.kind is EventKind.INDEX_UPDATED]
        require_equal(
            [(e.key, e.version) for e in updates],
            [("tunable", more.updated_version), ("tunable", partial.updated_version)],
            "INDEX_UPDATED events",
        )


@check(AREA)
async def check_concurrent_create_index(harness: BackendHarness) -> None:
    """50 concurrent ``create_index`` of one name: exactly one wins, 49 get
    ``AlreadyExistsError``, and one ``INDEX_CREATED`` event is emitted."""
    async with harness.open() as cp:
        v0 = await version_now(cp)
        won: list[Index] = []
        exists = 0
        other: list[BaseException] = []

        async def create(i: int) -> None:
            nonlocal exists
            try:
                won.append(await cp.create_index("contended", {"replicas": i % 3}))
            except AlreadyExistsError:
                exists += 1
            except Exception as exc:
                other.append(exc)

        with anyio.fail_after(harness.timeout * 5):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(create, i)
        require(not other, f"unexpected errors: {other[:3]}")
        require_equal(len(won), 1, "winners among 50 concurrent create_index")
        require_equal(exists, 49, "AlreadyExistsError count")
        require_equal(await cp.get_index("contended"), won[0], "the stored index")
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        require_equal(
            [(e.kind, e.key) for e in events],
            [(EventKind.INDEX_CREATED, "contended")],
            "events of 50 concurrent creations",
        )
