"""The one module that talks to the Kubernetes API: reads, server-side apply, status patches, events."""

from __future__ import annotations

import datetime
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config

log = logging.getLogger(__name__)
GROUP, VERSION = "edgefleet.io", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# kind -> (apiVersion, plural, namespaced)
KINDS = {
    "HardwareProfile": (API_VERSION, "hardwareprofiles", False),
    "EdgeModel": (API_VERSION, "edgemodels", True),
    "EdgeDeployment": (API_VERSION, "edgedeployments", True),
    "DaemonSet": ("apps/v1", "daemonsets", True),
    "Deployment": ("apps/v1", "deployments", True),
    "Service": ("v1", "services", True),
    "ConfigMap": ("v1", "configmaps", True),
    "Node": ("v1", "nodes", False),
    "Event": ("v1", "events", True),
    "Job": ("batch/v1", "jobs", True),
    "Pod": ("v1", "pods", True),
    "Secret": ("v1", "secrets", True),
    "ServiceAccount": ("v1", "serviceaccounts", True),
    "FederatedTraining": (API_VERSION, "federatedtrainings", True),
}


METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
METADATA_EVENTS = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


class WatchExpired(RuntimeError):
    """410 Gone: the watch's resourceVersion is too old; list again."""


class NotFound(LookupError):
    """404: `body` is the API server's Status (JSON), when it sent one."""

    def __init__(self, what: str, body: str = ""):
        super().__init__(what)
        self.body = body


class ApiError(RuntimeError):
    """The API server answered with an error status; `reason` is its Status reason (Invalid, Forbidden, ...)."""

    def __init__(self, status: int, body: str):
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        parsed = parsed if isinstance(parsed, dict) else {}
        message = parsed.get("message", body)
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.reason = str(parsed.get("reason", ""))
        self.message = str(message)
        details = parsed.get("details")
        self.details: dict[str, Any] = details if isinstance(details, dict) else {}


def _watch_event(line: bytes) -> tuple[str, str, dict[str, str], str]:
    event = json.loads(line)
    kind, obj = event.get("type", ""), event.get("object") or {}
    if kind == "ERROR":
        if obj.get("code") == 410:
            raise WatchExpired(obj.get("message", "resourceVersion too old"))
        raise ApiError(int(obj.get("code") or 500), json.dumps(obj))
    meta = obj.get("metadata") or {}
    return kind, meta.get("name", ""), meta.get("labels") or {}, str(meta.get("resourceVersion", ""))


