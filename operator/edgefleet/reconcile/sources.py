"""Reading what an EdgeModel points at, shared by the inline and the Job compile executors."""

from __future__ import annotations

import base64
from typing import Any

from ..api import ConfigMapKeyRef
from ..compiler import CompileError
from ..kube import Kube


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
