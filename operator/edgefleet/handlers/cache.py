"""Reads from the watch streams instead of the API: the reconcilers read their objects and children here.

`Cache` holds what the operator's watches deliver (EdgeDeployments, EdgeModels, HardwareProfiles,
FederatedTrainings and the DaemonSets, Deployments and Services we manage), primed by one list per kind at
start-up. `CachedKube` is the one writer with reads of those kinds answered from the cache and every write
passed on (its answer goes into the cache, so the next reconcile sees its own write before the watch delivers
it).
A resync of an unchanged world therefore sends nothing to the API server.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from ..kube import KINDS, Kube, NotFound

Key = tuple[str, str | None, str]  # (kind, namespace, name)
CACHED = ("EdgeDeployment", "EdgeModel", "HardwareProfile", "FederatedTraining", "DaemonSet", "Deployment",
          "Service")
CHILDREN = ("DaemonSet", "Deployment", "Service")  # only ours: watched and listed with our managed-by label


def _version(obj: dict) -> int | None:
    try:
        return int(obj["metadata"].get("resourceVersion", ""))
    except ValueError:
        return None


def _slim(obj: dict) -> dict:
    """A copy without managedFields (big, and never read)."""
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "managedFields"}
    return copy.deepcopy({**obj, "metadata": meta})


class Cache:
    def __init__(self) -> None:
        self._objects: dict[Key, dict] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, namespace: str | None, name: str) -> Key:
        return kind, namespace if KINDS[kind][2] else None, name

    def put(self, kind: str, obj: dict) -> None:
        """Store `obj` unless the cache holds a newer version of it (a write's answer beat its watch event)."""
        meta = obj["metadata"]
        key = self.key(kind, meta.get("namespace"), meta["name"])
        new = _slim(obj)
        new["kind"] = kind
        with self._lock:
            old = self._objects.get(key)
            old_version, new_version = (_version(old), _version(new)) if old is not None else (None, None)
            if old_version is not None and new_version is not None and new_version < old_version:
                return
            self._objects[key] = new

    def drop(self, kind: str, namespace: str | None, name: str) -> None:
        with self._lock:
            self._objects.pop(self.key(kind, namespace, name), None)

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        with self._lock:
            obj = self._objects.get(self.key(kind, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, kind: str, namespace: str | None, labels: dict[str, str] | None) -> list[dict]:
        with self._lock:
            found = [o for (k, ns, _), o in self._objects.items() if k == kind and namespace in (None, ns)
                     and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in (labels or {}).items())]
            return copy.deepcopy(sorted(found, key=lambda o: o["metadata"]["name"]))

    def prime(self, kube: Kube, managed: dict[str, str]) -> None:
        """One list per cached kind (children: only ours), before the first reconcile."""
        for kind in CACHED:
            for obj in kube.list(kind, labels=managed if kind in CHILDREN else None):
                self.put(kind, obj)


class CachedKube(Kube):
    """The one writer, with reads of the cached kinds served from `cache`. Children are read only with
    labels that include ours (the reconcilers' child labels do), so the cache holds all they can ask for."""

    def __init__(self, kube: Kube, cache: Cache) -> None:
        super().__init__(kube.api, kube.field_manager)
        self.kube, self.cache = kube, cache

    def _call(self, *args: Any, **kwargs: Any) -> Any:  # what Kube does itself (list_labels, ...) goes to `kube`
        return self.kube._call(*args, **kwargs)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        if kind not in CACHED:
            return self.kube.get(kind, name, namespace)
        obj = self.cache.get(kind, namespace, name)
        if obj is None:
            raise NotFound(f"{kind} {namespace}/{name}")
        return obj

    def find(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        if kind not in CACHED:
            return self.kube.find(kind, name, namespace)
        return self.cache.get(kind, namespace, name)

    def list(self, kind: str, namespace: str | None = None, labels: dict[str, str] | None = None) -> list[dict]:
        if kind not in CACHED:
            return self.kube.list(kind, namespace, labels)
        return self.cache.list(kind, namespace, labels)

    def apply(self, obj: dict, force: bool = True) -> dict:
        live = self.kube.apply(obj, force)
        self._remember(obj["kind"], live)
        return live

    def patch(self, kind: str, name: str, namespace: str | None, body: dict) -> dict:
        live = self.kube.patch(kind, name, namespace, body)
        self._remember(kind, live)
        return live

    def patch_status(self, kind: str, name: str, namespace: str | None, status: dict) -> dict:
        live = self.kube.patch_status(kind, name, namespace, status)
        self._remember(kind, live)
        return live

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        self.kube.delete(kind, name, namespace)
        if kind in CACHED:
            self.cache.drop(kind, namespace, name)

    def event(self, obj: dict, reason: str, message: str, type_: str = "Normal") -> None:
        self.kube.event(obj, reason, message, type_)

    def __getattr__(self, name: str) -> Any:  # anything else the writer offers
        return getattr(self.kube, name)

    def _remember(self, kind: str, live: Any) -> None:
        if kind in CACHED and isinstance(live, dict) and live.get("metadata"):
            self.cache.put(kind, live)
