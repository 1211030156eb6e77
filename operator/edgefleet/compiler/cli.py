"""``edgefleet compile``: the compiler on a laptop or in a compile Job (progress on stderr)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from ..api.models import Distillation, Pruning
from ..progress import Progress
from .types import QUANTIZATIONS, AccuracyBudget, CompileError, CompileRequest, Policy

EXIT_VARIANT_FAILED = 1  # the request was fine, but at least one profile has no variant
EXIT_BAD_INPUT = 2  # nothing was compiled or published
EXIT_REPORT_FAILED = 3  # compiled and published, but the report could not be pushed (worth a retry)
REPORT_MEDIA_TYPE = "application/vnd.edgefleet.compile-report+json"


@click.command("compile")
@click.argument("source")
@click.option("--profile", "profiles", multiple=True, help="Hardware profile name (repeatable). Default: all.")
@click.option("--profiles-file", type=click.Path(dir_okay=True), default=None,
              help="HardwareProfile YAML file or directory (default: the built-in profiles).")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default="auto", show_default=True)
@click.option("--sparsity", type=float, default=0.0, show_default=True, help="Magnitude pruning fraction 0..0.95.")
@click.option("--calibration", type=click.Path(), default=None, help=".npz or directory of .npy for static int8.")
@click.option("--eval", "evaluation", type=click.Path(), default=None,
              help=".npz or directory of .npy (input names as keys, labels as y).")
@click.option("--max-accuracy-drop", type=float, default=None, help="Accuracy budget in top-1 points.")
@click.option("--min-cosine", type=float, default=None, help="Accuracy budget: cosine vs the source outputs.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=1x3x48x192",
              help="Every dim of a model input whose dims are dynamic (repeatable); without it, evaluation data or "
                   "the model's metadata, quantization auto refuses a model whose dims it cannot know.")
@click.option("--pruning", default=None, metavar="JSON",
              help='Structured pruning, as EdgeModel spec.optimization.pruning, e.g. {"ratio":0.5,"epochs":10} '
                   "(needs --calibration and the train extra).")
@click.option("--distillation", default=None, metavar="JSON",
              help='Knowledge distillation, as spec.optimization.distillation, e.g. {"student":"mlp:[64]"} '
                   "(needs --calibration and the train extra).")
@click.option("--digest", default=None, help="Expected sha256:<hex> of the source.")
@click.option("--out", "out", required=True, help="Output directory or oci://HOST:PORT/REPO.")
@click.option("--report", "reports", multiple=True,
              help="Write the full report as JSON to a file, or push it to oci://HOST:PORT/REPO:TAG (then a "
                   "request-level failure is pushed too, as {\"error\": {reason, message, fix}}); repeatable.")
@click.option("--name", default=None, help="Artifact name prefix (default: the source file stem).")
@click.option("--cache-dir", type=click.Path(), default=None, envvar="EDGEFLEET_CACHE",
              help="Compile cache (default ~/.cache/edgefleet/compile).")
@click.option("--timing-runs", type=int, default=50, show_default=True, help="Timed runs per latency figure.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--signing-key-file", type=click.Path(dir_okay=False), default=None,
              envvar="EDGEFLEET_SIGNING_KEY_FILE", help="Sign every published variant with this ECDSA P-256 key (PEM).")
@click.option("--encryption-key-file", type=click.Path(dir_okay=False), default=None,
              help="Encrypt every published variant (AES-256-GCM) for this P-256 public key (PEM; "
                   "`edgefleet keygen encryption`) or under this 32-byte key.")
def compile_command(source, profiles, profiles_file, quantization, sparsity, calibration, evaluation,
                    max_accuracy_drop, min_cosine, input_shapes, pruning, distillation, digest, out, reports, name,
                    cache_dir, timing_runs, quiet, signing_key_file, encryption_key_file):
    """Compile SOURCE (.onnx/.tflite path, https:// or oci://) into one measured variant per profile."""
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice goes to the root logger
    from ..artifacts import StoreError, pod_store
    from .core import compile_model
    from .profiles import load_profiles
    from .shapes import parse_input_shape

    shown = Progress(lambda line: click.echo(line, err=True), live=False if quiet else None)
    tasks: dict[str, Any] = {}

    def say(msg: str) -> None:
        if not quiet:
            shown.say(f"[compile] {msg}")

    def candidates(profile: str, done: int, total: int, next_one: str) -> None:
        """One progress line per profile: candidates built and measured out of all."""
        if quiet:
            return
        status = f"{done}/{total} candidates, now {next_one}"
        if profile not in tasks:
            tasks[profile] = shown.add(f"[compile] {profile}", total=total, status=status)
        if done < total:
            shown.update(tasks[profile], done, status)
        else:
            shown.done(tasks[profile], f"{total}/{total} candidates measured")

    for report in reports:
        if report.startswith("oci://") and ":" not in report.rsplit("/", 1)[-1]:
            raise click.BadParameter("an oci:// report needs a tag: oci://HOST:PORT/REPO:TAG", param_hint="--report")
    try:
        all_profiles = load_profiles(profiles_file)
        names = list(profiles) or sorted(all_profiles)
        unknown = [n for n in names if n not in all_profiles]
        if unknown:
            raise CompileError("InvalidRequest", f"unknown profile(s) {unknown}; known: {sorted(all_profiles)}",
                               "pass --profiles-file with your HardwareProfile YAML or pick a built-in name")
        for label, p in (("calibration", calibration), ("evaluation", evaluation)):
            if p and not Path(p).exists():
                raise CompileError("InvalidData", f"{label} data {p} does not exist", "check the path")
        policy = Policy(
            quantization=quantization, sparsity=sparsity,
            calibration=Path(calibration) if calibration else None,
            evaluation=Path(evaluation) if evaluation else None,
            accuracyBudget=None if max_accuracy_drop is None and min_cosine is None else AccuracyBudget(
                max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine),
            timingRuns=timing_runs, inputShapes=dict(parse_input_shape(s) for s in input_shapes),
            pruning=_training_spec(Pruning, "pruning", pruning, calibration),
            distillation=_training_spec(Distillation, "distillation", distillation, calibration),
        )
        request = CompileRequest(source=source, targets={n: all_profiles[n] for n in names}, policy=policy,
                                 digest=digest, name=name)
        store = pod_store(out)
        with shown:
            result = compile_model(request, store=store, cache_dir=cache_dir, progress=say,
                                   signing_key_file=signing_key_file,
                                   encryption_key=_encryption_key(encryption_key_file), candidates=candidates)
    except CompileError as e:
        click.echo(f"error: {e.reason}: {e.message}", err=True)
        if e.fix:
            click.echo(f"  fix: {e.fix}", err=True)
        _push_error(reports, e.reason, e.message, e.fix)
        sys.exit(EXIT_BAD_INPUT)
    except StoreError as e:
        fix = "check --out (directory writable, or the registry reachable)"
        click.echo(f"error: ArtifactStoreFailed: {e}", err=True)
        click.echo(f"  fix: {fix}", err=True)
        _push_error(reports, "ArtifactStoreFailed", str(e), fix)
        sys.exit(EXIT_BAD_INPUT)
    for report in reports:
        if report.startswith("oci://"):
            try:
                push_report(report, result.to_json().encode())
            except StoreError as e:
                click.echo(f"error: ReportPushFailed: {e}", err=True)
                sys.exit(EXIT_REPORT_FAILED)
            say(f"report: {report}")
        else:
            Path(report).write_text(result.to_json())
    for name, v in sorted(result.variants.items()):
        if v.state == "Ready":
            click.echo(f"{name}\tReady\t{v.chosen}\t{v.digest}\t{v.sizeBytes}\t{v.artifact}"
                       + ("\t(cached)" if v.cacheHit else ""))
        else:
            click.echo(f"{name}\tFailed\t{v.reason}\t{v.message}")
    sys.exit(0 if result.ok else EXIT_VARIANT_FAILED)


def _training_spec(kind, field: str, text: str | None, calibration: str | None):
    """--pruning / --distillation JSON as the API model; CompileError naming the field otherwise."""
    if text is None:
        return None
    import json

    from pydantic import ValidationError

    from ..api.base import format_errors

    try:
        spec = kind.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise CompileError("InvalidRequest", f"--{field} is not JSON: {e}",
                           f"pass optimization.{field} as JSON, e.g. " + ('{"ratio":0.5}' if field == "pruning"
                                                                          else '{"student":"mlp:[64]"}')) from e
    except ValidationError as e:
        raise CompileError("InvalidRequest", "; ".join(f"optimization.{field}.{line}" for line in format_errors(e)),
                           f"fix optimization.{field} (docs/optimization.md)") from e
    if calibration is None:
        raise CompileError("InvalidRequest", f"optimization.{field} trains on calibration inputs; none were given",
                           "pass --calibration DATA")
    return spec


def _encryption_key(path: str | None):
    if path is None:
        return None
    from edgefleet_runtime.trust import TrustError, load_encryption_key

    try:
        return load_encryption_key(path)
    except TrustError as e:
        raise CompileError("InvalidEncryptionKey", str(e), "pass the PEM public key of an encryption pair") from e


def push_report(uri: str, data: bytes) -> None:
    """Push the report to ``oci://HOST:PORT/REPO:TAG``, sealed with the Job's key when the operator gave one
    (``edgefleet_runtime.sealed``); the registry and its plain-HTTP rule are those of ``--out``."""
    from edgefleet_runtime.fetch import pusher_login
    from edgefleet_runtime.sealed import seal_from_env

    from ..artifacts.store import push_file

    push_file(uri, seal_from_env(data), REPORT_MEDIA_TYPE, False, *(pusher_login() or (None, None)))


def _push_error(reports: tuple[str, ...], reason: str, message: str, fix: str) -> None:
    """A request-level failure, pushed where the reports would go (oci:// reports only), best effort."""
    import json

    from ..artifacts import StoreError

    for report in reports:
        if not report.startswith("oci://"):
            continue
        try:
            push_report(report, json.dumps({"error": {"reason": reason, "message": message, "fix": fix}}).encode())
        except StoreError as e:
            click.echo(f"error: ReportPushFailed: {e}", err=True)
