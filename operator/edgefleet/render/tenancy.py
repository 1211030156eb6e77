"""What a namespace may get through edgefleet objects, decided from cluster-scoped HardwareProfiles only.

A namespace user gets no more through edgefleet than Pod Security would give them directly: a privileged
class (privileged container or host devices) runs only in namespaces its profile lists in allowedNamespaces,
and a FederatedTraining reads only host directories and tolerates only taints that the profiles of its nodes
allow. Pure: the reconcilers turn a Refusal into a condition and an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from ..api import HardwareProfile
from ..api.federated import FederatedTraining
from ..api.models import Toleration, is_privileged


@dataclass(frozen=True)
class Refusal:
    """Why a namespace may not have what it asked for: a CamelCase reason, what happened, and the fix."""

    reason: str
    message: str
    fix: str


def class_refusal(profile: HardwareProfile, namespace: str) -> Refusal | None:
    """None when EdgeDeployments of `namespace` may use the class; a privileged class needs the namespace in
    spec.allowedNamespaces, an unprivileged one only when that list is set."""
    name = profile.metadata["name"]
    allowed = profile.spec.allowed_namespaces or []
    if namespace in allowed or (not allowed and not is_privileged(profile.spec)):
        return None
    if allowed:
        what = f"HardwareProfile {name} spec.allowedNamespaces does not list namespace {namespace}"
    else:
        what = (f"HardwareProfile {name} runs privileged pods (spec.privileged or spec.deviceMounts) and its "
                f"spec.allowedNamespaces is empty, so no namespace may use it")
    return Refusal("ClassNotAllowed", what,
                   f"a cluster admin who trusts namespace {namespace} with these pods adds it to HardwareProfile "
                   f"{name} spec.allowedNamespaces; until then its nodes serve nothing for this EdgeDeployment")


def _covers(allowed: str, path: str) -> bool:
    """Whether `path` is `allowed` or lies below it (whole path segments; both absolute, without '..')."""
    a, p = PurePosixPath(allowed), PurePosixPath(path)
    return p == a or a in p.parents


def _same(a: Toleration, b: Toleration) -> bool:
    """The same toleration (tolerationSeconds aside; operator defaults to Equal, as Kubernetes' does)."""
    same = all((getattr(a, k) or None) == (getattr(b, k) or None) for k in ("key", "value", "effect"))
    return same and (a.operator or "Equal") == (b.operator or "Equal")


def federated_refusal(ft: FederatedTraining, classes: dict[str, HardwareProfile | None]) -> Refusal | None:
    """None when every participating node (name -> its class, None for none) allows the run's
    spec.localData.hostPath for its namespace and lists each of its spec.participants.tolerations."""
    ns, path = ft.metadata["namespace"], ft.spec.local_data.host_path
    for node, profile in sorted(classes.items()):
        if profile is None:
            return Refusal("NodeWithoutClass", f"participating node {node} matches no HardwareProfile, so no "
                           "host directory is allowed there for spec.localData.hostPath",
                           "narrow spec.participants to nodes of a hardware class (hardwareClasses)")
        name = profile.metadata["name"]
        if not any(ns in d.namespaces and _covers(d.host_path, path) for d in profile.spec.local_data_paths):
            return Refusal("HostPathNotAllowed", f"spec.localData.hostPath {path} is not allowed for namespace {ns}"
                           f" on node {node} (class {name})",
                           f"use a directory HardwareProfile {name} spec.localDataPaths allows for {ns}, or a "
                           f"cluster admin adds {{hostPath: {path}, namespaces: [{ns}]}} there")
        for t in ft.spec.participants.tolerations:
            if not any(_same(t, mine) for mine in profile.spec.tolerations):
                return Refusal("TolerationNotAllowed", f"spec.participants.tolerations: {t.to_dict()} is not one "
                               f"of the tolerations of node {node}'s class {name}",
                               f"remove it, or tolerate only taints HardwareProfile {name} spec.tolerations lists")
    return None
