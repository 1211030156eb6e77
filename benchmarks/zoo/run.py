"""Zoo benchmark: every zoo model compiled by edgefleet for the cpu-amd64 class, against the raw source in the
same run.

    python benchmarks/zoo/run.py [--models a,b] [--runs 30] [--timeout 400] [--json F] [--markdown docs/zoo.md]
    python benchmarks/zoo/run.py --models minilm-l6-v2 --merge benchmarks/results/zoo.json --markdown docs/zoo.md

Per model (cpu-amd64): the raw source's size and p50 (ONNX Runtime CPU, 1 thread; .tflite: LiteRT), the variant
the compiler chose, its size ratio (source bytes / variant bytes) and speed ratio (source p50 / variant p50,
> 1 = faster; both measured interleaved after the compile), its accuracy (classifiers: top-1 agreement with the
source, in points) or cosine vs the source, whether the fp16 candidate held (ran, within budget), and why the
other candidates lost. ``.tflite`` sources are compiled for a LiteRT CPU target: cpu-amd64 takes ONNX only.
Each model runs in its own process, killed after --timeout seconds (2-core hosts). Evaluation data: made by
edgefleet_dev.zoo (128 samples for classifiers, 8 otherwise; calibration 8 others). --from-json F re-prints an
earlier run's table; --merge F runs only --models and puts their rows into the earlier run F (same model:
replaced, new: appended), writes F back and prints the whole table. The same compile also builds the nvidia-jetson
class (fp16 on TensorRT, measured on this CPU as a stand-in): its column says what a GPU/Jetson node would serve;
and a Core ML export (fp16 ML program, structure checked, not run: no Apple device here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edgefleet_dev import zoo

LITERT_CPU = {"format": "tflite", "precision": "int8", "runtime": "litert"}
GPU_CLASS = "nvidia-jetson"  # fp16 on TensorRT; nvidia-gpu has the same target, so the same variant
COREML_CLASS, COREML = "apple-coreml", {"format": "coreml", "precision": "fp16", "runtime": "coreml"}


def compile_one(name: str, runs: int) -> dict:
    from edgefleet.compiler import AccuracyBudget, CompileRequest, CompileTarget, Policy, compile_model, load_profiles
    from edgefleet.compiler.measure import load_arrays

    m = zoo.MODELS[name]
    src = zoo.fetch(m)
    ev, calib = zoo.write_data(m, src, zoo.cache_root() / m.name / "data")
    profiles = load_profiles()
    if m.format == "onnx":
        cls, target, runtime = "cpu-amd64", profiles["cpu-amd64"], "onnxruntime"
    else:
        cls, target, runtime = "litert-cpu", CompileTarget(**LITERT_CPU), "litert"
    targets = {cls: target, GPU_CLASS: profiles[GPU_CLASS],  # one compile: the classes share built candidates
               COREML_CLASS: CompileTarget(**COREML)}
    feed1 = {k: v[:1] for k, v in load_arrays(ev).items() if k != "y"}
    budget = AccuracyBudget(max_accuracy_drop=1.0) if m.classifier else AccuracyBudget(min_cosine=m.min_cosine)
    pol = Policy(evaluation=ev, calibration=calib, accuracyBudget=budget, timingRuns=runs, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        result = compile_model(CompileRequest(str(src), targets, pol), None, Path(tmp) / "cache")
        v = result.variants[cls]
        chosen = v.artifact and Path(v.artifact.removeprefix("file://"))
        raw, var = paired_p50(runtime, src.read_bytes(), chosen.read_bytes() if chosen else None, feed1, runs * 2)
    return {"model": name, "task": m.task, "class": cls, "source": m.wheel.requirement, "license": m.wheel.license,
            "sourceBytes": src.stat().st_size, "rawP50Ms": raw, "chosenP50Ms": var, "variant": v.to_dict(),
            "gpuVariant": result.variants[GPU_CLASS].to_dict(),
            "coremlVariant": result.variants[COREML_CLASS].to_dict()}


def paired_p50(runtime: str, raw: bytes, chosen: bytes | None, feed: dict, runs: int) -> tuple[float, float | None]:
    """p50 ms of the raw source and the chosen variant at 1 thread, runs interleaved (A B A B ...) so that the
    load of a shared host hits both alike."""
    import time

    import numpy as np
    from edgefleet.compiler.measure import open_runner

    runners = [open_runner(runtime, raw, 1)] + ([open_runner(runtime, chosen, 1)] if chosen else [])
    times: list[list[float]] = [[] for _ in runners]
    for i in range(runs + 3):
        for r, t in zip(runners, times, strict=True):
            t0 = time.perf_counter()
            r.run(feed)
            if i >= 3:  # warm-up
                t.append((time.perf_counter() - t0) * 1000)
    p50 = [float(np.percentile(t, 50)) for t in times]
    return p50[0], (p50[1] if chosen else None)


def _quality(c: dict) -> str:
    m = c.get("metrics") or {}
    if m.get("accuracy") is not None:
        return f"top-1 agree {m['accuracy'] * 100:.1f}% ({m.get('accuracyDelta', 0):+.1f} pts)"
    return f"cos {m['cosine']:.4f}" if m.get("cosine") is not None else "-"


def _fp16(cands: list[dict]) -> str:
    c = next((c for c in cands if c["name"] in ("fp16",)), None)
    if c is None:
        return "n/a (not built for this class)"
    if c["state"] == "Failed":
        return f"no: {c['reason']}"
    return f"{'yes' if c.get('withinBudget') else 'off budget'} ({_quality(c)})"


def _gpu(r: dict) -> str:
    g = r.get("gpuVariant")
    if not g:
        return "-"
    if g["state"] != "Ready":
        return f"{g['state']}: {g.get('reason')} ({(g.get('message') or '')[:80]})"
    chosen = next(c for c in g["candidates"] if c["state"] == "Chosen")
    return f"Ready {g['chosen']}, {r['sourceBytes'] / g['sizeBytes']:.2f}x smaller, {_quality(chosen)}"


def _coreml(r: dict) -> str:
    g = r.get("coremlVariant")
    if not g:
        return "-"
    if g["state"] != "Ready":
        why = (g.get("message") or "").split(": ", 1)[-1].split(" Fix:")[0].replace("Core ML export: ", "")
        return f"{g.get('reason')}: {why[:130]}"
    return f".mlpackage {g['sizeBytes'] / 1e6:.2f} MB, structure checked, not run (no Apple device)"


def _losers(cands: list[dict]) -> str:
    out = []
    for c in cands:
        if c["state"] in ("Lost", "Failed"):
            why = (c.get("why") or c.get("reason") or "").split(". ")[0].replace("outside the accuracy budget: ", "")
            if c["name"] == "fp16" and c.get("reason") == "Fp16DoesNotHold":
                why = why.split(": try 1")[0]
            out.append(f"{c['name']}: {why if len(why) <= 130 else why[:129] + '…'}")
    return "; ".join(out)


def row(r: dict) -> list[str]:
    if "error" in r:
        return [r["model"], r.get("task", ""), r.get("class", ""), "-", "-", "FAILED", "-", "-", r["error"][:160],
                "-", "-", "-", ""]
    v = r["variant"]
    chosen = next((c for c in v["candidates"] if c["state"] == "Chosen"), None)
    raw = r["rawP50Ms"]
    base = [r["model"], r["task"], r["class"], f"{r['sourceBytes'] / 1e6:.2f} MB", f"{raw:.2f} ms"]
    if chosen is None:
        return base + [f"none ({v.get('reason')})", "-", "-", "-", _fp16(v["candidates"]), _gpu(r),
                       _coreml(r), _losers(v["candidates"])]
    p50 = r["chosenP50Ms"]
    return base + [chosen["name"], f"{r['sourceBytes'] / chosen['sizeBytes']:.2f}x", f"{raw / p50:.2f}x",
                   _quality(chosen), _fp16(v["candidates"]), _gpu(r), _coreml(r), _losers(v["candidates"])]


HEADER = ["model", "task", "class", "source size", "source p50", "chosen", "size ratio", "speed ratio",
          "accuracy vs source", "fp16 holds?", f"{GPU_CLASS} variant", f"{COREML_CLASS} export",
          "why the others lost"]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(zoo.MODELS))
    ap.add_argument("--runs", type=int, default=30, help="timed runs per latency figure")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per model (its process is killed after)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="write the table (markdown) into this file between the "
                    "<!-- zoo-table --> markers")
    ap.add_argument("--from-json", help="print (and --markdown) the table of an earlier run's --json, compile nothing")
    ap.add_argument("--merge", help="an earlier run's --json: compile --models only, replace or add their rows "
                    "there and write it back")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(compile_one(args.one, args.runs)))
        return 0
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else []
    for name in [] if args.from_json else args.models.split(","):
        if name not in zoo.MODELS:
            print(f"unknown model {name}; choose from {list(zoo.MODELS)}", file=sys.stderr)
            return 2
        print(f"[zoo] {name} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--runs", str(args.runs)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
            last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
            results.append(json.loads(last) if p.returncode == 0 and last.startswith("{") else
                           {"model": name, "error": (p.stderr.strip().splitlines() or ["no output"])[-1]})
        except subprocess.TimeoutExpired:
            results.append({"model": name, "error": f"did not finish in {args.timeout} s (--timeout)"})
    ran = results
    if args.merge:
        results = merged(json.loads(Path(args.merge).read_text()), results)
        Path(args.merge).write_text(json.dumps(results, indent=1) + "\n")
    rows = [row(r) for r in results]
    widths = [max(len(x) for x in col) for col in zip(HEADER, *rows, strict=True)]
    for r in [HEADER, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    print("ratios against the raw source in the same run (ONNX Runtime CPU / LiteRT, 1 thread, batch 1)")
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        doc = Path(args.markdown)
        text = doc.read_text()
        start, end = "<!-- zoo-table -->", "<!-- /zoo-table -->"
        if start not in text or end not in text:
            print(f"{doc} has no {start} ... {end} markers", file=sys.stderr)
            return 2
        head, rest = text.split(start, 1)
        doc.write_text(head + start + "\n" + markdown(rows) + end + rest.split(end, 1)[1])
    return 0 if all("error" not in r for r in ran) else 1


def merged(earlier: list[dict], new: list[dict]) -> list[dict]:
    """``earlier`` with each of ``new`` in place of the row of the same model, or appended (zoo order kept)."""
    by_name = {r["model"]: r for r in earlier} | {r["model"]: r for r in new}
    order = [n for n in zoo.MODELS if n in by_name] + [n for n in by_name if n not in zoo.MODELS]
    return [by_name[n] for n in order]


if __name__ == "__main__":
    sys.exit(main())
