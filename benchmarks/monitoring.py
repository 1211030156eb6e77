"""Cost of the runtime's fleet monitoring on the serve path, in process, against monitoring off in the same run.

One App per configuration (the same model, tests/fixtures/models/digits_cnn.onnx, batch 1, 1 intra-op
thread), each answering the same JSON infer request through ``App.__call__`` (decode + run + monitor +
encode; no sockets, so the numbers are the monitoring's own cost, not the HTTP server's noise):

* off          no monitor (the default)
* metrics      --monitoring: confidence histogram, class counts, low-confidence count
* drift        + --drift-reference (bench report of the quickstart evaluation data), window 1000
* drift+spool  + --hard-examples-dir with --uncertain-below 1 (every prediction is unsure) sampled at 1%:
               the worst case for the writer thread

Rounds are interleaved; the table shows the median per configuration of CPU microseconds per request
(process CPU: the writer thread's work counts too) and wall p50/p95 per request, and the overhead
against ``off`` of the same round.

    python benchmarks/monitoring.py [--seconds 3] [--rounds 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from runtime import drive  # benchmarks/runtime.py: the same timing loop

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "tests" / "fixtures" / "models" / "digits_cnn.onnx"
EVAL = REPO / "examples" / "quickstart" / "digits_eval.npz"
CONFIGS = ("off", "metrics", "drift", "drift+spool")


def make_apps(work: Path) -> dict:
    from edgefleet_runtime.app import App, Metrics, ModelSlot
    from edgefleet_runtime.bench import Options, bench
    from edgefleet_runtime.digest import file_digest
    from edgefleet_runtime.monitor import HardExamples, Monitor

    reference = bench(str(MODEL), str(EVAL), opts=Options(threads_n=1, runs=5))["results"][0]["distribution"]
    apps = {}
    for name in CONFIGS:
        metrics = Metrics()
        slot = ModelSlot("digits", metrics, threads=1)
        slot.load(str(MODEL), file_digest(MODEL))
        monitor = None
        if name != "off":
            spool = HardExamples(str(work / "spool"), sample_rate=0.01) if name == "drift+spool" else None
            monitor = Monitor(uncertain_below=1.0 if spool else 0.5,
                              reference=reference if name.startswith("drift") else None, hard_examples=spool)
            metrics.registry.register(monitor)
        apps[name] = App(slot, metrics, monitor=monitor)
    return apps


def measure(app, body: bytes, seconds: float) -> dict:
    """benchmarks/runtime.py's drive() with one caller, App.__call__ in place of a socket; CPU is this process's."""
    def call():
        status, _, _ = app("POST", "/v2/models/digits/infer", {}, body)
        if status != 200:
            raise RuntimeError(f"infer answered {status}")

    res = drive(lambda: call, concurrency=1, seconds=seconds, cpu=time.process_time)
    assert res["errors"] == 0, res
    return {"cpu_us_per_request": res["server_cpu_us_per_request"], "p50_ms": res["p50_ms"],
            "p95_ms": res["p95_ms"], "requests": res["requests"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per configuration per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "monitoring.json")
    args = ap.parse_args()
    x = np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                     "data": x.ravel().tolist()}]})
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-monitoring-") as tmp:
        apps = make_apps(Path(tmp))
        rounds = []
        for i in range(args.rounds):
            print(f"round {i + 1} of {args.rounds} ...", file=sys.stderr, flush=True)
            rounds.append({name: measure(app, body, args.seconds) for name, app in apps.items()})
        apps["drift+spool"].monitor.hard_examples.flush()  # the writer thread finishes before the folder goes
        spooled = len(list((Path(tmp) / "spool").glob("*.npz")))
    median = {name: {k: statistics.median(r[name][k] for r in rounds) for k in rounds[0][name]} for name in CONFIGS}
    over = {name: statistics.median(r[name]["cpu_us_per_request"] - r["off"]["cpu_us_per_request"] for r in rounds)
            for name in CONFIGS}
    p50_over = {name: statistics.median(r[name]["p50_ms"] - r["off"]["p50_ms"] for r in rounds) for name in CONFIGS}
    print(f"\nmodel {MODEL.relative_to(REPO)}, batch 1, JSON, {args.seconds:g} s x {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, {platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'config':<14}{'cpu us/req':>11}{'+cpu us':>9}{'p50 ms':>9}{'+p50 ms':>9}{'p95 ms':>9}")
    for name in CONFIGS:
        m = median[name]
        print(f"{name:<14}{m['cpu_us_per_request']:>11.1f}{over[name]:>+9.1f}{m['p50_ms']:>9.4f}"
              f"{p50_over[name]:>+9.4f}{m['p95_ms']:>9.3f}")
    print(f"hard examples written by drift+spool: {spooled}")
    out = {"model": str(MODEL), "seconds": args.seconds, "rounds": rounds, "median": median,
           "cpu_overhead_us": over, "p50_overhead_ms": p50_over, "spooled": spooled,
           "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
