"""rollout.maxSurge: a node's new pod starts beside the old one (zero-downtime updates), except for classes
whose profile asks for extended resources, where a second pod could not get the device."""

from __future__ import annotations

import uuid

import pytest
from edgefleet.api import EdgeDeployment, Variant, builtin_profiles
from edgefleet.render import render_class
from pydantic import ValidationError

DIGEST = "sha256:" + "cd" * 32


def _render(rollout: dict, profile_name: str = "intel-openvino", mode: str = "PerNode") -> dict:
    profiles = builtin_profiles()
    profile = next(p for p in profiles if p.metadata["name"] == profile_name)
    ed = EdgeDeployment(metadata={"name": "digits", "namespace": "ns", "uid": str(uuid.uuid4())},
                        spec={"modelRef": {"name": "digits"}, "mode": mode, "rollout": rollout,
                              **({"replicas": 2} if mode == "Replicas" else {})})
    variant = Variant(profile=profile_name, artifact="oci://r/m@" + DIGEST, digest=DIGEST, state="Ready")
    return render_class(ed, profile, variant, profiles, "/var/lib/edgefleet/cache", replicas=2)


def test_per_node_surges_when_asked():
    ds = _render({"maxSurge": 1, "maxUnavailable": 1})
    assert ds["kind"] == "DaemonSet"
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def test_without_max_surge_nothing_changes():
    ds = _render({"maxUnavailable": "25%"})
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": "25%"}


def test_classes_with_extended_resources_roll_without_surge():
    ds = _render({"maxSurge": "50%"}, "nvidia-gpu")
    assert "maxSurge" not in ds["spec"]["updateStrategy"]["rollingUpdate"]


def test_replicas_mode_takes_the_surge_too():
    dep = _render({"maxSurge": 1}, mode="Replicas")
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1


@pytest.mark.parametrize("rollout, says", [
    ({"maxSurge": 0}, "rollout.maxSurge must be a whole number >= 1"),
    ({"maxSurge": "0%"}, "rollout.maxSurge must be a whole number >= 1"),
    ({"maxSurge": 1, "waves": [50, 100]}, "rollout.maxSurge does not go with waves"),
    ({"maxSurge": 1, "canaryPercent": 10}, "rollout.maxSurge does not go with waves"),
])
def test_bad_max_surge_is_refused_with_the_fix(rollout, says):
    with pytest.raises(ValidationError, match=says):
        EdgeDeployment(metadata={"name": "d", "namespace": "ns"}, spec={"modelRef": {"name": "m"}, "rollout": rollout})


def test_the_runtime_keeps_serving_while_the_service_drops_it():
    """A replaced pod answers for a few seconds after SIGTERM (not ready), inside its grace period, so clients
    polling the Service during a surge rollout never hit a closed port."""
    spec = _render({"maxSurge": 1})["spec"]["template"]["spec"]
    runtime = next(c for c in spec["containers"] if c["name"] == "runtime")
    delays = [float(a.split("=", 1)[1]) for a in runtime["args"] if a.startswith("--shutdown-delay=")]
    assert delays and 1 <= delays[0] < spec["terminationGracePeriodSeconds"] - 5
