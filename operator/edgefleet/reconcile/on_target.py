"""On-target selection: after a class's compile, a benchmark Job measures the published candidates on one node
of the class (render/bench_job.py) and the fastest there (p50 at 1 thread, the host's own rule) becomes the
class's variant. Level-based and non-blocking, like the compile Job (compile_job.py):

- the class cannot be measured (optimization.selection host, no schedulable node, no evaluation data in a
  ConfigMap, encrypted variants, no oci:// artifact store): the host's choice, selection host, the reason says why.
- no Job: its report already in the store (the Job ran, its TTL removed it) -> choose; else apply the Job and
  its inputs ConfigMap -> the variant is Benchmarking (deployments keep serving what they serve).
- Job running -> Benchmarking. Job finished -> its report chooses; a failed Job, a report that is missing after
  a grace time or that measured nothing -> the host's choice with a reason, and the caller's condition + event.

The Job's name is a hash of what it measures (generation, class, node, candidates, data, image), so a restarted
operator finds the Job it started instead of starting another; running bench Jobs of the same model and class
with other inputs are deleted. activeDeadlineSeconds (settings.bench_deadline_seconds) bounds the wait.
"""

from __future__ import annotations

import logging
from typing import Any

from ..api import EdgeModel, HardwareProfile
from ..compiler import CompileError
from ..kube import ApiError, Kube
from ..render import resolve_nodes
from ..render.bench_job import (
    PROFILE,
    BenchCandidate,
    BenchJobRequest,
    accuracy_drops_on_target,
    bench_labels,
    choose_on_target,
    on_target_results,
    render_bench_inputs,
    render_bench_job,
    within_budget_on_target,
)
from ..render.compile_job import MODEL_NAME, MODEL_NAMESPACE
from ..settings import Settings
from .errors import as_permanent
from .model_jobs import ModelJob, follow, model_event_ref
from .reports import master_key
from .sources import config_map_bytes
from .world import World

log = logging.getLogger(__name__)
CONDITION = "OnTargetSelected"
RELOOK_SECONDS = 30.0  # a benchmarking model is looked at again this often (besides its Job's watch events)
MAX_NODE_LOOKUPS = 20  # nodes of a class read to find a schedulable one
SIMULATED = ("kwok.x-k8s.io/node", "fake")  # kwok's mark on the nodes it simulates: they run no containers
# host fallbacks that are failures of a wanted benchmark (a Warning event), not a choice or a fact of the fleet
NOTE = " | "  # what selection adds to the compiler's message of a variant
FAILURES = ("BenchJobFailed", "BenchReportMissing", "BenchReportRejected", "BenchMeasuredNothing", "BenchUnavailable")


def select(kube: Kube, settings: Settings, em: EdgeModel, namespace: str, variants: list[dict[str, Any]],
           world: World) -> list[dict[str, Any]]:
    """``variants`` (status entries) with on-target selection advanced for each Ready or Benchmarking one."""
    return [_advance(kube, settings, em, namespace, v, world) for v in variants]


def _advance(kube: Kube, settings: Settings, em: EdgeModel, namespace: str, v: dict[str, Any], world: World
             ) -> dict[str, Any]:
    if v.get("state") not in ("Ready", "Benchmarking") or v.get("selection"):
        return v
    profile = next((p for p in world.profiles if p.metadata["name"] == v["profile"]), None)
    skip = _host_reason(settings, em, profile) or (None if v.get("candidates") else (
        "NoCandidates", "the compile report lists no published candidate (a cache entry of an older compiler)"))
    if skip or profile is None:
        return _host(v, *(skip or ("ProfileNotFound", "the HardwareProfile is gone")))
    node = schedulable_node(kube, world, profile)
    if node is None:
        return _host(v, "NoSchedulableNode", f"no node of class {v['profile']} can run the benchmark Job (none is "
                     "Ready, schedulable, real and tolerated by the class)")
    try:
        req = _request(kube, settings, em, namespace, v, profile, node)
    except CompileError as err:
        return _host(v, err.reason, f"{err.message}. Fix: {err.fix}")
    budget = em.spec.optimization.accuracy_budget
    return _follow_job(kube, settings, req, v, budget.max_accuracy_drop if budget else None)


