"""CustomResourceDefinitions of the k8s backend, generated from the msgspec types.

One source of truth: the spec and status of every custom resource are msgspec structs built
from the domain types of :mod:`controlplane.types` (a new field there appears in the CRD at
the next generation, and the test of the committed manifests fails until they are
regenerated). Their JSON schema (``msgspec.json.schema_components``) is turned into a
*structural* OpenAPI v3 schema, as the API server requires: references inlined, ``X | None``
as ``nullable``, sets as ``x-kubernetes-list-type: set``, unknown fields preserved only where
a value is free-form (mappings, extra settings). Limits come from :mod:`controlplane.validation`
and invariants are CEL rules (``x-kubernetes-validations``).

The resources, in the API group :data:`GROUP`, version :data:`VERSION`, all namespaced (the
control plane lives in one namespace, ``k8s.namespace`` of the configuration):

* ``Index`` -- spec: ``settings``, ``mappings``; status: ``state``, ``health``, ``routing``,
  ``conditions``, ``observedGeneration``. The name is the index name.
* ``ClusterNode`` -- spec: a node's registration (address, roles, zone, attributes,
  resources); status: its lifecycle ``state``. The name is the node id. Heart-beats are
  Leases, not writes to this resource.
* ``Cluster`` -- the singleton (named by ``k8s.cluster_name``): spec ``config``,
  ``featureFlags``, ``hashRing``; status: the effective ring and conditions.

Field names of the embedded domain values are msgspec's own (``number_of_shards``,
``node_id``), so a resource converts to and from the domain types with ``msgspec.convert``
and reads like the JSON of ``controlplane export``; the fields this module adds around them
follow the Kubernetes API conventions (``observedGeneration``, ``featureFlags``).

``python -m controlplane.backends.k8s.crds --write deploy/crds/`` writes one YAML file per
CRD; ``--check deploy/crds/`` fails when the files there are stale.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import enum
import inspect
import itertools
import re
import sys
import textwrap
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from controlplane import __version__
from controlplane.types import (
    ClusterConfig,
    HashRing,
    HealthStatus,
    Index,
    Node,
    NodeStatus,
    ShardRouting,
)
from controlplane.validation import MAX_NAME_LENGTH, MAX_REPLICAS, MAX_SHARDS

__all__ = [
    "API_VERSION",
    "GROUP",
    "LABELS",
    "RESOURCES",
    "VERSION",
    "ClusterNodeSpec",
    "ClusterNodeStatus",
    "ClusterSpec",
    "ClusterStatus",
    "Condition",
    "IndexSpec",
    "IndexState",
    "IndexStatus",
    "ResourceKind",
    "crd_manifests",
    "main",
    "render",
    "structural_schema",
    "write_manifests",
]

GROUP = "controlplane.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
LABELS = {
    "app.kubernetes.io/name": "controlplane",
    "app.kubernetes.io/part-of": "controlplane",
    "app.kubernetes.io/component": "crd",
    "app.kubernetes.io/version": __version__,
}
"""The recommended labels every manifest of the project carries."""

_DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_FLAG_NAME = "^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
_MAX_VNODES = 4096
_MAX_REPLICATION_FACTOR = 16
_MAX_MAP_ENTRIES = 1024
"""Bound on free-form maps with CEL rules (lets the API server estimate their cost)."""


# -- the shapes of the resources -------------------------------------------------------------


class Condition(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A status condition, as ``metav1.Condition`` defines it."""

    type: Annotated[
        str,
        msgspec.Meta(
            max_length=316,
            pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
            r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        ),
    ]
    """The kind of condition, in CamelCase (``Valid``, ``Allocated``)."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    observed_generation: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The ``metadata.generation`` the condition was computed from."""
    last_transition_time: Annotated[
        datetime.datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})
    ]
    """When the status last changed."""
    reason: Annotated[
        str,
        msgspec.Meta(
            min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
        ),
    ]
    """A CamelCase reason for the last transition."""
    message: Annotated[str, msgspec.Meta(max_length=32768)] = ""
    """A human-readable message about the transition."""


