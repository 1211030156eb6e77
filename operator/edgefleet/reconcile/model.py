"""EdgeModel: compile one variant per target hardware class and report them in status."""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from ..api import DataRef, EdgeModel, Source, label_selector_matches
from ..api.compile import CompileRequest, Policy
from ..artifacts import own_store
from ..compiler import CompileError, compile_model
from ..compiler.core import encryption_key_from_pem
from ..kube import ApiError, Kube
from ..render import resolve_nodes
from ..settings import Settings, store_login
from . import on_target
from .compile_job import compile_in_job
from .conditions import COMPILED, DEGRADED, READY, flipped, set_condition, status_patch, without_times
from .errors import as_permanent, report_invalid_spec
from .sources import config_map_bytes, without_none
from .world import World

log = logging.getLogger(__name__)
FINAL = ("Ready", "Failed")
# failures the user fixes outside the spec (e.g. by creating the ConfigMap): looked at again on every resync
RETRIED = ("SourceUnavailable",)


def target_profiles(em: EdgeModel, world: World) -> tuple[list[str], list[str]]:
    """(profiles to compile for, names asked for that do not exist)."""
    known = {p.metadata["name"]: p for p in world.profiles}
    chosen = em.spec.target_profiles
    if chosen and chosen.names:
        return [n for n in chosen.names if n in known], [n for n in chosen.names if n not in known]
    if chosen and chosen.selector:
        return sorted(n for n, p in known.items() if label_selector_matches(chosen.selector, p.metadata.get(
            "labels", {}))), []
    return sorted({p for p in resolve_nodes(world.nodes, world.profiles).values() if p}), []


def _up_to_date(raw: dict[str, Any], targets: list[str], missing: list[str]) -> bool:
    status = raw.get("status") or {}
    have = {v["profile"]: v.get("state") for v in status.get("variants", [])}
    return (status.get("observedGeneration") == raw["metadata"].get("generation")
            and set(have) == set(targets) | set(missing) and all(s in FINAL for s in have.values())
            and not any(v.get("reason") in RETRIED for v in status.get("variants", [])))


def reconcile_model(kube: Kube, settings: Settings, namespace: str, name: str, world: World | None = None
                    ) -> float | None:
    """Compile, then select on target; returns seconds until the next look while a benchmark Job runs."""
    raw = kube.find("EdgeModel", name, namespace)
    if raw is None or raw["metadata"].get("deletionTimestamp"):
        return None
    try:
        em = EdgeModel.model_validate(raw)
    except ValidationError as err:  # admission should have refused it: report, do not retry
        report_invalid_spec(kube, raw, err, READY)
        return None
    world = world or World.read(kube)
    targets, missing = target_profiles(em, world)
    if _up_to_date(raw, targets, missing):
        return None
    generation = raw["metadata"].get("generation")
    if _benchmarking(raw, targets, missing):  # compiled: only the benchmark Jobs are followed
        variants = on_target.select(kube, settings, em, namespace, raw["status"]["variants"], world)
        return _finish(kube, raw, generation, variants)
    not_found = [{"profile": n, "state": "Failed", "reason": "ProfileNotFound",
                  "message": f"HardwareProfile {n!r} does not exist; create it or remove it from "
                             "spec.targetProfiles.names"} for n in missing]
    pending = [_keep_or_compile(raw, generation, p) for p in targets] + not_found
    compiling = any(v.get("state") == "Compiling" for v in pending)  # a retry keeps its Failed entry meanwhile
    _write(kube, raw, generation, pending, _conditions(raw, pending, generation, compiling=compiling))
    variants = _compile(kube, settings, em, namespace, targets, world)
    variants = on_target.select(kube, settings, em, namespace, variants, world) + not_found
    raw = kube.find("EdgeModel", name, namespace) or raw
    return _finish(kube, raw, generation, variants)


def _finish(kube: Kube, raw: dict[str, Any], generation: int | None, variants: list[dict[str, Any]]) -> float | None:
    compiling = any(v.get("state") == "Compiling" for v in variants)  # a compile Job still running
    _write(kube, raw, generation, variants, _conditions(raw, variants, generation, compiling=compiling))
    return on_target.RELOOK_SECONDS if any(v.get("state") == "Benchmarking" for v in variants) else None


def _benchmarking(raw: dict[str, Any], targets: list[str], missing: list[str]) -> bool:
    """The status is of this generation and complete, and some class is still being measured on target."""
    status = raw.get("status") or {}
    variants = status.get("variants", [])
    states = {v["profile"]: v.get("state") for v in variants}
    return (status.get("observedGeneration") == raw["metadata"].get("generation")
            and set(states) == set(targets) | set(missing) and "Benchmarking" in states.values()
            and all(s in (*FINAL, "Benchmarking") for s in states.values()))