def _host_reason(settings: Settings, em: EdgeModel, profile: HardwareProfile | None) -> tuple[str, str] | None:
    opt = em.spec.optimization
    if opt.selection == "host":
        return "SelectionHost", "spec.optimization.selection is host"
    if profile is None:
        return "ProfileNotFound", "the HardwareProfile is gone"
    if opt.evaluation is None:
        return "NoEvaluationData", ("the benchmark measures on spec.optimization.evaluation, which is not set. Fix: "
                                    "add evaluation data (a ConfigMap) or set optimization.selection: host")
    if opt.evaluation.config_map is None:
        return "NoEvaluationData", ("the benchmark Job reads spec.optimization.evaluation from a ConfigMap, not "
                                    f"{opt.evaluation.uri}. Fix: put the .npz in a ConfigMap (binaryData)")
    if em.spec.encryption is not None:
        return "Encrypted", "encrypted variants are not opened by the benchmark; the host chose"
    if not settings.artifact_store.startswith("oci://"):
        return "BenchUnavailable", (f"the benchmark Job fetches candidates from an oci:// artifact store, not "
                                    f"{settings.artifact_store}. Fix: set EDGEFLEET_ARTIFACT_STORE "
                                    "(chart: artifactStore.url) to oci://HOST/REPO")
    return None


def schedulable_node(kube: Kube, world: World, profile: HardwareProfile) -> str | None:
    """The first node (by name) of the class that can run the class's pods now: Ready, not cordoned, not
    simulated (kwok), every NoSchedule/NoExecute taint tolerated by the class."""
    name = profile.metadata["name"]
    members = sorted(n for n, p in resolve_nodes(world.nodes, world.profiles).items() if p == name)
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in profile.spec.tolerations]
    for node_name in members[:MAX_NODE_LOOKUPS]:
        node = kube.find("Node", node_name)
        if node is not None and _can_run(node, tolerations):
            return node_name
    return None


def _can_run(node: dict[str, Any], tolerations: list[dict[str, Any]]) -> bool:
    meta, spec = node["metadata"], node.get("spec") or {}
    if (meta.get("annotations") or {}).get(SIMULATED[0]) == SIMULATED[1] or spec.get("unschedulable"):
        return False
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in (node.get("status") or {}).get("conditions") or [])
    taints = [t for t in spec.get("taints") or [] if t.get("effect") in ("NoSchedule", "NoExecute")]
    return ready and all(any(_tolerates(tol, t) for tol in tolerations) for t in taints)


def _tolerates(tol: dict[str, Any], taint: dict[str, Any]) -> bool:
    if tol.get("effect") and tol["effect"] != taint.get("effect"):
        return False
    if tol.get("operator") == "Exists":
        return not tol.get("key") or tol["key"] == taint.get("key")
    return tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", "")


def _request(kube: Kube, settings: Settings, em: EdgeModel, namespace: str, v: dict[str, Any],
             profile: HardwareProfile, node: str) -> BenchJobRequest:
    evaluation = em.spec.optimization.evaluation
    ref = evaluation.config_map if evaluation else None
    if ref is None:  # _host_reason sent such models to the host
        raise CompileError("NoEvaluationData", "spec.optimization.evaluation names no ConfigMap",
                           "put the evaluation .npz in a ConfigMap")
    candidates = tuple(BenchCandidate(c["name"], c["artifact"], c["digest"]) for c in v["candidates"])
    return BenchJobRequest(model_namespace=namespace, model_name=em.metadata["name"],
                           generation=em.metadata.get("generation") or 0, profile=profile, node=node,
                           candidates=candidates, evaluation=config_map_bytes(kube, namespace, ref),
                           runs=settings.bench_runs)


