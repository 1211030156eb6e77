"""An in-memory stand-in for `edgefleet.kube.Kube`, the one module that writes to the API server.

Same methods, objects kept in a dict. It does what the reconcilers rely on: server-side apply keeps the
status and bumps metadata.generation when the spec changes, lists carry no `kind` (as the API's lists),
label selectors filter, status patches merge (JSON merge patch). A test plays the other controllers by
setting status (`set_status`) and adding pods, and injects API errors per verb, kind and name (`fail`).
"""

from __future__ import annotations

import copy
import itertools
import json

from edgefleet.kube import KINDS, ApiError, Kube, NotFound


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386: dicts merge, None deletes, anything else replaces."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def api_error(status: int, message: str, reason: str = "", details: dict | None = None) -> ApiError:
    """An ApiError with the body the API server sends (a metav1.Status)."""
    return ApiError(status, json.dumps({"kind": "Status", "status": "Failure", "message": message,
                                       "reason": reason, "code": status, **({"details": details} if details else {})}))


def no_namespace(namespace: str) -> ApiError:
    """What Kube.apply raises for a write into a namespace that does not exist (the API server's 404)."""
    return api_error(404, f'namespaces "{namespace}" not found', "NotFound", {"name": namespace, "kind": "namespaces"})


class FakeKube(Kube):
    """Kube's reads (find) over an in-memory store: only the verbs that reach the API server are faked."""

    def __init__(self) -> None:
        super().__init__(api=None, field_manager="edgefleet")  # no ApiClient: nothing here talks to a server
        self.objects: dict[tuple[str, str | None, str], dict] = {}
        self.events: list[dict] = []
        self.calls: list[tuple[str, str, str | None]] = []  # (verb, kind, name)
        self._errors: dict[tuple[str, str, str | None], Exception | None] = {}
        self._uids = itertools.count(1)

    # ---- test controls

    def fail(self, verb: str, kind: str, error: Exception, name: str | None = None) -> None:
        """Raise `error` on every `verb` ("apply", "list", ...) of `kind` (named `name`, or any)."""
        self._errors[(verb, kind, name)] = error

    def allow(self, verb: str, kind: str, name: str) -> None:
        """Let `verb` of the object `name` through a `fail` of its whole kind (RBAC that names one object, e.g. the
        operator's own Secret in its namespace)."""
        self._errors[(verb, kind, name)] = None

    def heal(self) -> None:
        self._errors.clear()

    def add(self, obj: dict) -> dict:
        """Create `obj` as the API server would (uid, generation 1)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta.setdefault("generation", 1)
        self.objects[self._key(obj["kind"], meta.get("namespace"), meta["name"])] = obj
        return copy.deepcopy(obj)

    def set_status(self, kind: str, name: str, namespace: str | None, status: dict) -> None:
        self.objects[self._key(kind, namespace, name)]["status"] = copy.deepcopy(status)

    def stored(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        return self.objects.get(self._key(kind, namespace, name))

    def warnings(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "Warning"]

    # ---- the Kube interface

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        self._record("get", kind, name)
        obj = self.objects.get(self._key(kind, namespace, name))
        if obj is None:
            raise NotFound(f"{kind} {namespace}/{name}")
        return copy.deepcopy(obj)

    def list(self, kind: str, namespace: str | None = None, labels: dict[str, str] | None = None) -> list[dict]:
        self._record("list", kind, None)
        found = []
        for (k, ns, _), obj in sorted(self.objects.items(), key=lambda kv: str(kv[0])):
            have = obj["metadata"].get("labels") or {}
            if k == kind and (namespace is None or ns == namespace) and all(
                    have.get(key) == value for key, value in (labels or {}).items()):
                found.append({key: copy.deepcopy(v) for key, v in obj.items() if key not in ("kind", "apiVersion")})
        return found

    def apply(self, obj: dict, force: bool = True) -> dict:
        meta = obj["metadata"]
        self._record("apply", obj["kind"], meta["name"])
        key = self._key(obj["kind"], meta.get("namespace"), meta["name"])
        old = self.objects.get(key)
        new = copy.deepcopy(obj)
        if old is None:
            return self.add(new)
        new["metadata"] = {**old["metadata"], **new["metadata"]}
        if old.get("spec") != new.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if "status" in old:
            new["status"] = old["status"]
        self.objects[key] = new
        return copy.deepcopy(new)

    def create(self, obj: dict) -> dict | None:
        meta = obj["metadata"]
        self._record("create", obj["kind"], meta["name"])
        if self._key(obj["kind"], meta.get("namespace"), meta["name"]) in self.objects:
            return None  # 409 AlreadyExists
        return self.add(obj)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        self._record("delete", kind, name)
        self.objects.pop(self._key(kind, namespace, name), None)

    def patch(self, kind: str, name: str, namespace: str | None, body: dict) -> dict:
        self._record("patch", kind, name)
        key = self._key(kind, namespace, name)
        if key not in self.objects:
            raise NotFound(f"{kind} {namespace}/{name}")
        old = self.objects[key]
        new = merge_patch(copy.deepcopy(old), body)
        if old.get("spec") != new.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self.objects[key] = new
        return copy.deepcopy(new)

    def patch_status(self, kind: str, name: str, namespace: str | None, status: dict) -> dict:
        self._record("patch_status", kind, name)
        key = self._key(kind, namespace, name)
        if key not in self.objects:
            raise NotFound(f"{kind} {namespace}/{name}")
        obj = self.objects[key]
        obj["status"] = merge_patch(obj.get("status") or {}, status)
        return copy.deepcopy(obj)

    def event(self, obj: dict, reason: str, message: str, type_: str = "Normal") -> None:
        self.events.append({"object": obj["metadata"]["name"], "reason": reason, "message": message, "type": type_})

    # ---- helpers

    def _record(self, verb: str, kind: str, name: str | None) -> None:
        self.calls.append((verb, kind, name))
        if (verb, kind, name) in self._errors:
            error = self._errors[(verb, kind, name)]
        else:
            error = self._errors.get((verb, kind, None))
        if error is not None:
            raise error

    @staticmethod
    def _key(kind: str, namespace: str | None, name: str) -> tuple[str, str | None, str]:
        return kind, namespace if KINDS[kind][2] else None, name
