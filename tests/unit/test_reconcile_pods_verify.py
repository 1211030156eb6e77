"""A variant the node refuses (unsigned / wrongly signed) reaches the EdgeDeployment's class message: the fetch
init container's termination message (written by edgefleet-runtime) is what pod_problem reports."""

from __future__ import annotations

from edgefleet.reconcile.pods import class_health, pod_problem


def _refused_pod(message: str) -> dict:
    return {
        "metadata": {"name": "digits-cpu-amd64-x1", "namespace": "shop"},
        "status": {
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
            "initContainerStatuses": [{
                "name": "fetch-model",
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
                "lastState": {"terminated": {"exitCode": 6, "reason": "Error", "message": message}},
            }],
        },
    }


def test_unsigned_variant_refused_at_fetch_is_named_in_the_class_message():
    msg = ("refused (Unsigned): variant oci://r/m@sha256:ab has no signature; a trusted signature is required "
           "(the manifest of oci://r/m@sha256:ab has no io.edgefleet.signature annotation)")
    problem = pod_problem(_refused_pod(msg), 0.0)
    assert problem is not None and problem.state == "CrashLoopBackOff"
    assert "init container fetch-model exited 6 (Error): refused (Unsigned)" in problem.detail
    assert problem.reason == "VariantSignatureRefused"  # exit 6 (edgefleet_runtime.exitcodes), since 813630e
    assert "spec.trust.publicKeysSecret" in problem.fix
    health = class_health([_refused_pod(msg)], 0.0)
    assert "refused (Unsigned)" in health.message
