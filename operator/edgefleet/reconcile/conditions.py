"""metav1.Condition bookkeeping: keep lastTransitionTime unless the status flips."""

from __future__ import annotations

import datetime


def now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(conditions: list[dict], type_: str, status: bool | None, reason: str, message: str,
                  generation: int | None) -> list[dict]:
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


def flipped(old: list[dict], new: list[dict]) -> list[dict]:
    """Conditions whose status or reason changed (worth an event)."""
    before = {c["type"]: (c["status"], c.get("reason")) for c in old}
    return [c for c in new if before.get(c["type"]) != (c["status"], c.get("reason"))]


def without_times(conditions: list[dict]) -> list[tuple]:
    return sorted((c["type"], c["status"], c.get("reason"), c.get("message"), c.get("observedGeneration"))
                  for c in conditions)
