"""Compile benchmark: every candidate vs the fp32 baseline measured in the same run.

    python benchmarks/compile.py [--runs 100] [--json benchmarks/compile-results.json] [--models ppocr_det_v4,...]

Per model and candidate: size ratio (baseline bytes / candidate bytes), latency ratio (baseline p50 /
candidate p50 at 1 thread: > 1 means faster), accuracy delta vs the source in top-1 points (or cosine
when there are no labels), and which candidate ``auto`` chose. The baseline is the fp32 graph-optimized
ONNX (for .tflite: the source file). Nothing is hard-coded: all numbers come from this run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from edgefleet.compiler import AccuracyBudget, CompileRequest, CompileTarget, Policy, compile_model

M = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
CPU_INT8 = CompileTarget(format="onnx", precision="int8", runtime="onnxruntime", execution_provider="cpu")
OPENVINO = CompileTarget(format="openvino", precision="int8", runtime="openvino")
LITERT = CompileTarget(format="tflite", precision="int8", runtime="litert")
# ONNX -> .tflite needs edgefleet[tflite-convert]
CORAL = CompileTarget(format="tflite", precision="int8", runtime="litert", delegate="libedgetpu.so.1")

CASES = [
    ("digits_cnn", "digits_cnn.onnx", "digits_eval.npz", "digits_calib.npz", AccuracyBudget(max_accuracy_drop=1.0),
     {"cpu-int8": CPU_INT8, "openvino-int8": OPENVINO, "litert-int8": LITERT, "coral-edgetpu": CORAL}),
    ("tiny_encoder", "tiny_encoder.onnx", "encoder_eval.npz", "encoder_calib.npz", AccuracyBudget(min_cosine=0.99),
     {"cpu-int8": CPU_INT8, "openvino-int8": OPENVINO}),
    # PP-OCRv4 text detector (real weights, paddle2onnx export): a probability map, gated on cosine vs fp32
    ("ppocr_det_v4", "ppocr_det_v4.onnx", "ppocr_eval.npz", "ppocr_calib.npz", AccuracyBudget(min_cosine=0.99),
     {"cpu-int8": CPU_INT8, "openvino-int8": OPENVINO}),
    ("palm_detection_lite", "palm_detection_lite.tflite", "palm_eval.npz", None, AccuracyBudget(min_cosine=0.99),
     {"litert-int8": LITERT}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100, help="timed runs per latency figure")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/compile-results.json"))
    ap.add_argument("--models", default="", help="comma-separated model names to run (default: all)")
    args = ap.parse_args()
    only = {m for m in args.models.split(",") if m}
    logging.getLogger().setLevel(logging.ERROR)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as cache:
        for model, src, ev, cal, budget, targets in CASES:
            if only and model not in only:
                continue
            policy = Policy(evaluation=M / ev, calibration=(M / cal) if cal else None, accuracyBudget=budget,
                            timingRuns=args.runs)
            res = compile_model(CompileRequest(str(M / src), targets, policy), None, Path(cache) / model)
            results[model] = res.to_dict()
            for prof, v in res.variants.items():
                if not v.candidates:
                    rows.append([model, prof, "-", "-", "-", "-", "-", "Failed", f"{v.reason}: {v.message}"[:140]])
                    continue
                base = next((c for c in v.candidates if c.name in ("fp32", "source", "openvino-fp32")
                             and c.sizeBytes), None)
                ort_fp32 = next((c for c in results[model]["variants"].get("cpu-int8", {}).get("candidates", [])
                                 if c["name"] == "fp32"), None)
                for c in v.candidates:
                    if not c.sizeBytes:
                        rows.append([model, prof, c.name, "-", "-", "-", "-", c.state, f"{c.reason}: {c.why}"[:140]])
                        continue
                    ref_size = ort_fp32["sizeBytes"] if ort_fp32 else base.sizeBytes
                    ref_lat = ort_fp32["latency"]["p50Ms1"] if ort_fp32 else base.latency.p50Ms1
                    m = c.metrics
                    quality = (f"{m.accuracyDelta:+.2f} pt" if m.accuracyDelta is not None else f"cos {m.cosine:.4f}")
                    rows.append([model, prof, c.name, f"{ref_size / c.sizeBytes:.2f}x",
                                 f"{ref_lat / c.latency.p50Ms1:.2f}x", f"{c.latency.p50Ms1:.3f}", quality,
                                 c.state, (c.why or "")[:140]])
    head = ["model", "profile", "candidate", "size ratio", "speedup p50@1", "p50 ms", "accuracy vs src", "auto",
            "why"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print("baseline per model: ONNX Runtime fp32 (graph-optimized); .tflite: the source in LiteRT")
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": args.runs, "results": results, "rows": rows}, indent=2, default=str))
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
