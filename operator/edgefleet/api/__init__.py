"""edgefleet.api: the edgefleet.io/v1alpha1 kinds as pydantic models (the source of truth for the CRDs).

Public helpers:
- `load(obj)`: a manifest dict -> HardwareProfile | EdgeModel | EdgeDeployment (by kind).
- `label_selector_matches(selector, labels)`: metav1.LabelSelector semantics, pure.
- `best_profile(profiles, labels)`: the HardwareProfile a node belongs to (highest priority wins).
- `builtin_profiles()`: the HardwareProfiles edgefleet ships (operator/edgefleet/profiles/*.yaml).
- `format_errors(validation_error)`: pydantic errors worded like the API server's (`spec.x: message`).
Dump any model to its wire form with `model.to_dict()`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, cast

import yaml

from .base import (
    API_VERSION,
    AVAILABLE,
    COMPILED,
    DEGRADED,
    DRIFTING,
    GROUP,
    PROGRESSING,
    READY,
    VERSION,
    Condition,
    LabelSelector,
    LabelSelectorRequirement,
    Model,
    Rule,
    format_errors,
    label_selector_matches,
)
from .federated import FederatedTraining
from .models import (
    KINDS,
    AccuracyBudget,
    Budget,
    ClassStatus,
    ConfigMapKeyRef,
    DataRef,
    DeviceMount,
    Distillation,
    EdgeDeployment,
    EdgeDeploymentSpec,
    EdgeDeploymentStatus,
    EdgeModel,
    EdgeModelSpec,
    EdgeModelStatus,
    HardwareProfile,
    HardwareProfileSpec,
    HardwareProfileStatus,
    HealthGate,
    ModelRef,
    ObjectBase,
    Optimization,
    Pruning,
    Rollout,
    RuntimeSettings,
    ServiceSettings,
    Source,
    Target,
    TargetProfiles,
    Toleration,
    Variant,
)

KINDS["FederatedTraining"] = FederatedTraining
Resource = HardwareProfile | EdgeModel | EdgeDeployment | FederatedTraining


def load(obj: dict[str, Any]) -> Resource:
    """Validate a manifest (dict) into the model for its kind; raises ValueError for another
    apiVersion or kind and pydantic.ValidationError for an invalid object."""
    if obj.get("apiVersion") != API_VERSION:
        raise ValueError(f"apiVersion must be {API_VERSION}, got {obj.get('apiVersion')!r}")
    cls = KINDS.get(obj.get("kind", ""))
    if cls is None:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {obj.get('kind')!r}")
    return cast(Resource, cls.model_validate(obj))  # KINDS holds exactly these kinds


def best_profile(profiles: list[HardwareProfile], labels: dict[str, str]) -> HardwareProfile | None:
    """The profile a node with `labels` belongs to: the highest priority among the profiles whose
    nodeSelector matches, ties broken by name (alphabetical first); None when none matches."""
    matching = [p for p in profiles if label_selector_matches(p.spec.node_selector, labels)]
    if not matching:
        return None
    return min(matching, key=lambda p: (-p.spec.priority, p.metadata.get("name", "")))


SHIPPED_REGISTRY = "ghcr.io/edgefleet"  # the registry prefix the profile files name


def builtin_profiles(registry: str = SHIPPED_REGISTRY, digests: dict[str, str] | None = None) -> list[HardwareProfile]:
    """The built-in HardwareProfiles (cpu-amd64, cpu-arm64, nvidia-jetson, nvidia-gpu,
    coral-edgetpu, intel-openvino), sorted by name, their runtime images taken from `registry` and pinned by
    `digests` (image name -> sha256:...) where given."""
    folder = resources.files("edgefleet") / "profiles"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    profiles = []
    for f in files:
        doc = yaml.safe_load(f.read_text())
        doc["spec"]["runtimeImage"] = _image(doc["spec"]["runtimeImage"], registry, digests or {})
        profiles.append(HardwareProfile.model_validate(doc))
    return sorted(profiles, key=lambda p: p.metadata["name"])


def _image(ref: str, registry: str, digests: dict[str, str]) -> str:
    name, _, tag = ref.removeprefix(SHIPPED_REGISTRY + "/").partition(":")
    repo = f"{registry.rstrip('/')}/{name}"
    return f"{repo}@{digests[name]}" if name in digests else f"{repo}:{tag}"


__all__ = [
    "FederatedTraining",
    "API_VERSION", "AVAILABLE", "COMPILED", "DEGRADED", "DRIFTING", "GROUP", "KINDS", "PROGRESSING", "READY", "VERSION",
    "AccuracyBudget", "Budget", "ClassStatus", "Condition", "ConfigMapKeyRef", "DataRef", "DeviceMount",
    "EdgeDeployment", "EdgeDeploymentSpec", "EdgeDeploymentStatus", "EdgeModel", "EdgeModelSpec",
    "EdgeModelStatus", "HardwareProfile", "HardwareProfileSpec", "HardwareProfileStatus", "HealthGate",
    "LabelSelector", "LabelSelectorRequirement", "Model", "ModelRef", "ObjectBase", "Optimization", "Pruning",
    "Distillation",
    "Resource", "Rollout", "Rule", "RuntimeSettings", "ServiceSettings", "Source", "Target",
    "TargetProfiles", "Toleration", "Variant", "best_profile", "builtin_profiles", "format_errors",
    "label_selector_matches", "load",
]