def _keep_or_compile(raw: dict[str, Any], generation: int | None, profile: str) -> dict[str, Any]:
    """While compiling: a variant of the same spec generation stays as it is (only a new target class
    shows Compiling), so deployments keep serving it without flapping."""
    status = raw.get("status") or {}
    if status.get("observedGeneration") == generation:
        for v in status.get("variants", []):
            if v["profile"] == profile and v.get("state") in FINAL:
                return dict(v)
    return {"profile": profile, "state": "Compiling"}


def _compile(kube: Kube, settings: Settings, em: EdgeModel, namespace: str, targets: list[str], world: World
             ) -> list[dict[str, Any]]:
    if not targets:
        return []
    if settings.compile_executor == "job":  # a Kubernetes Job per compile; non-blocking (compile_job.py)
        try:
            return compile_in_job(kube, settings, em, namespace, targets, world)
        except ApiError as err:
            problem = as_permanent(err, f"the compile Job of EdgeModel {namespace}/{em.metadata['name']}")
            if problem is None:
                raise
            log.warning("%s", problem)
            return [{"profile": t, "state": "Failed", "reason": problem.reason, "message": str(problem)}
                    for t in targets]
    profiles = {p.metadata["name"]: p for p in world.profiles}
    with tempfile.TemporaryDirectory(prefix="edgefleet-compile-") as tmp:
        try:
            source = _materialize(kube, namespace, em.spec.source, Path(tmp), "model")
            opt = em.spec.optimization
            policy = Policy.of(opt, _data(kube, namespace, opt.calibration, Path(tmp), "calibration"),
                               _data(kube, namespace, opt.evaluation, Path(tmp), "evaluation"),
                               settings.compile_timing_runs, settings.compile_host_latency_ms)
            request = CompileRequest.of(em, {t: profiles[t].spec for t in targets}, str(source), policy,
                                         settings.source_max_bytes, settings.source_deadline_seconds)
            encryption = em.spec.encryption.public_key if em.spec.encryption else None
            variants = compile_isolated(request, settings, encryption)
        except CompileError as err:
            return [err.to_status_variant(t) for t in targets]
    return [without_none(variant) for variant in variants]


def compile_isolated(request: CompileRequest, settings: Settings, encryption_public_key: str | None = None
                     ) -> list[dict[str, Any]]:
    """Compile in a short-lived child process: the toolchains' memory (ONNX Runtime, OpenVINO, calibration
    data) goes back to the system when it exits instead of staying in the long-running operator, and a compile
    that runs past settings.compile_deadline_seconds is killed (CompileTimedOut). Variants are signed with
    settings.signing_key_file and encrypted for ``encryption_public_key`` (PEM) when given."""
    spawn = multiprocessing.get_context("spawn")
    store = (settings.artifact_store, None, settings.artifact_insecure,
             *store_login(settings))  # own_store's arguments: the variants go to the operator's store
    signing = str(settings.signing_key_file) if settings.signing_key_file else None
    answers, sender = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_compile_child, args=(sender, request, store, str(settings.compile_cache), signing,
                                                       encryption_public_key), daemon=True)
    child.start()
    sender.close()
    try:
        outcome = _answer(answers, child, settings.compile_deadline_seconds)
    finally:
        child.kill()
        child.join()
    if isinstance(outcome, tuple):
        raise CompileError(*outcome)
    return outcome


def _answer(answers: Any, child: Any, seconds: float) -> list[dict[str, Any]] | tuple[str, str, str]:
    """What the compile child sent within ``seconds``."""
    if not answers.poll(seconds):
        return ("CompileTimedOut", f"the compile ran past {seconds:g} s and was stopped",
                "raise the operator's EDGEFLEET_COMPILE_DEADLINE_SECONDS or shrink the work (fewer targets, less "
                "calibration data)")
    try:
        outcome = answers.recv()
    except EOFError:  # the child died without an answer (killed for memory, a crash in a toolchain)
        child.join(5)
        return ("CompileFailed", f"the compile process ended without a result (exit code {child.exitcode})",
                "see the operator's log; a compile that needs more memory than the operator has can run as a Job "
                "(compile executor job)")
    if isinstance(outcome, BaseException):
        raise outcome  # not a compile error: the reconcile is retried
    return cast(list[dict[str, Any]] | tuple[str, str, str], outcome)