class IndexState(enum.StrEnum):
    """Where the control plane is with an index resource."""

    PENDING = "pending"
    """Accepted; the control plane has not routed its shards yet."""
    ACTIVE = "active"
    """Routed: ``status.routing`` places every shard copy (see ``status.health``)."""
    INVALID = "invalid"
    """Refused by the control plane's validation; the ``Valid`` condition says why."""


def _derive(
    name: str, source: type[msgspec.Struct], *, exclude: Collection[str] = (), doc: str = ""
) -> type[msgspec.Struct]:
    """A struct with the fields of ``source`` (types and defaults) except ``exclude``."""
    fields: list[tuple[str, Any, Any]] = []
    for info in msgspec.structs.fields(source):
        if info.name in exclude:
            continue
        if info.default is not msgspec.NODEFAULT:
            fields.append((info.name, info.type, info.default))
        elif info.default_factory is not msgspec.NODEFAULT:
            fields.append(
                (info.name, info.type, msgspec.field(default_factory=info.default_factory))
            )
        else:
            fields.append((info.name, info.type, msgspec.field()))
    derived = msgspec.defstruct(
        name, fields, kw_only=True, frozen=True, omit_defaults=True, module=__name__
    )
    derived.__doc__ = doc or source.__doc__
    _DOC_SOURCES[derived] = source
    return derived


_DOC_SOURCES: dict[type, type] = {}
"""Derived struct -> the class whose field docstrings describe its fields."""

IndexSpec = _derive(
    "IndexSpec",
    Index,
    exclude={"name", "routing", "created_version", "updated_version"},
    doc="The desired index: its settings and mappings (the resource's name is the index name).",
)
ClusterNodeSpec = _derive(
    "ClusterNodeSpec",
    Node,
    exclude={"id", "status", "registered_version"},
    doc="A node's registration (the resource's name is the node id).",
)


class IndexStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    """What the control plane made of the index."""

    observed_generation: int = 0
    """The ``metadata.generation`` this status describes."""
    state: IndexState | None = None
    """``pending``, ``active`` or ``invalid``."""
    health: HealthStatus | None = None
    """``green``, ``yellow`` or ``red``, as Elasticsearch defines them."""
    routing: tuple[ShardRouting, ...] = ()
    """Where every copy of every shard lives."""
    conditions: tuple[Condition, ...] = ()
    """``Valid``, ``Allocated``, ..."""


class ClusterNodeStatus(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"
):
    """What the control plane made of the node."""

    observed_generation: int = 0
    """The ``metadata.generation`` this status describes."""
    state: NodeStatus | None = None
    """``active``, ``draining`` or ``down`` (judged from the node's Lease)."""
    registered_version: int = 0
    """The state version at which the node was registered."""
    conditions: tuple[Condition, ...] = ()
    """Status conditions."""


class ClusterSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    """Cluster-wide configuration, feature flags and hash ring (one resource per control
    plane, named by ``k8s.cluster_name``)."""

    config: ClusterConfig = ClusterConfig()
    """Cluster-wide configuration (its ``version`` is the control plane's: not in the schema)."""
    feature_flags: dict[str, bool] = {}
    """Feature flags by name."""
    hash_ring: HashRing = HashRing()
    """The consistent-hash ring (``nodes`` follows membership when ``follow_membership``)."""


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    """What the control plane made of the cluster resource."""

    observed_generation: int = 0
    """The ``metadata.generation`` this status describes."""
    hash_ring: HashRing | None = None
    """The ring in effect (with the nodes it follows)."""
    conditions: tuple[Condition, ...] = ()
    """Status conditions."""


# -- msgspec JSON schema -> structural OpenAPI v3 schema --------------------------------------