def _path(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    api_version, plural, namespaced = KINDS[kind]
    path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


@dataclass
class Kube:
    api: client.ApiClient
    field_manager: str = "edgefleet"

    @classmethod
    def connect(cls, field_manager: str = "edgefleet", kubeconfig: str | None = None) -> Kube:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"))
        return cls(client.ApiClient(), field_manager)

    def _call(self, method: str, path: str, body: Any = None, query: list | None = None,
              content_type: str = "application/json", accept: str = "application/json") -> Any:
        _, url, headers, data, _ = self.api.param_serialize(
            method, path, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Content-Type": content_type, "Accept": accept},
        )
        response = self.api.call_api(method, url, header_params=headers, body=data, _request_timeout=60)
        payload = response.read()
        if response.status == 404:
            raise NotFound(path, payload.decode(errors="replace"))
        if response.status >= 400:
            raise ApiError(response.status, payload.decode(errors="replace"))
        return json.loads(payload) if payload else None

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        return self._call("GET", _path(kind, namespace, name))

    def find(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.get(kind, name, namespace)
        except NotFound:
            return None

    def list(self, kind: str, namespace: str | None = None, labels: dict[str, str] | None = None) -> list[dict]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items()))] if labels else []
        return self._call("GET", _path(kind, namespace), query=query).get("items", [])

    def list_labels(self, kind: str, page: int = 500) -> dict[str, dict[str, str]]:
        return self.list_labels_at(kind, page)[0]

    def list_labels_at(self, kind: str, page: int = 500) -> tuple[dict[str, dict[str, str]], str]:
        """name -> labels of every object of a cluster-scoped kind, and the list's resourceVersion (to watch
        from), read as metadata only and page by page: a 10,000-node fleet as full objects is tens of MB of
        JSON, several times that as Python objects."""
        found: dict[str, dict[str, str]] = {}
        token = ""
        while True:
            query = [("limit", str(page))] + ([("continue", token)] if token else [])
            answer = self._call("GET", _path(kind), query=query, accept=METADATA_ONLY)
            for item in answer.get("items", []):
                found[item["metadata"]["name"]] = item["metadata"].get("labels") or {}
            meta = answer.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return found, str(meta.get("resourceVersion", ""))

    def watch_labels(self, kind: str, version: str, seconds: int = 300,
                     opened: Callable[[Any], None] | None = None) -> Iterator[tuple[str, str, dict[str, str], str]]:
        """(type, name, labels, resourceVersion) for each change of a cluster-scoped kind after `version`, as
        metadata only, until the server ends the watch (after `seconds`). BOOKMARK events carry only the version.
        `opened` gets the streaming response (to shut it down from another thread). Raises WatchExpired on 410."""
        query = [("watch", "true"), ("resourceVersion", version), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", str(seconds))]
        _, url, headers, _, _ = self.api.param_serialize(
            "GET", _path(kind), query_params=query, auth_settings=["BearerToken"],
            header_params={"Accept": METADATA_EVENTS})
        response = self.api.call_api("GET", url, header_params=headers, _request_timeout=(10, seconds + 30))
        if response.status == 410:
            raise WatchExpired(response.read().decode(errors="replace"))
        if response.status >= 400:
            raise ApiError(response.status, response.read().decode(errors="replace"))
        if opened:
            opened(response.response)
        try:
            for line in response.response:
                if line.strip():
                    yield _watch_event(line)
        finally:
            response.response.release_conn()

    def apply(self, obj: dict, force: bool = True) -> dict:
        """Server-side apply with our field manager. `force` takes over fields others set (our children);
        without it a field someone else changed is a conflict (ApiError 409) and stays theirs.
        A 404 is an ApiError: apply creates what is missing, so it means the namespace or the kind is missing,
        which no retry fixes."""
        meta = obj["metadata"]
        try:
            return self._call(
                "PATCH", _path(obj["kind"], meta.get("namespace"), meta["name"]), body=obj,
                query=[("fieldManager", self.field_manager), ("force", "true" if force else "false")],
                content_type="application/apply-patch+yaml",
            )
        except NotFound as err:
            raise ApiError(404, err.body or json.dumps({"reason": "NotFound", "message": str(err)})) from err

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """POST `obj`; None when it exists already (409 AlreadyExists). For objects the operator may create but
        not read (a FederatedTraining run's Secret): the answer is never a copy of someone else's object. A 404
        (the namespace or kind is missing) is an ApiError, as in `apply`."""
        meta = obj["metadata"]
        try:
            return self._call("POST", _path(obj["kind"], meta.get("namespace")), body=obj,
                              query=[("fieldManager", self.field_manager)])
        except ApiError as err:
            if err.status == 409:
                return None
            raise
        except NotFound as err:  # as in apply: a missing namespace or kind, which no retry fixes
            raise ApiError(404, err.body or json.dumps({"reason": "NotFound", "message": str(err)})) from err

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        try:
            self._call("DELETE", _path(kind, namespace, name), body={"propagationPolicy": "Background"})
        except NotFound:
            pass

    def patch(self, kind: str, name: str, namespace: str | None, body: dict) -> dict:
        """JSON merge patch: a null removes a field whoever set it (server-side apply cannot drop another
        manager's field, e.g. the configMap of a source the user wrote)."""
        return self._call("PATCH", _path(kind, namespace, name), body=body,
                          content_type="application/merge-patch+json")

    def patch_status(self, kind: str, name: str, namespace: str | None, status: dict) -> dict:
        return self._call("PATCH", _path(kind, namespace, name, "status"), body={"status": status},
                          content_type="application/merge-patch+json")

    def event(self, obj: dict, reason: str, message: str, type_: str = "Normal") -> None:
        """Post an event; a failure is logged, never fatal (the state it reports is in status too)."""
        try:
            self._post_event(obj, reason, message, type_)
        except (ApiError, NotFound) as err:
            log.warning("could not post event %s on %s: %s", reason, obj["metadata"]["name"], err)

    def _post_event(self, obj: dict, reason: str, message: str, type_: str) -> None:
        meta = obj["metadata"]
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        namespace = meta.get("namespace") or "default"
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta.get("namespace"), "uid": meta.get("uid")},
            "reason": reason, "message": message[:1024], "type": type_,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": "edgefleet-operator"}, "reportingComponent": "edgefleet.io/operator",
        }
        self._call("POST", _path("Event", namespace), body=body)
