"""README's two commands in the order it gives them: `edgefleet demo`, then the tests. The demo leaves its
cluster running with pods holding the GPU kwok nodes; the tests must run on a cluster of their own instead
of waiting for those GPUs, and refuse at once when pointed at the demo's cluster."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from edgefleet_dev.devcluster import cluster as dc

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
DEMO = "e2e-order-demo"  # the demo's cluster for this test; a developer's own `default` stays untouched
GPU_TEST = ["tests/integration/test_operator.py", "-k", "quickstart_serves", "-p", "no:cacheprovider"]


def readme_command(marker: str) -> list[str]:
    """The README's command after its `pip install -e` step (this environment is installed already)."""
    text = (REPO / "README.md").read_text()
    command = re.search(rf"<!-- {marker} -->\s*```sh\n(.+?)\n```", text).group(1)
    return shlex.split(command.split("&&")[-1])


def gpu_pods(cluster: dc.Cluster) -> list[str]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", "edgefleet-demo", "-o", "json").stdout)["items"]
    return [p["metadata"]["name"] for p in pods if p.get("status", {}).get("phase") == "Running"
            and any("nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {}) for c in p["spec"]["containers"])]


@pytest.mark.timeout(3000)
def test_demo_then_tests_as_the_readme_orders_them():
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_CLUSTER"}
    env["EDGEFLEET_DEMO_CLUSTER"] = DEMO
    dc.down(DEMO, echo=lambda _: None)
    try:
        demo = subprocess.run(readme_command("demo-command"), env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=1500)
        assert demo.returncode == 0, demo.stderr[-4000:]
        held = gpu_pods(dc.Cluster(dc.state_dir(DEMO)))
        assert held, "the demo left no pods on the GPU nodes: this test would prove nothing"

        tests = subprocess.run([*readme_command("test-command"), *GPU_TEST], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=1200)
        assert tests.returncode == 0 and "1 passed" in tests.stdout, tests.stdout[-4000:] + tests.stderr[-2000:]
        assert gpu_pods(dc.Cluster(dc.state_dir(DEMO))) == held  # the demo's cluster was left alone

        shared = subprocess.run([*readme_command("test-command"), *GPU_TEST], env={**env, "EDGEFLEET_CLUSTER": DEMO},
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        out = shared.stdout + shared.stderr
        assert shared.returncode == 3 and "hold accelerators" in out and "edgefleet-demo/" in out, out[-3000:]
    finally:
        dc.down(DEMO, echo=lambda _: None)