_KEEP = frozenset(
    {
        "type",
        "format",
        "description",
        "default",
        "enum",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "nullable",
    }
)
_FREE_FORM = "x-kubernetes-preserve-unknown-fields"


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string after a field) of a struct class, by field name."""
    cls = _DOC_SOURCES.get(cls, cls)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = following.value.value
    return docs


def _describe(text: str) -> str:
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs).replace("``", "`")


def _prune_defaults(node: dict[str, Any]) -> None:
    """Reduce every object default to what its properties' own defaults do not already give
    (the API server applies those), so a default never names a field left out."""
    for child in node.get("properties", {}).values():
        _prune_defaults(child)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _prune_defaults(node[key])
    properties = node.get("properties")
    if properties is not None and isinstance(node.get("default"), dict):
        node["default"] = {
            key: value
            for key, value in node["default"].items()
            if key in properties and properties[key].get("default", ...) != value
        }


def _annotations(node: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of ``node`` that a structural schema keeps (a None default is dropped)."""
    out = {k: v for k, v in node.items() if k in _KEEP}
    if "default" in out and out["default"] is None:
        del out["default"]
    if "description" in out:
        out["description"] = _describe(out["description"])
    return out


class _Converter:
    def __init__(self, components: Mapping[str, Any], classes: Mapping[str, type]) -> None:
        self.components = components
        self.classes = classes

    def convert(self, node: Mapping[str, Any], where: str) -> dict[str, Any]:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            out = self.component(name, where)
            return {**out, **_annotations(node)}
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o != {"type": "null"}]
            nullable = len(options) < len(node["anyOf"])
            if len(options) == 1:
                out = self.convert(options[0], where)
            else:  # a union of several types: structural schemas cannot say which
                kinds = ", ".join(sorted(str(o.get("type", "?")) for o in options))
                out = {_FREE_FORM: True, "description": f"One of: {kinds}."}
            if nullable:
                out["nullable"] = True
            return {**out, **_annotations(node)}
        out = _annotations(node)
        if "enum" in node and "type" not in node:
            if not all(isinstance(v, str) for v in node["enum"]):
                raise ValueError(f"{where}: only string enums are supported")
            out["type"] = "string"
        kind = node.get("type")
        if kind == "object":
            if "properties" in node:
                out["properties"] = {
                    key: self.convert(value, f"{where}.{key}")
                    for key, value in node["properties"].items()
                }
                if node.get("required"):
                    out["required"] = list(node["required"])
            elif isinstance(node.get("additionalProperties"), Mapping):
                out["additionalProperties"] = self.convert(
                    node["additionalProperties"], where + "{}"
                )
            else:  # dict[str, Any]: truly free-form
                out[_FREE_FORM] = True
        elif kind == "array":
            if "prefixItems" in node:
                raise ValueError(f"{where}: fixed-length tuples have no structural schema")
            out["items"] = self.convert(node.get("items", {}), where + "[]")
            if node.get("uniqueItems"):
                if out["items"].get("type") not in ("string", "integer", "number", "boolean"):
                    raise ValueError(f"{where}: only sets of scalars are supported")
                out["x-kubernetes-list-type"] = "set"
        elif kind is None and "enum" not in node and node:
            raise ValueError(f"{where}: no structural schema for {node!r}")
        elif not node:
            out[_FREE_FORM] = True
        return out

    def component(self, name: str, where: str) -> dict[str, Any]:
        schema = self.components[name]
        out = self.convert({k: v for k, v in schema.items() if k != "title"}, where)
        cls = self.classes.get(name)
        if cls is not None and "properties" in out:
            docs = _field_docs(cls)
            encoded = {f.name: f.encode_name for f in msgspec.structs.fields(cls)}
            for field_name, doc in docs.items():
                prop = out["properties"].get(encoded.get(field_name, field_name))
                if prop is not None:  # the field's own words before its type's
                    prop["description"] = _describe(doc)
        return out


