"""Which failures a user must act on and which the controller retries (Kopf's permanent/temporary split).

Permanent: retrying the same input gives the same answer, so the reconciler reports it in status (a
`Degraded` condition with the reason and the fix, one Warning event on the transition) and carries on
with what it can do. Everything else is transient: it propagates and the controller retries it with
backoff and jitter.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..api import format_errors
from ..kube import ApiError, Kube
from ..render.placement import PlacementError
from .conditions import DEGRADED, flipped, set_condition, status_patch, without_times

# 4xx answers that a retry can get past: timeout, conflict (an object being replaced), too early, throttled
RETRIABLE_STATUSES = frozenset({408, 409, 425, 429})


class PermanentError(Exception):
    """A failure that retrying cannot fix: `reason` (CamelCase), what happened, and what the user can do."""

    def __init__(self, reason: str, message: str, fix: str):
        super().__init__(f"{message}. Fix: {fix}")
        self.reason = reason
        self.message = message
        self.fix = fix


def as_permanent(err: Exception, what: str, subject: str = "HardwareProfile or EdgeDeployment"
                 ) -> PermanentError | None:
    """`err` as a PermanentError about `what` (e.g. "DaemonSet ns/name"), or None when it is transient; the fix
    of a refused manifest names `subject`, the kinds it is rendered from."""
    if isinstance(err, PermanentError):
        return err
    if isinstance(err, PlacementError):
        return PermanentError("PlacementConflict", f"{what}: {err.message}", err.fix)
    if isinstance(err, ApiError) and 400 <= err.status < 500 and err.status not in RETRIABLE_STATUSES:
        if "is being terminated" in err.message:  # the namespace goes away (403): nothing for the user to fix
            return None
        return _refused(err, what, subject)
    return None


def _refused(err: ApiError, what: str, subject: str) -> PermanentError:
    message = f"the API server refused {what} (HTTP {err.status}): {err.message}"
    if err.status == 404:
        return _missing(err, what, message)
    if err.status == 403:
        return PermanentError("Forbidden", message, "grant the operator's ServiceAccount this permission "
                              "(chart: rbac.create=true creates the ClusterRole it needs)")
    if err.status == 422 or err.reason == "Invalid":
        return PermanentError("InvalidManifest", message, f"change the {subject} field named in the message "
                              "(the manifest is rendered from them)")
    return PermanentError("RequestRefused", message, f"change the {subject} field named in the message, or report "
                          "a bug if it names none")


def _missing(err: ApiError, what: str, message: str) -> PermanentError:
    """A write answered 404 (Kube.apply): the namespace, or the kind itself, does not exist."""
    if err.details.get("kind") == "namespaces":
        ns = err.details.get("name", "?")
        return PermanentError("NamespaceNotFound", f"{what} cannot be created: namespace {ns} does not exist",
                              f"create it (kubectl create namespace {ns}), or run the operator in an existing "
                              "namespace (EDGEFLEET_NAMESPACE; the chart sets the release namespace)")
    return PermanentError("NotFound", message, "install the CustomResourceDefinition of the kind it names "
                          "(kubectl apply --server-side -f crds/), or report a bug if it names none")


def report_invalid_spec(kube: Kube, raw: dict[str, Any], err: ValidationError, main_condition: str,
                        extra: dict[str, Any] | None = None) -> None:
    """An object the models refuse (admission should have): Degraded InvalidSpec naming the fields, and
    `main_condition` (READY, AVAILABLE) False, plus `extra` status fields (snake_case); one Warning event when it turns
    Degraded."""
    generation = raw["metadata"].get("generation")
    old = (raw.get("status") or {}).get("conditions", [])
    message = "; ".join(format_errors(err)) + f". Fix: correct these fields of the {raw['kind']}"
    conds = set_condition(old, DEGRADED, True, "InvalidSpec", message, generation)
    conds = set_condition(conds, main_condition, False, "InvalidSpec", "the spec is invalid; nothing was changed",
                          generation)
    status = raw.get("status") or {}
    fields = status_patch(raw["kind"], **(extra or {}))
    if without_times(old) == without_times(conds) and all(status.get(k) == v for k, v in fields.items()):
        return
    meta = raw["metadata"]
    kube.patch_status(raw["kind"], meta["name"], meta.get("namespace"),
                      status_patch(raw["kind"], observed_generation=generation, conditions=conds, **(extra or {})))
    if any(c["type"] == DEGRADED for c in flipped(old, conds)):
        kube.event(raw, "InvalidSpec", message, "Warning")
