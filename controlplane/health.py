"""Cluster health as Elasticsearch defines it: green, yellow, red, with shard counts."""

from __future__ import annotations

from .types import ClusterHealth, ClusterState, HealthStatus, Index, IndexHealth, ShardState

__all__ = ["cluster_health", "index_health"]

_ACTIVE = (ShardState.STARTED, ShardState.RELOCATING)
_RANK = {HealthStatus.GREEN: 0, HealthStatus.YELLOW: 1, HealthStatus.RED: 2}


def index_health(index: Index) -> IndexHealth:
    """Health of one index: red if a primary is not active, yellow if a replica is not."""
    primaries = active = initializing = relocating = unassigned = 0
    status = HealthStatus.GREEN
    for shard in index.routing:
        for copy in shard.copies:
            state = copy.state
            if state in _ACTIVE:
                active += 1
                primaries += copy.primary
                relocating += state is ShardState.RELOCATING
                continue
            if state is ShardState.INITIALIZING:
                initializing += 1
            else:
                unassigned += 1
            if copy.primary:
                status = HealthStatus.RED
            elif status is HealthStatus.GREEN:
                status = HealthStatus.YELLOW
    return IndexHealth(
        status=status,
        active_primary_shards=primaries,
        active_shards=active,
        initializing_shards=initializing,
        relocating_shards=relocating,
        unassigned_shards=unassigned,
    )


def cluster_health(state: ClusterState) -> ClusterHealth:
    """Health of the whole cluster: the worst of its indices (green with no index)."""
    per_index = {name: index_health(index) for name, index in state.indices.items()}
    worst = max((h.status for h in per_index.values()), key=_RANK.__getitem__, default=None)
    return ClusterHealth(
        status=worst or HealthStatus.GREEN,
        version=state.version,
        number_of_nodes=len(state.nodes),
        number_of_data_nodes=sum(1 for n in state.nodes.values() if n.is_data),
        active_primary_shards=sum(h.active_primary_shards for h in per_index.values()),
        active_shards=sum(h.active_shards for h in per_index.values()),
        initializing_shards=sum(h.initializing_shards for h in per_index.values()),
        relocating_shards=sum(h.relocating_shards for h in per_index.values()),
        unassigned_shards=sum(h.unassigned_shards for h in per_index.values()),
        indices=dict(sorted(per_index.items())),
    )