def _struct_classes(types: Sequence[Any]) -> dict[str, type]:
    """Every struct class reachable from ``types``, by the name msgspec gives its schema."""
    found: dict[str, type] = {}

    def visit(info: msgspec.inspect.Type) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls.__name__ in found:
                return
            found[info.cls.__name__] = info.cls
            for item in info.fields:
                visit(item.type)
        for attribute in ("item_type", "key_type", "value_type"):
            if isinstance(child := getattr(info, attribute, None), msgspec.inspect.Type):
                visit(child)
        for child in getattr(info, "types", ()) or ():
            if isinstance(child, msgspec.inspect.Type):
                visit(child)

    for info in msgspec.inspect.multi_type_info(types):
        visit(info)
    return found


def structural_schema(struct: Any) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a msgspec type (references inlined)."""
    (top,), components = msgspec.json.schema_components([struct])
    return _Converter(components, _struct_classes([struct])).convert(top, struct.__name__)


_SEGMENT = re.compile(r"([^.\[{]+)((?:\[\]|\{\})*)")


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The node of ``schema`` at ``path`` (``a.b[].c{}``: properties, items, values)."""
    node = schema
    for match in _SEGMENT.finditer(path):
        name, suffix = match.groups()
        try:
            node = node["properties"][name]
        except KeyError:
            raise KeyError(f"no field {name!r} at {path!r} in the generated schema") from None
        for marker in re.findall(r"\[\]|\{\}", suffix):
            node = node["items" if marker == "[]" else "additionalProperties"]
    return node


def _name_rule(what: str) -> dict[str, str]:
    return {
        "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && "
        f"self.metadata.name.matches('{_DNS_LABEL}')",
        "message": f"the name is the {what}: a lowercase DNS label of at most "
        f"{MAX_NAME_LENGTH} characters (letters, digits and '-', starting and ending "
        "with a letter or digit)",
    }


def _keys_rule(what: str) -> dict[str, Any]:
    return {
        "maxProperties": _MAX_MAP_ENTRIES,
        "x-kubernetes-validations": [
            {
                "rule": f"self.all(k, k.size() <= {MAX_NAME_LENGTH} && k.matches('{_FLAG_NAME}'))",
                "message": f"{what} names are 1 to {MAX_NAME_LENGTH} lowercase letters, digits, "
                "'-', '_' and '.', starting and ending with a letter or digit",
            }
        ],
    }


_CONDITIONS = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "maxItems": 32,
}
_NODE_ID = {"maxLength": MAX_NAME_LENGTH, "pattern": _DNS_LABEL}
_POSITIVE = {"minimum": 0, "exclusiveMinimum": True}


@dataclass(frozen=True)
class ResourceKind:
    """One custom resource: names, the structs of its spec and status, and what the
    generated schema gets on top (limits, CEL rules, printer columns)."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: Any
    status: Any
    description: str
    constraints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Extra schema keywords by path (``spec.settings.number_of_shards``, ``a[].b{}``)."""
    rules: tuple[Mapping[str, str], ...] = ()
    """CEL rules on the whole object."""
    columns: tuple[Mapping[str, Any], ...] = ()
    drop: tuple[str, ...] = ()
    """Fields the control plane sets itself, left out of the schema (pruned if sent)."""

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


