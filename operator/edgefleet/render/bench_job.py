"""The benchmark Job: measures a model's candidates on one node of a hardware class with
``edgefleet-runtime bench``, and the pure functions that read its report (on-target selection and the
rollout gate). Pure: request + profile + settings -> manifests; report -> numbers; no I/O.

Contract with the operator (the reconciler side is not wired yet, see docs):

- One Job per (model generation, hardware class, node, candidate digests, evaluation data, image): its
  name is a hash of those, so a restarted operator finds the running Job instead of starting another.
- It runs where the class's pods run and as they run: pinned to ``req.node`` (node affinity on
  ``metadata.name``), the class's runtime image, resources (extended resources too), runtimeClassName,
  tolerations, device mounts and security context. The candidates are fetched (digest-verified) into an
  emptyDir by one ``fetch`` init container each. On a GPU class (TensorRT may run) with the hostPath node cache,
  the node cache is mounted as serve pods mount it and ``bench --cache`` builds the TensorRT engines into
  ``CACHE/tensorrt/<engine key>``, where ``serve --cache`` finds them (edgefleet_runtime.trtcache); nothing
  else of the node is written. With the cache driver each namespace has its own folder of the cache, so the
  bench (operator namespace) cannot build into the serving namespace's: there the bench builds in memory.
- Like the compile Job it lives in the operator's namespace without an owner reference, its inputs
  ConfigMap (the evaluation data) owned by the Job; the JSON report is pushed to the artifact store, tag
  ``<job name>-report`` (``compile_job.report_ref``), and read back from there, never from pod logs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..api import HardwareProfile
from ..api.models import OnTargetResult, RolloutGate
from ..settings import Settings
from .compile_job import ModelJobPolicy, job_labels, model_job, report_ref
from .workload import (
    CACHE_MOUNT,
    RUNTIME_UID,
    _resources,
    _restricted,
    prepare_cache_security,
    restricted_security_context,
)

CONTAINER = "bench"
BENCH_NAME = "edgefleet-bench"
INPUTS_DIR = "/var/run/edgefleet/inputs"
CANDIDATES_DIR = "/var/cache/edgefleet-bench"  # an emptyDir: DIR/sha256/<hex> per candidate
WORK_DIR = "/tmp"
PROFILE = "edgefleet.io/profile"
NODE = "edgefleet.io/node"
BENCH_KEY = "edgefleet.io/bench-key"
MAX_CANDIDATES = 8
BACKOFF_LIMIT = 1
EXIT_NO_RETRY = [1, 2, 4]  # bench: a candidate failed (report pushed), bad input, reference unloadable
WATCH_LABELS = {"app.kubernetes.io/managed-by": "edgefleet", "app.kubernetes.io/name": BENCH_NAME}
ENGINES = "tensorrt"  # the node cache's folder of TensorRT engines (edgefleet_runtime.trtcache)
TENSORRT_PROVIDERS = ("tensorrt", "cuda")  # a GPU runtime image opens TensorRT first where it has it
ENGINE_KEY = r"[A-Za-z0-9][A-Za-z0-9.-]{0,127}"  # trtcache.engine_key: <digest12>-trt<v>-cuda<v>-sm<cc>-<hash>


@dataclass(frozen=True)
class BenchCandidate:
    """A variant to measure: its artifact reference and digest (from the compile report)."""

    name: str  # the candidate's name in the compile report, e.g. fp32, dynamic-int8
    artifact: str  # oci://... as EdgeModel status.variants[].artifact
    digest: str


@dataclass(frozen=True)
class BenchJobRequest:
    """What one benchmark Job measures. The first candidate is the reference (accuracy and agreement are
    measured against it); ``evaluation`` is the evaluation data's bytes (``.npz``), or None for none."""

    model_namespace: str
    model_name: str
    generation: int
    profile: HardwareProfile
    node: str
    candidates: tuple[BenchCandidate, ...]
    evaluation: bytes | None = None
    evaluation_file: str = "eval.npz"
    runs: int = 100

    def __post_init__(self) -> None:
        if not 1 <= len(self.candidates) <= MAX_CANDIDATES:
            raise ValueError(f"a benchmark Job measures 1 to {MAX_CANDIDATES} candidates, not {len(self.candidates)}")
        if not self.evaluation:
            raise ValueError("a benchmark Job needs evaluation data (EdgeModel spec.optimization.evaluation)")


