"""HardwareProfile status: how many nodes of the fleet belong to the profile (`kubectl get hwp`)."""

from __future__ import annotations

from pydantic import ValidationError

from ..api import HardwareProfile
from ..kube import Kube
from ..render import resolve_nodes
from .conditions import DEGRADED, READY, set_condition, status_patch, without_times
from .errors import report_invalid_spec
from .world import World


def reconcile_profile(kube: Kube, name: str, world: World) -> None:
    raw = kube.find("HardwareProfile", name)
    if raw is None:
        return
    try:
        HardwareProfile.model_validate(raw)
    except ValidationError as err:  # left out of placement (World skips it): say so where the user looks
        report_invalid_spec(kube, raw, err, READY, {"matched_nodes": 0})
        return
    matched = sum(1 for p in resolve_nodes(world.nodes, world.profiles).values() if p == name)
    generation = raw["metadata"].get("generation")
    old = raw.get("status") or {}
    conditions = set_condition(old.get("conditions", []), READY, True, "Accepted",
                               f"{matched} nodes belong to this hardware class", generation)
    if any(c["type"] == DEGRADED for c in conditions):  # it was invalid before
        conditions = set_condition(conditions, DEGRADED, False, "AsExpected", "the spec is valid", generation)
    status = status_patch("HardwareProfile", observed_generation=generation, matched_nodes=matched,
                          conditions=conditions)
    if (old.get("matchedNodes"), old.get("observedGeneration")) == (matched, generation) and without_times(
            old.get("conditions", [])) == without_times(conditions):
        return
    kube.patch_status("HardwareProfile", name, None, status)
