"""Golden renders: the workload of every built-in profile (cache on the node's hostPath, and the restricted CSI
cache), the compile Job and the federated server and client Jobs. A change to what the operator applies shows up
as a reviewed diff of tests/data/render/ (EDGEFLEET_UPDATE_GOLDEN=1 regenerates)."""

from __future__ import annotations

import pytest
from edgefleet.api import EdgeDeployment, Variant, builtin_profiles
from edgefleet.api.federated import FederatedTraining
from edgefleet.render import federated as fed
from edgefleet.render import render_class
from edgefleet.render.compile_job import render_compile_job
from edgefleet.settings import Settings
from golden import assert_golden
from test_render_compile_job import request

PROFILES = {p.metadata["name"]: p for p in builtin_profiles()}
SETTINGS = Settings(namespace="edgefleet-system", artifact_store="oci://registry.local:5000/edgefleet/models",
                    trainer_image="ghcr.io/edgefleet/trainer:0.1.0")


def deployment() -> EdgeDeployment:
    return EdgeDeployment.model_validate({
        "metadata": {"name": "digits", "namespace": "shop", "uid": "uid-1", "generation": 2},
        "spec": {"modelRef": {"name": "digits"}}})


@pytest.mark.parametrize("cache_driver", [False, True], ids=["hostpath", "csi"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_golden_workload_of_every_builtin_profile(profile, cache_driver):
    variant = Variant(profile=profile, state="Ready", digest="sha256:" + "a" * 64,
                      artifact=f"oci://registry.local:5000/edgefleet/models/digits-{profile}@sha256:{'a' * 64}")
    manifest = render_class(deployment(), PROFILES[profile], variant, list(PROFILES.values()),
                            "/var/lib/edgefleet/cache", cache_driver=cache_driver)
    assert_golden(f"workload_{profile}_{'csi' if cache_driver else 'hostpath'}", manifest)


def test_golden_compile_job():
    assert_golden("compile_job", render_compile_job(request(), SETTINGS))


def test_golden_federated_server_and_client_jobs():
    ft = FederatedTraining.model_validate({
        "apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining",
        "metadata": {"name": "ft", "namespace": "shop", "uid": "uid-2", "generation": 1},
        "spec": {"sourceModel": {"name": "digits"}, "targetModel": {"name": "digits"},
                 "participants": {"nodeSelector": {"matchLabels": {"edge": "yes"}}, "clientsPerNode": 2},
                 "localData": {"hostPath": "/var/lib/digits"},
                 "evaluation": {"data": {"configMap": {"name": "inputs", "key": "eval.npz"}}, "minAccuracy": 0.5}}})
    clients = [fed.Client("node-a", 0), fed.Client("node-a", 1)]
    assert_golden("federated_jobs", [fed.render_server_job(ft, SETTINGS, "node-a", clients, "tls0"),
                                     fed.render_client_job(ft, SETTINGS, clients[1], "tls0", "10.96.0.10")])


def test_golden_workload_with_a_pipeline_and_preprocessing():
    from edgefleet.render.workload import model_transform

    ed = EdgeDeployment.model_validate({
        "metadata": {"name": "line", "namespace": "shop", "uid": "uid-1", "generation": 1},
        "spec": {"modelRef": {"name": "digits"}, "pipeline": {
            "sources": [{"name": "cam", "kind": "video", "url": "rtsp://camera.local/stream", "fps": 25}],
            "sinks": [{"name": "broker", "mqtt": {"host": "mqtt.local", "topic": "line/results"}}],
            "queue": {"maxItems": 50000}}}})
    transform = model_transform({"preprocessing": {"image": {"width": 8, "height": 8, "color": "GRAY"}},
                                 "postprocessing": {"softmax": True, "topK": 1}})
    variant = Variant(profile="cpu-amd64", state="Ready", digest="sha256:" + "a" * 64,
                      artifact=f"oci://registry.local:5000/edgefleet/models/digits-cpu-amd64@sha256:{'a' * 64}")
    manifest = render_class(ed, PROFILES["cpu-amd64"], variant, list(PROFILES.values()), "/var/lib/edgefleet/cache",
                            cache_driver=True, transform=transform)
    assert_golden("workload_cpu-amd64_pipeline", manifest)


def test_golden_workload_with_prefetch_in_place_switch_and_delta():
    ed = EdgeDeployment.model_validate({
        "metadata": {"name": "digits", "namespace": "shop", "uid": "uid-1", "generation": 3},
        "spec": {"modelRef": {"name": "digits"}, "rollout": {"waves": [25, 100], "prefetch": {}, "shadow": {}}}})
    variant = Variant(profile="cpu-amd64", state="Ready", digest="sha256:" + "a" * 64,
                      artifact=f"oci://registry.local:5000/edgefleet/models/digits-cpu-amd64@sha256:{'a' * 64}")
    delta = (f"base=sha256:{'b' * 64},digest=sha256:{'c' * 64},sizeBytes=37264,"
             f"ref=oci://registry.local:5000/edgefleet/models/digits-cpu-amd64-delta@sha256:{'c' * 64}")
    manifest = render_class(ed, PROFILES["cpu-amd64"], variant, list(PROFILES.values()), "/var/lib/edgefleet/cache",
                            insecure=True, deltas=[delta])
    assert_golden("workload_cpu-amd64_prefetch", manifest)
