"""controlplane: a strongly consistent control plane for distributed data systems.

One asyncio interface (:class:`ControlPlane`) over interchangeable backends: a hand-written
Raft, Kubernetes Custom Resources and Leases, and an in-memory reference implementation.
"""

from .errors import AlreadyExistsError as AlreadyExistsError
from .errors import ClosedError as ClosedError
from .errors import CompactedError as CompactedError
from .errors import ConflictError as ConflictError
from .errors import ControlPlaneError as ControlPlaneError
from .errors import CorruptionError as CorruptionError
from .errors import InvalidConfigError as InvalidConfigError
from .errors import InvalidRequestError as InvalidRequestError
from .errors import LaggedError as LaggedError
from .errors import LockHeldError as LockHeldError
from .errors import LockLostError as LockLostError
from .errors import LockNotHeldError as LockNotHeldError
from .errors import NotFoundError as NotFoundError
from .errors import NotLeaderError as NotLeaderError
from .errors import OperationTimeoutError as OperationTimeoutError
from .errors import PermissionDeniedError as PermissionDeniedError
from .errors import StorageError as StorageError
from .errors import UnavailableError as UnavailableError
from .errors import WatchError as WatchError
from .protocol import ControlPlane as ControlPlane
from .types import BackendHealth as BackendHealth
from .types import ClusterConfig as ClusterConfig
from .types import ClusterEvent as ClusterEvent
from .types import ClusterHealth as ClusterHealth
from .types import ClusterState as ClusterState
from .types import EventKind as EventKind
from .types import HashRing as HashRing
from .types import HealthStatus as HealthStatus
from .types import Index as Index
from .types import IndexHealth as IndexHealth
from .types import IndexSettings as IndexSettings
from .types import Lock as Lock
from .types import Node as Node
from .types import NodeResources as NodeResources
from .types import NodeRole as NodeRole
from .types import NodeStatus as NodeStatus
from .types import ShardCopy as ShardCopy
from .types import ShardRouting as ShardRouting
from .types import ShardState as ShardState
from .watch import EventStream as EventStream

__version__ = "0.1.0"

__all__ = (
    "AlreadyExistsError",
    "BackendHealth",
    "ClosedError",
    "ClusterConfig",
    "ClusterEvent",
    "ClusterHealth",
    "ClusterState",
    "CompactedError",
    "ConflictError",
    "ControlPlane",
    "ControlPlaneError",
    "CorruptionError",
    "EventKind",
    "EventStream",
    "HashRing",
    "HealthStatus",
    "Index",
    "IndexHealth",
    "IndexSettings",
    "InvalidConfigError",
    "InvalidRequestError",
    "LaggedError",
    "Lock",
    "LockHeldError",
    "LockLostError",
    "LockNotHeldError",
    "Node",
    "NodeResources",
    "NodeRole",
    "NodeStatus",
    "NotFoundError",
    "NotLeaderError",
    "OperationTimeoutError",
    "PermissionDeniedError",
    "ShardCopy",
    "ShardRouting",
    "ShardState",
    "StorageError",
    "UnavailableError",
    "WatchError",
    "__version__",
)
