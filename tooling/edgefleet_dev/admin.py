"""What a cluster admin does to HardwareProfiles for a namespace (docs/security.md): trust it with the privileged
classes (spec.allowedNamespaces), or let its FederatedTrainings read a node directory (spec.localDataPaths).
The demo, the tests and the benchmarks act as the admin of their own cluster through these; nothing here
weakens the rules, it fills in the admin's side of them. (Tolerations of the real node's taint:
tests/real_node_helpers.py and demo.tolerate_real_node.)"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from edgefleet.api import HardwareProfile
from edgefleet.api.models import is_privileged

ATTEMPTS = 5  # a patch that lost a race with another writer (resourceVersion changed) is made again


class AdminError(RuntimeError):
    """A HardwareProfile could not be changed."""


def _profiles(cluster) -> list[dict[str, Any]]:
    return json.loads(cluster.kubectl("get", "hardwareprofiles", "-o", "json").stdout)["items"]


def _namespaces(cluster) -> set[str]:
    return set(cluster.kubectl("get", "namespaces", "-o", "jsonpath={.items[*].metadata.name}").stdout.split())


def _patch(cluster, name: str, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Set the spec fields `edit` returns for the live spec, only if nobody changed the profile meanwhile."""
    why = ""
    for _ in range(ATTEMPTS):
        live = json.loads(cluster.kubectl("get", "hardwareprofile", name, "-o", "json").stdout)
        fields = edit(live["spec"])
        if all(live["spec"].get(k) == v for k, v in fields.items()):
            return
        ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": live["metadata"]["resourceVersion"]},
               *({"op": "add", "path": f"/spec/{k}", "value": v} for k, v in fields.items())]
        done = cluster.kubectl("patch", "hardwareprofile", name, "--type=json", "-p", json.dumps(ops), check=False)
        if done.returncode == 0:
            return
        why = done.stderr.strip()
    raise AdminError(f"HardwareProfile {name}: patching spec {', '.join(sorted(fields))} failed {ATTEMPTS} times; "
                     f"last: {why}")


def trust_with_privileged_classes(cluster, namespace: str) -> list[str]:
    """Add `namespace` to spec.allowedNamespaces of every privileged HardwareProfile (privileged or deviceMounts,
    e.g. coral-edgetpu), dropping namespaces that no longer exist so a long-lived cluster's lists stay short.
    Returns the profiles' names."""
    names = sorted(p["metadata"]["name"] for p in _profiles(cluster)
                   if is_privileged(HardwareProfile.model_validate(p).spec))
    existing = _namespaces(cluster) | {namespace}
    for name in names:
        _patch(cluster, name, lambda spec: {"allowedNamespaces": sorted(
            {n for n in spec.get("allowedNamespaces") or [] if n in existing} | {namespace})})
    return names


@contextlib.contextmanager
def local_data_allowed(cluster, profile: str, host_path: str, namespace: str) -> Iterator[None]:
    """While open, FederatedTrainings of `namespace` on `profile`'s nodes may read `host_path` (an entry of its
    spec.localDataPaths, removed on exit). Entries whose namespaces are all gone are dropped on the way in (the
    list holds at most 16)."""
    existing = _namespaces(cluster) | {namespace}

    def add(spec: dict[str, Any]) -> dict[str, Any]:
        kept = [{**p, "namespaces": [n for n in p["namespaces"] if n in existing]}
                for p in spec.get("localDataPaths") or [] if p["hostPath"] != host_path]
        return {"localDataPaths": [p for p in kept if p["namespaces"]]
                + [{"hostPath": host_path, "namespaces": [namespace]}]}

    _patch(cluster, profile, add)
    try:
        yield
    finally:
        _patch(cluster, profile, lambda spec: {"localDataPaths": [
            p for p in spec.get("localDataPaths") or [] if p["hostPath"] != host_path]})
