"""Pruning and distillation benchmark: the trained candidates against fp32 and int8, measured in the same run.

    python benchmarks/shrink.py [--runs 300] [--ratio 0.5] [--student mlp:[64]] [--json benchmarks/results/shrink.json]

One compile of the quickstart digits CNN (examples/quickstart) for the cpu-amd64 class with
``optimization.pruning`` and ``optimization.distillation`` set. Per candidate: size, size ratio (fp32 bytes /
candidate bytes), p50 at 1 thread and its speed-up (fp32 p50 / candidate p50: > 1 means faster), top-1
accuracy on the held-out evaluation data, its delta vs the source and the top-1 agreement with the source
(the teacher). Every number comes from this run; the compiler's own measurement (ONNX Runtime through
edgefleet_runtime.backends) is the one reported. Needs the ``train`` extra (PyTorch CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from edgefleet.api.models import AccuracyBudget, Distillation, Pruning
from edgefleet.compiler import CompileRequest, Policy, compile_model, load_profiles

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart"
ROWS = [("fp32", "fp32"), ("int8", "static-int8"), ("pruned", "pruned"), ("pruned+int8", "pruned+int8"),
        ("student", "student"), ("student+int8", "student+int8")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300, help="timed runs per latency figure")
    ap.add_argument("--ratio", type=float, default=0.5, help="pruning ratio")
    ap.add_argument("--epochs", type=int, default=10, help="pruning fine-tune epochs")
    ap.add_argument("--student", default="mlp:[64]")
    ap.add_argument("--student-epochs", type=int, default=60)
    ap.add_argument("--max-accuracy-drop", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/shrink.json"))
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    policy = Policy(calibration=QUICKSTART / "digits_calib.npz", evaluation=QUICKSTART / "digits_eval.npz",
                    timingRuns=args.runs, accuracyBudget=AccuracyBudget(max_accuracy_drop=args.max_accuracy_drop),
                    pruning=Pruning(ratio=args.ratio, epochs=args.epochs),
                    distillation=Distillation(student=args.student, epochs=args.student_epochs))
    req = CompileRequest(str(QUICKSTART / "digits_cnn.onnx"), {"cpu-amd64": load_profiles()["cpu-amd64"]}, policy)
    with tempfile.TemporaryDirectory() as cache:
        v = compile_model(req, None, cache).variants["cpu-amd64"]
    by = {c.name: c for c in v.candidates}
    base = by["fp32"]
    head = (f"{'candidate':<13} {'bytes':>8} {'smaller':>8} {'p50 ms':>8} {'speed-up':>9} {'top-1':>7} "
            f"{'delta':>7} {'agree':>6}  state")
    print(f"quickstart digits CNN, cpu-amd64 (onnxruntime CPU, 1 thread, {args.runs} runs), pruning ratio "
          f"{args.ratio}, student {args.student}, budget {args.max_accuracy_drop} points")
    print(head)
    print("-" * len(head))
    rows = []
    for label, name in ROWS:
        c = by.get(name)
        if c is None or c.sizeBytes is None:
            print(f"{label:<13} {'-':>8}  {c.reason if c else 'not built'}")
            continue
        m, p50 = c.metrics, c.latency.p50Ms1
        row = {"candidate": label, "name": name, "sizeBytes": c.sizeBytes, "sizeRatio": base.sizeBytes / c.sizeBytes,
               "p50Ms": p50, "speedup": base.latency.p50Ms1 / p50 if p50 else None, "accuracy": m.accuracy,
               "accuracyDelta": m.accuracyDelta, "agreement": m.agreement, "state": c.state,
               "withinBudget": c.withinBudget}
        rows.append(row)
        print(f"{label:<13} {c.sizeBytes:>8} {row['sizeRatio']:>7.2f}x {p50:>8.4f} {row['speedup']:>8.2f}x "
              f"{m.accuracy:>7.4f} {m.accuracyDelta:>+7.2f} {m.agreement:>6.3f}  {c.state}"
              + ("" if c.withinBudget else " (outside budget)"))
    print(f"chosen: {v.chosen}")
    for kind, t in sorted((v.training or {}).items()):
        print(f"{kind}: {t.get('detail')}, {t.get('epochs')} epochs on {t.get('transferSamples')} transfer samples "
              f"in {t.get('seconds')} s, last loss {t.get('loss')}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "chosen": v.chosen, "training": v.training}, indent=2))


if __name__ == "__main__":
    main()
