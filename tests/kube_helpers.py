"""Small helpers the cluster tests share."""

from __future__ import annotations

import json
import time
from collections.abc import Callable


def apply(cluster, namespace: str | None, obj: dict | list) -> None:
    docs = obj if isinstance(obj, list) else [obj]
    ns = ["-n", namespace] if namespace else []
    cluster.kubectl("apply", "--server-side", "--force-conflicts", *ns, "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))


def get(cluster, namespace: str | None, *what: str) -> dict:
    ns = ["-n", namespace] if namespace else []
    return json.loads(cluster.kubectl("get", *ns, *what, "-o", "json").stdout)


def items(cluster, namespace: str | None, *what: str) -> list[dict]:
    return get(cluster, namespace, *what)["items"]


def wait_for(check, timeout: float = 60, every: float = 0.5, what: str | Callable[[], str] = "condition"):
    """Poll `check` until it returns something truthy; fail with `what` (and the last value) on timeout. A
    callable `what` is called then, so it can describe the state at the timeout rather than at the start."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    about = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {about} (last: {last!r})")


def is_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def foreign_accelerator_pods(cluster) -> list[str]:
    """Live pods outside the tests' namespaces (t-*) that request an extended resource such as nvidia.com/gpu."""
    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    held = []
    for pod in pods:
        meta = pod["metadata"]
        if meta["namespace"].startswith("t-") or meta.get("deletionTimestamp") or pod.get("status", {}).get(
                "phase") in ("Succeeded", "Failed"):
            continue
        wants = {name for c in pod["spec"].get("containers", [])
                 for name in (c.get("resources") or {}).get("requests", {}) if "/" in name}
        if wants:
            held.append(f"{meta['namespace']}/{meta['name']} ({', '.join(sorted(wants))})")
    return held