def _follow_job(kube: Kube, settings: Settings, req: BenchJobRequest, v: dict[str, Any], max_drop: float | None
                ) -> dict[str, Any]:
    manifest = render_bench_job(req, settings)
    labels = bench_labels(req)
    outcome = BenchOutcome(v, req.node, settings.namespace, manifest["metadata"]["name"], max_drop)
    event_on = model_event_ref(req.model_namespace, req.model_name)
    job: ModelJob[dict[str, Any]] = ModelJob(
        "benchmark", manifest, lambda live: render_bench_inputs(req, live),
        {k: labels[k] for k in (MODEL_NAMESPACE, MODEL_NAME, PROFILE)}, event_on, outcome,
        refused=outcome.unavailable)
    return follow(kube, settings, job, master_key(kube, settings))


class BenchOutcome:
    """What a bench Job's states mean for one Ready variant: the node's choice from its sealed report, else the
    compile host's choice naming why."""

    def __init__(self, v: dict[str, Any], node: str, ns: str, name: str, max_drop: float | None):
        self.v, self.node, self.ns, self.name, self.max_drop = v, node, ns, name, max_drop
        self.job = f"{ns}/{name}"

    def running(self) -> dict[str, Any]:
        return _benchmarking(self.v, self.node, self.name)

    def report(self, report: dict[str, Any], ref: str) -> dict[str, Any]:
        return _from_report(self.v, report, self.name, self.max_drop)

    def rejected(self, ref: str, why: str) -> dict[str, Any]:
        return _host(self.v, "BenchReportRejected", f"the benchmark report {ref} was refused ({why}): something "
                     f"other than benchmark Job {self.name} wrote it")

    def failed(self, message: str) -> dict[str, Any]:
        return _host(self.v, "BenchJobFailed", f"benchmark Job {self.job} on {self.node} failed: {message}. Fix: "
                     f"read its logs (kubectl logs -n {self.ns} job/{self.name}) while it exists; it is retried after "
                     "its TTL")

    def missing(self, ref: str) -> dict[str, Any]:
        return _host(self.v, "BenchReportMissing", f"benchmark Job {self.job} completed but its report {ref} is not "
                     "in the artifact store. Fix: check that the runtime image has `edgefleet-runtime bench` and "
                     "reaches the registry")

    def unavailable(self, err: ApiError) -> dict[str, Any] | None:
        why = _refusal(err, self.ns, self.name)
        return None if why is None else _host(self.v, "BenchUnavailable", why)


def _refusal(err: Exception, ns: str, name: str) -> str | None:
    """Why the API server will never take the bench Job (a missing namespace, a 4xx refusal); None: transient."""
    problem = as_permanent(err, f"benchmark Job {ns}/{name}")
    return None if problem is None else f"{problem.message}. Fix: {problem.fix}"