def bench_key(req: BenchJobRequest) -> str:
    """sha256 over everything the Job's outcome depends on (the evaluation data by digest)."""
    blob = {
        "v": 1,
        "model": [req.model_namespace, req.model_name, req.generation],
        "profile": req.profile.metadata["name"], "node": req.node,
        "image": req.profile.spec.runtime_image,
        "candidates": [[c.name, c.digest] for c in req.candidates],  # by content: a re-push does not re-measure
        "evaluation": hashlib.sha256(req.evaluation or b"").hexdigest(), "runs": req.runs,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def bench_job_name(req: BenchJobRequest, key: str) -> str:
    """``bench-<model>-<profile>-<12 hex of the key>``, a DNS label of at most 63 characters."""
    stem = f"{req.model_name}-{req.profile.metadata['name']}".replace(".", "-")[:44].rstrip("-")
    return f"bench-{stem}-{key[:12]}"


def bench_labels(req: BenchJobRequest) -> dict[str, str]:
    labels = job_labels(WATCH_LABELS, "bench", req.model_namespace, req.model_name)
    return {**labels, PROFILE: req.profile.metadata["name"]}


def _blob(digest: str) -> str:
    return f"{CANDIDATES_DIR}/sha256/{digest.split(':', 1)[1]}"


def _fetch(i: int, c: BenchCandidate, image: str, insecure: bool) -> dict[str, Any]:
    args = ["fetch", f"--ref={c.artifact}", f"--digest={c.digest}", f"--cache={CANDIDATES_DIR}"]
    if insecure:
        args.append("--insecure")
    return {
        "name": f"fetch-{i}",
        "image": image,
        "command": ["edgefleet-runtime"],
        "args": args,
        "volumeMounts": [{"name": "candidates", "mountPath": CANDIDATES_DIR}],
        "securityContext": restricted_security_context(RUNTIME_UID),
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    }


def builds_engines(req: BenchJobRequest, settings: Settings) -> bool:
    """Whether the Job builds TensorRT engines into the node cache: a GPU class and the hostPath cache."""
    return req.profile.spec.target.execution_provider in TENSORRT_PROVIDERS and not settings.node_cache_driver


def _prepare_engine_cache(image: str) -> dict[str, Any]:
    """Root init container: the hostPath cache is created root-owned; hand it (and its engines folder, created
    here) to the runtime user, as the serve pods' prepare-cache does."""
    return {
        "name": "prepare-cache",
        "image": image,
        "command": ["edgefleet-runtime"],
        "args": ["prepare-cache", f"--cache={CACHE_MOUNT}", f"--uid={RUNTIME_UID}", f"--spool={ENGINES}"],
        "volumeMounts": [{"name": "node-cache", "mountPath": CACHE_MOUNT}],
        "securityContext": prepare_cache_security(),
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }


def _bench(req: BenchJobRequest, settings: Settings, name: str) -> dict[str, Any]:
    args = ["bench", f"--model={_blob(req.candidates[0].digest)}", f"--eval={INPUTS_DIR}/{req.evaluation_file}",
            f"--candidates={CANDIDATES_DIR}", f"--runs={req.runs}", f"--out={WORK_DIR}/report.json",
            f"--report={report_ref(settings.artifact_store, name)}"]
    if settings.artifact_insecure:
        args.append("--insecure")
    profile = req.profile.spec
    mounts = [{"name": "candidates", "mountPath": CANDIDATES_DIR, "readOnly": True},
              {"name": "inputs", "mountPath": INPUTS_DIR, "readOnly": True},
              {"name": "work", "mountPath": WORK_DIR}]
    if builds_engines(req, settings):  # engines into CACHE/tensorrt, where serve --cache finds them
        args.append(f"--cache={CACHE_MOUNT}")  # only the engines folder is mounted: the variants stay out of reach
        mounts.append({"name": "node-cache", "mountPath": f"{CACHE_MOUNT}/{ENGINES}", "subPath": ENGINES})
    mounts += [{"name": f"dev-{m.name}", "mountPath": m.mount_path, "readOnly": m.read_only}
               for m in profile.device_mounts or []]
    return {
        "name": CONTAINER,
        "image": profile.runtime_image,
        "command": ["edgefleet-runtime"],
        "args": args,
        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "EDGEFLEET_RUNTIME_CLASS", "value": req.profile.metadata["name"]},
                {"name": "HOME", "value": WORK_DIR}, {"name": "TMPDIR", "value": WORK_DIR}],
        "resources": _resources(req.profile),
        "securityContext": _restricted(profile.privileged),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }


def render_bench_job(req: BenchJobRequest, settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job for ``req`` (its name from ``bench_key``)."""
    key = bench_key(req)
    name = bench_job_name(req, key)
    labels = bench_labels(req)
    profile = req.profile.spec
    image = profile.runtime_image
    volumes = [{"name": "candidates", "emptyDir": {"sizeLimit": "4Gi"}},
               {"name": "inputs", "configMap": {"name": name}},
               {"name": "work", "emptyDir": {"sizeLimit": "1Gi"}}]
    volumes += [{"name": f"dev-{m.name}", "hostPath": {"path": m.host_path}} for m in profile.device_mounts or []]
    init = [_fetch(i, c, image, settings.artifact_insecure) for i, c in enumerate(req.candidates)]
    if builds_engines(req, settings):
        volumes.append({"name": "node-cache", "hostPath": {"path": settings.node_cache, "type": "DirectoryOrCreate"}})
        init.insert(0, _prepare_engine_cache(image))
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [req.node]}]}]}}},
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in profile.tolerations],
        "initContainers": init,
        "containers": [_bench(req, settings, name)],
        "volumes": volumes,
    }
    if profile.runtime_class_name:
        pod["runtimeClassName"] = profile.runtime_class_name
    return model_job(name, settings, labels, req, {NODE: req.node, BENCH_KEY: key}, pod,
                     ModelJobPolicy(BACKOFF_LIMIT, settings.bench_deadline_seconds, CONTAINER, EXIT_NO_RETRY))


def render_bench_inputs(req: BenchJobRequest, job: dict[str, Any]) -> dict[str, Any]:
    """The inputs ConfigMap (the evaluation data): same name and namespace as the applied ``job``, owned by it."""
    import base64

    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": dict(meta["labels"]),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
        },
        "binaryData": {req.evaluation_file: base64.b64encode(req.evaluation or b"").decode()},
    }


# ----------------------------------------------------------------------------- reading the report
def on_target_results(report: dict[str, Any]) -> dict[str, OnTargetResult]:
    """The bench report as OnTargetResult by candidate digest; ValueError when it is not a bench report."""
    if not isinstance(report, dict) or report.get("kind") != "BenchReport" or not report.get("node"):
        raise ValueError("not an edgefleet-runtime bench report (kind BenchReport with a node)")
    out = {}
    for r in report.get("results") or []:
        if not isinstance(r, dict) or not isinstance(r.get("digest"), str):
            continue
        out[r["digest"]] = OnTargetResult(
            node=report["node"], latency_p50_ms=r.get("p50Ms1"), latency_p95_ms=r.get("p95Ms1"),
            threads=r.get("threadsN"), latency_p50_ms_n=r.get("p50MsN"), latency_p95_ms_n=r.get("p95MsN"),
            throughput_per_second=r.get("throughputPerSecond"), peak_memory_bytes=r.get("peakRssBytes"),
            load_seconds=r.get("loadSeconds"), accuracy=r.get("accuracy"),
            error=str(r["error"])[:256] if r.get("error") else None, tensorrt_engine_key=engine_key_of(r),
        )
    return out


def engine_key_of(result: dict[str, Any]) -> str | None:
    """The TensorRT engine key from a bench result's ``tensorrt.engineCache`` (``.../tensorrt/<key>``); None when
    TensorRT did not run or its cache was off. The report comes from a node: anything else is ignored."""
    import re

    trt = result.get("tensorrt")
    path = trt.get("engineCache") if isinstance(trt, dict) else None
    if not isinstance(path, str) or len(path) > 1024 or "/tensorrt/" not in path:
        return None
    key = path.rstrip("/").rsplit("/", 1)[-1]
    return key if re.fullmatch(ENGINE_KEY, key) else None


def serving_latency(result: OnTargetResult, threads: int | None) -> tuple[float | None, float | None]:
    """(p50, p95) at the threads the runtime will serve with: 1-thread numbers for threads=1, else N."""
    if threads == 1:
        return result.latency_p50_ms, result.latency_p95_ms
    return result.latency_p50_ms_n, result.latency_p95_ms_n


def choose_on_target(results: dict[str, OnTargetResult], allowed: list[str], threads: int | None = None
                     ) -> str | None:
    """The digest of the fastest (p50 at the serving threads) measured candidate among ``allowed`` (those
    inside the accuracy budget, in the compiler's order); None when none was measured."""
    p50 = {d: serving_latency(results[d], threads)[0] for d in allowed if d in results and not results[d].error}
    measured = {d: ms for d, ms in p50.items() if ms is not None}
    return min(measured, key=measured.__getitem__) if measured else None


def accuracy_drops_on_target(results: dict[str, OnTargetResult], candidates: list[dict[str, Any]]
                             ) -> dict[str, float]:
    """Each measured candidate's on-target accuracy drop in points against the source model, by digest.

    The source is not measured on the node; the candidate the compiler found closest to it (highest compile-time
    ``accuracyDelta``, e.g. fp32 at 0.0) anchors it: source accuracy = anchor's on-target accuracy - its delta.
    Empty when the evaluation data has no labels (no accuracy was measured)."""
    measured = [c for c in candidates if c.get("accuracyDelta") is not None
                and (r := results.get(c["digest"])) is not None and r.accuracy is not None and not r.error]
    if not measured:
        return {}
    anchor = max(measured, key=lambda c: c["accuracyDelta"])
    source = float(results[anchor["digest"]].accuracy or 0.0) * 100 - anchor["accuracyDelta"]
    return {c["digest"]: round(source - float(results[c["digest"]].accuracy or 0.0) * 100, 4) for c in measured}


def within_budget_on_target(drops: dict[str, float], digests: list[str], max_drop: float | None) -> list[str]:
    """``digests`` whose on-target accuracy drop is within ``max_drop`` points (all of them without a budget;
    a candidate with no on-target accuracy keeps its compile-time verdict)."""
    if max_drop is None:
        return list(digests)
    return [d for d in digests if drops.get(d, 0.0) <= max_drop]


def gate_verdict(gate: RolloutGate | None, result: OnTargetResult | None, threads: int | None = None
                 ) -> tuple[str, list[str]]:
    """("Pass" | "Wait" | "Fail", why with the numbers). No gate: Pass. No result yet: Wait (the class's
    rollout waits for its benchmark). A failed measurement or a limit not met: Fail (the old variant
    keeps serving; the deployment is Degraded with these messages)."""
    if gate is None:
        return "Pass", []
    if result is None:
        return "Wait", ["waiting for the on-target benchmark of this variant"]
    if result.error:
        return "Fail", [f"the variant could not be measured on {result.node}: {result.error}"]
    out = []
    p95 = serving_latency(result, threads)[1]
    if gate.max_latency_p95_ms is not None and (p95 is None or p95 > gate.max_latency_p95_ms):
        out.append(f"p95 latency {p95} ms on {result.node} exceeds maxLatencyP95Ms {gate.max_latency_p95_ms:g}")
    tput = result.throughput_per_second
    if gate.min_throughput is not None and (tput is None or tput < gate.min_throughput):
        out.append(f"throughput {tput}/s on {result.node} is below minThroughput {gate.min_throughput:g}")
    mem = result.peak_memory_bytes
    if gate.max_memory_bytes is not None and (mem is None or mem > gate.max_memory_bytes):
        out.append(f"peak memory {mem} bytes on {result.node} exceeds maxMemoryBytes {gate.max_memory_bytes}")
    return ("Fail", out) if out else ("Pass", [])