def _compile_child(answers: Any, request: CompileRequest, store: tuple[Any, ...], cache_dir: str,
                   signing_key_file: str | None = None, encryption_public_key: str | None = None) -> None:
    try:
        key = encryption_key_from_pem(encryption_public_key) if encryption_public_key else None
        answers.send(compile_model(request, own_store(*store), cache_dir, signing_key_file=signing_key_file,
                                   encryption_key=key).to_status())
    except CompileError as err:
        answers.send((err.reason, err.message, err.fix))
    except Exception as err:  # sent as it is: the parent raises it
        answers.send(RuntimeError(f"the compile failed: {err!r}"))


def _materialize(kube: Kube, namespace: str, ref: Source | DataRef, tmp: Path, stem: str) -> str | Path:
    """A local path (ConfigMap data written out) or the URI for the compiler to fetch."""
    if ref.config_map is not None:
        key = ref.config_map.key
        data = config_map_bytes(kube, namespace, ref.config_map)
        path = tmp / f"{stem}-{Path(key).name}"
        path.write_bytes(data)
        return path
    uri = ref.uri or ""  # admission: exactly one of uri and configMap
    if uri.startswith("pvc://"):
        raise CompileError("SourceUnavailable", f"{uri}: pvc:// sources are read by compile Jobs",
                           "set the operator's compile executor to job, or use oci:// / https://")
    return uri


def _data(kube: Kube, namespace: str, ref: DataRef | None, tmp: Path, stem: str) -> Path | None:
    if ref is None:
        return None
    found = _materialize(kube, namespace, ref, tmp, stem)
    if isinstance(found, Path):
        return found
    raise CompileError("InvalidData", f"{stem} data {found}: only ConfigMap data refs are read by the inline "
                       "compiler", f"put the {stem} .npz in a ConfigMap (binaryData) and reference it")


def _conditions(raw: dict[str, Any], variants: list[dict[str, Any]], generation: int | None,
                compiling: bool) -> list[dict[str, Any]]:
    conds = (raw.get("status") or {}).get("conditions", [])
    failed = [v for v in variants if v.get("state") == "Failed"]
    ready = [v for v in variants if v.get("state") == "Ready"]
    if compiling:
        training = next((v["message"] for v in variants if v.get("reason") == "Training" and v.get("message")), None)
        conds = set_condition(conds, COMPILED, False, "Training" if training else "Compiling",
                              f"compiling {len(variants)} variants" + (f"; {training}" if training else ""),
                              generation)
        return set_condition(conds, READY, False, "Compiling", "variants are being compiled", generation)
    benchmarking = [v["profile"] for v in variants if v.get("state") == "Benchmarking"]
    conds = set_condition(conds, COMPILED, True, "CompileFinished",
                          f"{len(ready) + len(benchmarking)} variants compiled, {len(failed)} failed", generation)
    conds = set_condition(conds, on_target.CONDITION, *on_target.condition(variants), generation)
    if benchmarking:
        conds = set_condition(conds, READY, False, "Benchmarking",
                              f"candidates are measured on a node of {', '.join(benchmarking)}", generation)
    elif not variants:
        conds = set_condition(conds, READY, False, "NoTargetProfiles",
                              "no HardwareProfile matches a node and none is named in spec.targetProfiles",
                              generation)
    else:
        all_ready = len(ready) == len(variants)
        conds = set_condition(conds, READY, all_ready, "VariantsReady" if all_ready else "VariantsFailed",
                              f"{len(ready)}/{len(variants)} variants ready", generation)
    first = failed[0] if failed else None
    return set_condition(conds, DEGRADED, bool(failed), first["reason"] if first else "AsExpected",
                         f"{first['profile']}: {first.get('message', '')}" if first else "no variant failed",
                         generation)


def _write(kube: Kube, raw: dict[str, Any], generation: int | None, variants: list[dict[str, Any]],
           conditions: list[dict[str, Any]]) -> None:
    """Status for the generation that was compiled (a spec change during the compile stays pending)."""
    old = raw.get("status") or {}
    ready = sum(1 for v in variants if v.get("state") == "Ready")
    status = status_patch("EdgeModel", observed_generation=generation, conditions=conditions, variants=variants,
                          variants_ready=f"{ready}/{len(variants)}")
    if (old.get("observedGeneration"), old.get("variants")) == (generation, status["variants"]) and without_times(
            old.get("conditions", [])) == without_times(conditions):
        return
    kube.patch_status("EdgeModel", raw["metadata"]["name"], raw["metadata"]["namespace"], status)
    for c in flipped(old.get("conditions", []), conditions):
        if c["type"] == DEGRADED and c["status"] == "True" or (
                c["type"] == on_target.CONDITION and c["reason"] in on_target.FAILURES):
            kube.event(raw, c["reason"], c["message"], "Warning")
        elif c["type"] == READY and c["status"] == "True":
            kube.event(raw, c["reason"], c["message"])