def _from_report(v: dict[str, Any], report: dict[str, Any], job: str, max_drop: float | None) -> dict[str, Any]:
    try:
        results = on_target_results(report)
    except ValueError as err:
        return _host(v, "BenchMeasuredNothing", f"benchmark Job {job}: {err}")
    candidates = [dict(c) for c in v["candidates"]]
    for c in candidates:
        if c["digest"] in results:
            c["onTarget"] = results[c["digest"]].model_dump(by_alias=True, exclude_none=True)
    drops = accuracy_drops_on_target(results, candidates)
    allowed = within_budget_on_target(drops, [c["digest"] for c in candidates], max_drop)
    if not allowed:
        return _outside_budget(v, candidates, drops, max_drop, job)
    best = choose_on_target(results, allowed, threads=1)
    if best is None and candidates[0]["digest"] not in allowed:  # the host's choice failed the budget on the node
        return _outside_budget(v, candidates, drops, max_drop, job)
    if best is None:
        errors = "; ".join(f"{c['name']}: {c.get('onTarget', {}).get('error', 'not in the report')}"
                           for c in candidates)
        return _host({**v, "candidates": candidates}, "BenchMeasuredNothing",
                     f"benchmark Job {job} measured no candidate: {errors}")
    chosen = next(c for c in candidates if c["digest"] == best)
    host = candidates[0]  # the compiler lists its own choice first
    ot = chosen["onTarget"]
    message = (f"{chosen['name']}: fastest on {ot['node']}, p50 {ot['latencyP50Ms']:.3f} ms @1 thread; "
               + ("the host chose it too" if chosen is host else
                  f"the host chose {host['name']} (host p50 {host.get('latencyP50Ms')} ms, on {ot['node']} "
                  f"{host.get('onTarget', {}).get('latencyP50Ms')} ms)"))
    out = {k: val for k, val in v.items() if k not in ("format", "precision", "quantization", "sizeBytes",
                                                         "latencyP50Ms", "accuracyDelta", "reason")}
    out.update({k: chosen[k] for k in ("artifact", "digest", "format", "precision", "quantization", "sizeBytes",
                                       "latencyP50Ms", "accuracyDelta") if k in chosen})
    out.update({"state": "Ready", "selection": "onTarget", "onTarget": ot, "reason": "FastestOnTarget",
                "message": message, "candidates": [chosen] + [c for c in candidates if c is not chosen]})
    return out


def _outside_budget(v: dict[str, Any], candidates: list[dict[str, Any]], drops: dict[str, float],
                    max_drop: float | None, job: str) -> dict[str, Any]:
    """Every candidate lost more accuracy on the node than the budget allows: none is served, however fast."""
    lost = "; ".join(f"{c['name']}: {drops.get(c['digest'])} points" for c in candidates)
    return {**v, "state": "Failed", "candidates": candidates, "reason": "OnTargetAccuracyOutOfBudget",
            "message": (f"{_compiled(v)}{NOTE}benchmark Job {job}: every candidate's accuracy on the node drops "
                        f"more than maxAccuracyDrop {max_drop} points against the source ({lost}). Fix: check the "
                        "variants' digests and the class's runtime, or widen spec.optimization.accuracyBudget")[:4096]}


def _benchmarking(v: dict[str, Any], node: str, job: str) -> dict[str, Any]:
    return {**v, "state": "Benchmarking", "reason": "Benchmarking",
            "message": f"{_compiled(v)}{NOTE}measuring {len(v['candidates'])} candidates on {node} (Job {job})"}


def _host(v: dict[str, Any], reason: str, why: str) -> dict[str, Any]:
    """The compiler's own choice, saying why the node did not choose."""
    return {**v, "state": "Ready", "selection": "host", "reason": reason,
            "message": f"{_compiled(v)}{NOTE}selected on the compile host: {why}"[:4096]}


def _compiled(v: dict[str, Any]) -> str:
    """The compiler's message of the variant, without what selection added."""
    return (v.get("message") or "").split(NOTE)[0]


def condition(variants: list[dict[str, Any]]) -> tuple[bool, str, str]:
    """(status, reason, message) of the OnTargetSelected condition."""
    measuring = [v["profile"] for v in variants if v.get("state") == "Benchmarking"]
    if measuring:
        return False, "Benchmarking", f"measuring candidates on a node of {', '.join(measuring)}"
    decided = [v for v in variants if v.get("selection")]
    host = [v for v in decided if v["selection"] == "host"]
    if not decided:
        return False, "NoVariants", "no Ready variant to select"
    if not host:
        return True, "FastestOnTarget", "; ".join(f"{v['profile']}: {v['message']}" for v in decided)
    first = next((v for v in host if v.get("reason") in FAILURES), host[0])
    return False, first.get("reason") or "HostSelected", "; ".join(
        f"{v['profile']}: {v.get('reason')}: {v.get('message', '')}" for v in host)[:32768]
