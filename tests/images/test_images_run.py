"""The built images, run with runc on this machine: the compiler image compiles the quickstart (a .tflite
variant included), each runtime image serves its family's variant with the right answers, the operator
image answers its liveness probe."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import infer_top1, ref_of, wait_http
from edgefleet_dev.images import runc
from edgefleet_dev.net import free_port

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
FAMILIES = {"runtime-cpu": "cpu-amd64", "runtime-openvino": "intel-openvino", "runtime-coral": "coral-edgetpu"}
COMPILE_TIMEOUT = 900

pytestmark = pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt-get install runc)")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runc")


@pytest.fixture(scope="module")
def compiled(built, image_registry, work) -> dict:
    """The compiler image's compile of the quickstart for the three CPU-family classes."""
    out = work / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # the image runs as uid 10001
    args = ["compile", "/in/digits_cnn.onnx", *(f"--profile={p}" for p in FAMILIES.values()),
            "--calibration=/in/digits_calib.npz", "--eval=/in/digits_eval.npz", "--max-accuracy-drop=1",
            "--out=/out/variants", "--report=/out/report.json"]
    ref = ref_of(built, image_registry, "compiler")
    with runc.run(ref, args, work, mounts=[(str(QUICKSTART), "/in")], writable=[(str(out), "/out")]) as c:
        deadline = time.monotonic() + COMPILE_TIMEOUT
        while c.running():
            assert time.monotonic() < deadline, f"compile did not finish in {COMPILE_TIMEOUT}s:\n{c.output()[-3000:]}"
            time.sleep(1)
        log = c.output()
    report = out / "report.json"
    assert report.exists(), f"the compiler image wrote no report:\n{log[-3000:]}"
    return {"out": out, "report": json.loads(report.read_text()), "log": log}


def test_compiler_image_compiles_the_quickstart_including_a_tflite_variant(compiled):
    variants = compiled["report"]["variants"]
    assert {v: variants[v]["state"] for v in FAMILIES.values()} == {v: "Ready" for v in FAMILIES.values()}, (
        compiled["log"][-3000:])
    assert variants["coral-edgetpu"]["format"] == "tflite"
    assert variants["intel-openvino"]["format"] == "openvino"
    for v in variants.values():
        assert abs(v["metrics"]["accuracyDelta"]) <= 1.0


@pytest.mark.parametrize("image", FAMILIES)
def test_runtime_image_serves_its_familys_variant(image, built, image_registry, compiled, work):
    variant = compiled["report"]["variants"][FAMILIES[image]]
    blob = Path(variant["artifact"].removeprefix("file://").replace("/out", str(compiled["out"]), 1))
    port = free_port()
    args = ["serve", f"--model=/models/{blob.name}", f"--digest={variant['digest']}", "--name=digits",
            "--host=127.0.0.1", f"--port={port}"]
    with runc.run(ref_of(built, image_registry, image), args, work, mounts=[(str(blob.parent), "/models")]) as c:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/v2/health/ready", c)
        data = np.load(QUICKSTART / "digits_eval.npz")
        top1 = infer_top1(base, "digits", data["input"])
    accuracy = float(np.mean(np.asarray(top1) == data["y"]))
    assert abs(accuracy - variant["metrics"]["accuracy"]) <= 1 / len(top1) + 1e-9, (
        f"{image}: {accuracy:.4f} served vs {variant['metrics']['accuracy']:.4f} in the compile report")


def test_runtime_images_have_no_shell_and_run_as_10001(built, image_registry, work):
    for image in FAMILIES:
        root = work / "images" / built[image]["manifests"]["linux/amd64"].replace(":", "-")
        runc.unpack(ref_of(built, image_registry, image), "linux/amd64", root)
        for sh in ("bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/bash", "usr/bin/apt-get", "usr/bin/dpkg"):
            assert not (root / "rootfs" / sh).exists(), f"{image} ships {sh}"
        assert not (root / "rootfs/usr/bin/gcc").exists() and not (root / "rootfs/usr/bin/cc").exists()


def test_operator_image_answers_liveness(built, image_registry, work, cluster, namespace):
    port = free_port()
    kube_dir = work / f"kube-{namespace}"
    kube_dir.mkdir()
    flat = cluster.kubectl("config", "view", "--flatten", "--minify").stdout
    (kube_dir / "config").write_text(flat)  # certificates inline, readable by the image's user
    (kube_dir / "config").chmod(0o644)
    args = ["operator", f"--liveness=http://127.0.0.1:{port}/healthz", f"--namespace={namespace}"]
    env = {"KUBECONFIG": "/kube/config", "EDGEFLEET_BUILTIN_PROFILES": "false"}
    with runc.run(ref_of(built, image_registry, "operator"), args, work, env=env,
                  mounts=[(str(kube_dir), "/kube")]) as c:
        wait_http(f"http://127.0.0.1:{port}/healthz", c, timeout=90)
        assert c.running()


def test_images_carry_labels_and_the_numeric_user(built, image_registry):
    from edgefleet_dev.images import oci

    for name in ("runtime-cpu", "operator", "compiler"):
        config = json.loads(oci.crane("config", "--platform", "linux/amd64", ref_of(built, image_registry, name)))
        assert config["config"]["User"] == "10001:10001"
        labels = config["config"]["Labels"]
        for key in ("source", "revision", "version", "licenses"):
            assert labels[f"org.opencontainers.image.{key}"], f"{name}: label {key} empty"
        assert config["os"] == "linux" and config["architecture"] == "amd64"


def test_cli_list_reports_sizes_within_the_edge_budgets(built):
    proc = subprocess.run(["edgefleet", "images", "list", "--json"], capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["runtime-cpu"]["compressedBytes"] <= 150e6, rows["runtime-cpu"]
    assert rows["runtime-openvino"]["compressedBytes"] <= 250e6, rows["runtime-openvino"]
    for name in ("pause", "runtime-cpu", "runtime-openvino", "runtime-coral", "operator", "compiler"):
        assert rows[name]["digest"].startswith("sha256:") and rows[name]["unpackedBytes"] > 0