RESOURCES: tuple[ResourceKind, ...] = (
    ResourceKind(
        kind="Index",
        plural="indices",
        short_names=("cpidx",),
        spec=IndexSpec,
        status=IndexStatus,
        description="An index of the data system: settings and mappings, and (in status) "
        "where its shard copies live.",
        constraints={
            "spec.settings.number_of_shards": {
                "minimum": 1,
                "maximum": MAX_SHARDS,
                "x-kubernetes-validations": [
                    {
                        "rule": "self == oldSelf",
                        "message": "number_of_shards is fixed at creation (create a new index "
                        "to change it)",
                    }
                ],
            },
            "spec.settings.number_of_replicas": {"minimum": 0, "maximum": MAX_REPLICAS},
            "status.routing": {"maxItems": MAX_SHARDS},
            "status.routing[]": {
                "x-kubernetes-validations": [
                    {
                        "rule": "self.copies.filter(c, c.primary).size() == 1",
                        "message": "every shard has exactly one primary copy",
                    }
                ]
            },
            "status.routing[].shard": {"minimum": 0, "maximum": MAX_SHARDS - 1},
            "status.routing[].copies": {"minItems": 1, "maxItems": MAX_REPLICAS + 1},
            "status.routing[].copies[].node_id": _NODE_ID,
            "status.routing[].copies[].relocating_to": _NODE_ID,
            "status.conditions": _CONDITIONS,
        },
        rules=(_name_rule("index name"),),
        columns=(
            {"name": "Shards", "type": "integer", "jsonPath": ".spec.settings.number_of_shards"},
            {
                "name": "Replicas",
                "type": "integer",
                "jsonPath": ".spec.settings.number_of_replicas",
            },
            {"name": "Health", "type": "string", "jsonPath": ".status.health"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ),
    ),
    ResourceKind(
        kind="ClusterNode",
        plural="clusternodes",
        short_names=("cpnode",),
        spec=ClusterNodeSpec,
        status=ClusterNodeStatus,
        description="A node of the data system (heart-beats are Leases of the same name).",
        constraints={
            "spec.roles": {"maxItems": 8},
            "spec.zone": {"maxLength": MAX_NAME_LENGTH, "pattern": "^$|" + _DNS_LABEL},
            "spec.address": {"maxLength": 253},
            "spec.resources.cpu_cores": {"minimum": 0},
            "spec.resources.memory_bytes": {"minimum": 0},
            "spec.resources.disk_bytes": {"minimum": 0},
            "spec.resources.disk_available_bytes": {"minimum": 0},
            "status.conditions": _CONDITIONS,
        },
        rules=(_name_rule("node id"),),
        columns=(
            {"name": "Address", "type": "string", "jsonPath": ".spec.address"},
            {"name": "Zone", "type": "string", "jsonPath": ".spec.zone"},
            {"name": "Roles", "type": "string", "jsonPath": ".spec.roles"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ),
    ),
    ResourceKind(
        kind="Cluster",
        plural="clusters",
        short_names=("cpcluster",),
        spec=ClusterSpec,
        status=ClusterStatus,
        description="The cluster-wide configuration, feature flags and hash ring (one per "
        "control plane, named by its k8s.cluster_name).",
        constraints={
            "spec.config.node_timeout": _POSITIVE,
            "spec.config.max_lock_ttl": _POSITIVE,
            "spec.config.session_ttl": _POSITIVE,
            # no CEL rule on these keys: CEL cannot type a map of untyped values
            "spec.config.settings": {"maxProperties": _MAX_MAP_ENTRIES},
            "spec.featureFlags": _keys_rule("feature flag"),
            "spec.hashRing.vnodes": {"minimum": 1, "maximum": _MAX_VNODES},
            "spec.hashRing.replication_factor": {
                "minimum": 1,
                "maximum": _MAX_REPLICATION_FACTOR,
            },
            "spec.hashRing.nodes": {"x-kubernetes-list-type": "set", "maxItems": 10_000},
            "spec.hashRing.nodes[]": _NODE_ID,
            "status.conditions": _CONDITIONS,
        },
        drop=("spec.config.version", "spec.hashRing.version", "status.hashRing.version"),
        columns=(
            {"name": "Auto-Allocate", "type": "boolean", "jsonPath": ".spec.config.auto_allocate"},
            {"name": "Node-Timeout", "type": "number", "jsonPath": ".spec.config.node_timeout"},
            {"name": "VNodes", "type": "integer", "jsonPath": ".spec.hashRing.vnodes"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ),
    ),
)
"""Every custom resource of the k8s backend."""


def _merge(node: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if key == "x-kubernetes-validations":
            node.setdefault(key, []).extend(dict(rule) for rule in value)
        else:
            node[key] = value


def _object_schema(resource: ResourceKind) -> dict[str, Any]:
    spec = structural_schema(resource.spec)
    spec["default"] = {}
    status = structural_schema(resource.status)
    schema: dict[str, Any] = {
        "type": "object",
        "description": resource.description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    for path in resource.drop:
        parent, _, name = path.rpartition(".")
        node = _at(schema, parent)
        del node["properties"][name]
        if name in node.get("required", ()):
            node["required"].remove(name)
    for path, extra in resource.constraints.items():
        _merge(_at(schema, path), extra)
    if resource.rules:
        _merge(schema, {"x-kubernetes-validations": resource.rules})
    _prune_defaults(schema)
    return schema


def crd_manifests() -> list[dict[str, Any]]:
    """The CustomResourceDefinition of every resource, as dicts."""
    return [
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": resource.crd_name, "labels": dict(LABELS)},
            "spec": {
                "group": GROUP,
                "names": {
                    "kind": resource.kind,
                    "listKind": f"{resource.kind}List",
                    "plural": resource.plural,
                    "singular": resource.kind.lower(),
                    "shortNames": list(resource.short_names),
                    "categories": ["controlplane"],
                },
                "scope": "Namespaced",
                "versions": [
                    {
                        "name": VERSION,
                        "served": True,
                        "storage": True,
                        "schema": {"openAPIV3Schema": _object_schema(resource)},
                        "subresources": {"status": {}},
                        "additionalPrinterColumns": [dict(c) for c in resource.columns],
                    }
                ],
            },
        }
        for resource in RESOURCES
    ]


_HEADER = (
    "# Generated from the msgspec types by `python -m controlplane.backends.k8s.crds --write "
    "deploy/crds/`.\n# Do not edit: change controlplane/types.py or "
    "controlplane/backends/k8s/crds.py and regenerate.\n"
)


def render(manifest: Mapping[str, Any]) -> str:
    """One manifest as the YAML file that is committed."""
    return _HEADER + yaml.safe_dump(dict(manifest), sort_keys=False, width=100)


def write_manifests(directory: Path) -> list[Path]:
    """Write ``<plural>.<group>.yaml`` for every CRD into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for manifest in crd_manifests():
        path = directory / f"{manifest['metadata']['name']}.yaml"
        path.write_text(render(manifest))
        written.append(path)
    return written


def stale_manifests(directory: Path) -> list[str]:
    """The CRD files of ``directory`` that differ from (or are missing for) the generated ones."""
    stale = []
    for manifest in crd_manifests():
        path = directory / f"{manifest['metadata']['name']}.yaml"
        if not path.is_file() or path.read_text() != render(manifest):
            stale.append(path.name)
    return stale


def main(argv: Sequence[str] | None = None, out: Callable[[str], object] = print) -> int:
    """``--write DIR``: write the CRDs; ``--check DIR``: exit 1 if stale; else print them."""
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.backends.k8s.crds", description=main.__doc__
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="DIR", help="write one YAML file per CRD")
    action.add_argument("--check", type=Path, metavar="DIR", help="fail if DIR's CRDs are stale")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_manifests(args.write):
            out(f"wrote {path}")
    elif args.check:
        if stale := stale_manifests(args.check):
            out(
                f"stale CRDs in {args.check}: {', '.join(stale)}; regenerate with "
                f"python -m controlplane.backends.k8s.crds --write {args.check}"
            )
            return 1
        out(f"CRDs in {args.check} are up to date")
    else:
        out("---\n".join(render(m) for m in crd_manifests()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
