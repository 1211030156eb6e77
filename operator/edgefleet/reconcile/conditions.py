"""Status bookkeeping: metav1.Conditions (lastTransitionTime kept unless the status flips) and status patches
checked by the kinds' typed status models. Condition types are the API's constants, re-exported here."""

from __future__ import annotations

import datetime
from typing import Any, get_args

from ..api import AVAILABLE, COMPILED, DEGRADED, DRIFTING, KINDS, PROGRESSING, READY, Model

__all__ = ["AVAILABLE", "COMPILED", "DEGRADED", "DRIFTING", "PROGRESSING", "READY", "flipped", "now",
           "set_condition", "status_patch", "without_times"]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool | None, reason: str, message: str,
                  generation: int | None) -> list[dict[str, Any]]:
    """A new list with condition `type_` set (None: Unknown); the transition time moves only when the status
    changes."""
    value = "Unknown" if status is None else "True" if status else "False"
    old = next((c for c in conditions if c["type"] == type_), None)
    since = old["lastTransitionTime"] if old and old["status"] == value else now()
    new = {"type": type_, "status": value, "reason": reason, "message": message[:4096],
           "lastTransitionTime": since}
    if generation is not None:
        new["observedGeneration"] = generation
    return [c for c in conditions if c["type"] != type_] + [new]


def flipped(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conditions whose status or reason changed (worth an event)."""
    before = {c["type"]: (c["status"], c.get("reason")) for c in old}
    return [c for c in new if before.get(c["type"]) != (c["status"], c.get("reason"))]


def without_times(conditions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((c["type"], c["status"], c.get("reason"), c.get("message"), c.get("observedGeneration"))
                  for c in conditions)


def _status_model(kind: str) -> type[Model]:
    annotation = KINDS[kind].model_fields["status"].annotation  # e.g. EdgeModelStatus | None
    model = next(a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, Model))
    return model


def status_patch(kind: str, **fields: Any) -> dict[str, Any]:
    """A status merge patch of just ``fields`` (snake_case or camelCase), validated by the kind's status model:
    a field the model does not know, or a value it refuses, fails here and not at the API server."""
    status = _status_model(kind).model_validate(fields)
    return status.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)
