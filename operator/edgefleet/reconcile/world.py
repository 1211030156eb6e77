"""What reconcilers read about the cluster beyond the object itself: nodes and hardware profiles."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..api import HardwareProfile
from ..kube import Kube

log = logging.getLogger(__name__)


@dataclass
class World:
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)  # node name -> labels
    profiles: list[HardwareProfile] = field(default_factory=list)

    @classmethod
    def read(cls, kube: Kube) -> World:
        nodes = {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in kube.list("Node")}
        return cls(nodes, parse_profiles(kube.list("HardwareProfile")))


def parse_profiles(objects: list[dict[str, Any]]) -> list[HardwareProfile]:
    profiles = []
    for obj in objects:
        try:
            profiles.append(HardwareProfile.model_validate(obj))
        except ValidationError as err:  # admission should prevent this; skip rather than stall everything
            log.warning("skipping HardwareProfile %s: %s", obj["metadata"]["name"], err)
    return profiles
