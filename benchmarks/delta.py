"""Delta downloads: bytes a node fetches for a federated head update, per method, against the full variant.

    python benchmarks/delta.py [--json benchmarks/results/delta.json] [--epochs 3] [--runs 3]

Updates measured:

- ``digits head``: the quickstart's digits CNN (examples/quickstart/digits_cnn.onnx, 453 KB) with its last
  layer fine-tuned by the project's federated trainer (tests/runtime/models.head_update: 3 epochs of SGD on
  200 samples of digits_eval.npz); every other byte unchanged. The head is 18 % of this model's bytes.
- ``encoder head``: tests/fixtures/models/tiny_encoder.onnx (3.9 MB) with its last 2-D weight moved as one SGD
  step would (gaussian steps of 1e-3 of its scale, seeded): how the methods scale with a larger body.

Methods: ``full`` (the baseline: the variant itself), ``zstd full`` (the variant compressed, no base),
``zstd patch-from`` (the base as a raw-content dictionary, long window, level 19), ``bsdiff`` (bsdiff4),
``chunks 4K`` / ``chunks 64K`` (content-addressed fixed-size chunks: the chunks the base lacks). Time: median
of --runs to make the delta (publisher) and to apply it (node). Each delta is applied and compared byte for
byte with the target before it is counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "runtime"))

import models  # noqa: E402  the tests' head update
from edgefleet_runtime import delta  # noqa: E402


def encoder_head_update() -> tuple[bytes, bytes]:
    import onnx
    from onnx import numpy_helper

    base = (REPO / "tests" / "fixtures" / "models" / "tiny_encoder.onnx").read_bytes()
    model = onnx.load_from_string(base)
    last = [t for t in model.graph.initializer if len(t.dims) == 2][-1]
    w = numpy_helper.to_array(last)
    step = np.random.default_rng(0).normal(0, 1e-3 * float(np.abs(w).mean() or 1), w.shape).astype(w.dtype)
    last.CopyFrom(numpy_helper.from_array(w + step, last.name))
    return base, model.SerializeToString()


def median_seconds(fn, runs: int):
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def chunked(base: bytes, target: bytes, size: int) -> int:
    have = {hashlib.sha256(base[i:i + size]).digest() for i in range(0, len(base), size)}
    missing = [target[i:i + size] for i in range(0, len(target), size)
               if hashlib.sha256(target[i:i + size]).digest() not in have]
    return sum(len(c) for c in missing) + 32 * ((len(target) + size - 1) // size)  # chunks + the chunk list


def measure(name: str, base: bytes, target: bytes, runs: int) -> list[dict]:
    import zstandard

    full = len(target)
    rows = [{"update": name, "method": "full", "bytes": full}]
    t, packed = median_seconds(lambda: zstandard.ZstdCompressor(level=19).compress(target), runs)
    rows.append({"update": name, "method": "zstd full", "bytes": len(packed), "make_s": t})
    for method in ("zstd", "bsdiff"):
        make_s, d = median_seconds(lambda m=method: delta.make(base, target, m), runs)
        apply_s, out = median_seconds(lambda d=d: delta.apply(base, d, full), runs)
        assert out == target, f"{method} delta does not give the target"
        rows.append({"update": name, "method": "zstd patch-from" if method == "zstd" else method,
                     "bytes": len(d), "make_s": make_s, "apply_s": apply_s})
    for size in (4096, 65536):
        t, n = median_seconds(lambda s=size: chunked(base, target, s), runs)
        rows.append({"update": name, "method": f"chunks {size // 1024}K", "bytes": n, "make_s": t})
    for r in rows:
        r["ratio"] = r["bytes"] / full
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "delta.json"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    missing = {"zstd", "bsdiff"} - set(delta.available())
    if missing:
        sys.exit(f"install the delta extra (zstandard, bsdiff4): {sorted(missing)} missing")
    with tempfile.TemporaryDirectory() as tmp:
        base_path, updated_path = models.head_update(Path(tmp), epochs=args.epochs)
        updates = {"digits head": (base_path.read_bytes(), updated_path.read_bytes()),
                   "encoder head": encoder_head_update()}
    rows = [r for name, (b, t) in updates.items() for r in measure(name, b, t, args.runs)]
    print(f"{'update':<13} {'method':<16} {'bytes':>10} {'vs full':>8} {'make s':>8} {'apply s':>8}")
    for r in rows:
        make = f"{r['make_s']:.3f}" if "make_s" in r else "-"
        apply_ = f"{r['apply_s']:.3f}" if "apply_s" in r else "-"
        print(f"{r['update']:<13} {r['method']:<16} {r['bytes']:>10} {r['ratio']:>8.3f} {make:>8} {apply_:>8}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
