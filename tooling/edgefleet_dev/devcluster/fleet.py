"""Fleet files: classes of fake edge nodes (labels, taints, capacity) that kwok keeps Ready."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")

DEFAULT_FLEET = Path(__file__).resolve().parents[3] / "examples" / "fleets" / "default.yaml"


class FleetError(ValueError):
    """A fleet file is invalid; the message names the file and the entry."""


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if len(key.split("/")[0]) > 253 or not _LABEL_KEY.match(key):
            raise ValueError(f"label key {key!r} is not a valid Kubernetes label key")
        if not _LABEL_VALUE.match(value):
            raise ValueError(f"label {key}={value!r}: the value must be <= 63 alphanumerics, '-', '_' or '.'")
    return labels


class Taint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class NodeClass(BaseModel):
    """One kind of device; `count` nodes named <name>-<i> are created."""

    model_config = ConfigDict(extra="forbid")
    name: str
    count: int = Field(1, ge=0, le=10000)
    labels: dict[str, str] = {}
    taints: list[Taint] = []
    capacity: dict[str, str] = {"cpu": "4", "memory": "4Gi", "pods": "110"}

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"name {v!r} must be a DNS label (lowercase alphanumerics and '-', <= 52 chars)")
        return v

    @field_validator("labels")
    @classmethod
    def _valid_labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)


class RuntimeClass(BaseModel):
    """A RuntimeClass the fleet's nodes offer (e.g. `nvidia`, installed by the NVIDIA GPU operator)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    handler: str


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["edgefleet.io/v1alpha1"] = "edgefleet.io/v1alpha1"
    kind: Literal["Fleet"] = "Fleet"
    classes: list[NodeClass] = Field(min_length=1)
    runtimeClasses: list[RuntimeClass] = []

    def cluster_objects(self) -> list[dict]:
        """Cluster-scoped objects the fleet brings besides its nodes."""
        return [
            {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": rc.name},
             "handler": rc.handler}
            for rc in self.runtimeClasses
        ]

    def nodes(self, scale: int | None = None) -> list[dict]:
        """Node manifests; `scale` overrides every class's count."""
        return [
            _node(cls, i) for cls in self.classes for i in range(scale if scale is not None else cls.count)
        ]


_NODE_INFO = ["machineID", "systemUUID", "bootID", "kernelVersion", "osImage", "containerRuntimeVersion",
              "kubeletVersion", "kubeProxyVersion"]


def _node(cls: NodeClass, index: int) -> dict:
    name = f"{cls.name}-{index}"
    labels = {"kubernetes.io/os": "linux", **cls.labels, "kubernetes.io/hostname": name, "type": "kwok"}
    arch = labels.get("kubernetes.io/arch", "amd64")
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "edgefleet.io/device-class": cls.name},
        },
        "spec": {"taints": [t.model_dump(exclude_defaults=False) for t in cls.taints]},
        "status": {
            "capacity": cls.capacity,
            "allocatable": cls.capacity,
            "nodeInfo": {"architecture": arch, "operatingSystem": "linux", **dict.fromkeys(_NODE_INFO, "")},
        },
    }


def _where(loc: tuple, data: dict) -> str:
    parts: list[str] = []
    node: Any = data
    for step in loc:
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
        node = node[step] if isinstance(node, (dict, list)) and _has(node, step) else None
        if isinstance(node, dict) and "name" in node and isinstance(step, int):
            parts.append(f" (class {node['name']!r})")
    return "".join(parts).lstrip(".")


def _has(node, step) -> bool:
    if isinstance(node, dict):
        return step in node
    return isinstance(node, list) and isinstance(step, int) and step < len(node)


def load_fleet(path: Path | str | None = None) -> Fleet:
    path = Path(path) if path else DEFAULT_FLEET
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FleetError(f"fleet file {path}: cannot read it: {err}") from err
    if not isinstance(data, dict):
        raise FleetError(f"fleet file {path}: expected a mapping with `classes:`")
    try:
        return Fleet.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{_where(e['loc'], data)}: {e['msg']}" for e in err.errors())
        raise FleetError(f"fleet file {path}: {problems}") from None
