"""Reports of the Jobs the operator runs for a model, authenticated (``edgefleet_runtime.sealed``).

The operator holds a master key (the Secret ``settings.results_key_secret`` in its namespace, made on first
use). Each Job gets ``derive(master, "job:<job name>")`` in a Secret only its pod mounts and seals its report
with it; a report the operator accepted is sealed again under ``content:<content key>`` for the compile cache.
Nothing a pod can write without those keys is ever acted on: a forged or replayed report is refused with a
Warning event naming it.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from typing import Any

from edgefleet_runtime.sealed import ReportRejected, derive, open_sealed, seal

from ..artifacts import StoreError, own_store
from ..artifacts.store import push_file
from ..kube import Kube
from ..settings import Settings, store_login

log = logging.getLogger(__name__)
REPORT_MEDIA_TYPE = "application/vnd.edgefleet.compile-report+json"

__all__ = ["ReportRejected", "cache_key", "content_binding", "job_key", "master_key", "read_report", "seal_into_store"]


def master_key(kube: Kube, settings: Settings) -> bytes:
    """The operator's master key for reports, from its Secret; made (create only, never overwritten) when absent."""
    name, ns = settings.results_key_secret, settings.namespace
    secret = kube.find("Secret", name, ns)
    if secret is None:
        value = base64.b64encode(secrets.token_hex(32).encode()).decode()
        kube.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": name, "namespace": ns,
                                  "labels": {"app.kubernetes.io/managed-by": "edgefleet"}},
                     "data": {"key": value}})
        secret = kube.find("Secret", name, ns)  # another operator may have made it first: theirs counts
    encoded = ((secret or {}).get("data") or {}).get("key")
    if not encoded:
        raise RuntimeError(f"Secret {ns}/{name} has no data.key (the operator's report key); delete it to have a "
                           "new one made")
    return bytes.fromhex(base64.b64decode(encoded).decode())


def job_key(master: bytes, job_name: str) -> bytes:
    return derive(master, f"job:{job_name}")


def content_binding(key: str) -> str:
    return f"content:{key}"


def cache_key(master: bytes, content_key: str) -> bytes:
    """The key of the compile-cache entry for ``content_key``: only the operator holds it."""
    return derive(master, content_binding(content_key))


def read_report(settings: Settings, ref: str, key: bytes, binding: str) -> dict[str, Any] | None:
    """The report at ``ref`` when it is sealed for ``binding`` with ``key``; None when nothing is there (yet).
    ReportRejected when something is there that does not verify."""
    try:
        store = own_store(settings.artifact_store, ref, settings.artifact_insecure, *store_login(settings))
        raw = store.get(ref, "")
    except StoreError as err:
        log.debug("report %s not available: %s", ref, err)
        return None
    try:
        report = json.loads(open_sealed(key, binding, raw))
    except ValueError as err:
        raise ReportRejected(str(err)) from err
    if not isinstance(report, dict):
        raise ReportRejected("the sealed report is not a JSON object")
    return report


def seal_into_store(settings: Settings, ref: str, master: bytes, content_key: str, report: dict[str, Any]) -> None:
    """Push an accepted report to ``ref`` sealed with the operator's own key (best effort: a failure only means
    the next identical compile runs a Job again)."""
    binding = content_binding(content_key)
    data = seal(cache_key(master, content_key), binding, json.dumps(report, sort_keys=True).encode())
    try:
        push_file(ref, data, REPORT_MEDIA_TYPE, settings.artifact_insecure, *store_login(settings))
    except StoreError as err:
        log.warning("could not store the accepted report %s: %s", ref, err)
