"""Reading what an EdgeModel or a FederatedTraining points at, shared by the compile executors and federated runs.

A URI a user names is read anonymously (never with the operator's store credentials, see artifacts.own_store),
within a size cap and a total deadline, and without redirects that lower security (edgefleet_runtime.bounded).
"""

from __future__ import annotations

import base64
import os
from typing import Any

from edgefleet_runtime.bounded import Limits
from edgefleet_runtime.fetch import FetchError, FetchLimit, read_source

from ..api import ConfigMapKeyRef
from ..compiler import CompileError
from ..compiler.core import LIMIT_FIX
from ..kube import Kube
from ..settings import Settings


def config_map_bytes(kube: Kube, namespace: str, ref: ConfigMapKeyRef) -> bytes:
    """The bytes under `ref.key` of ConfigMap `ref.name` (binaryData or data); CompileError when absent."""
    cm = kube.find("ConfigMap", ref.name, namespace)
    if cm is None:
        raise CompileError("SourceUnavailable", f"ConfigMap {ref.name!r} not found in {namespace}",
                           "create it, e.g. kubectl create configmap NAME --from-file=KEY=FILE")
    if ref.key in (cm.get("binaryData") or {}):
        return base64.b64decode(cm["binaryData"][ref.key])
    if ref.key in (cm.get("data") or {}):
        return str(cm["data"][ref.key]).encode()
    raise CompileError("SourceUnavailable", f"ConfigMap {ref.name!r} has no key {ref.key!r}",
                       "point configMap.key at one of its keys")


def without_none(variant: dict[str, Any]) -> dict[str, Any]:
    """A status variant without unset fields (a merge patch would treat None as 'delete')."""
    return {k: v for k, v in variant.items() if v is not None}


def uri_bytes(settings: Settings, uri: str, what: str, digest: str = "", max_bytes: int | None = None) -> bytes:
    """The bytes at a URI the user named (`what`: the field), anonymously, within settings.source_max_bytes (or
    the smaller `max_bytes`) and settings.source_deadline_seconds. CompileError names the field and the limit
    hit (reason SourceLimitExceeded) or why it could not be read (SourceUnavailable)."""
    size = min(settings.source_max_bytes, max_bytes or settings.source_max_bytes)
    limits = Limits(max_bytes=size, deadline_seconds=settings.source_deadline_seconds)
    insecure = os.environ.get("EDGEFLEET_OCI_INSECURE") == "1" or settings.artifact_insecure
    try:
        return read_source(uri, limits, digest, insecure=insecure)
    except FetchLimit as e:
        raise CompileError("SourceLimitExceeded", f"{what}: {e}", LIMIT_FIX[e.limit]) from e
    except FetchError as e:
        raise CompileError("SourceUnavailable", f"{what}: {e}",
                           "check the URI, and that it is readable without credentials") from e
