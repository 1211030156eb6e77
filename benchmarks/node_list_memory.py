"""Operator memory for reading the fleet at start-up: full Node objects vs metadata-only pages.

    python benchmarks/node_list_memory.py --name bench-fleet [--json PATH]

Against a running devcluster (e.g. one `benchmarks/fleet.py --keep` left, or while it runs): each way of
reading every node's labels runs in a fresh Python process that first imports the operator (as the operator
does), so the table shows the peak RSS (VmHWM) the read itself adds. Baseline: `Kube.list("Node")` (what
start-up did before); new: `Kube.list_labels("Node")` (PartialObjectMetadata, 500 per page).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edgefleet_dev.devcluster import cluster as dc

CHILD = """
import json, sys, time
from pathlib import Path
import edgefleet.handlers  # noqa: F401 - the operator's imports, as it runs
from edgefleet.kube import Kube

def hwm():
    text = Path("/proc/self/status").read_text()
    return next(int(l.split()[1]) for l in text.splitlines() if l.startswith("VmHWM")) / 1024

kube = Kube.connect(kubeconfig=sys.argv[2])
before = hwm()
t = time.monotonic()
if sys.argv[1] == "full":
    nodes = {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in kube.list("Node")}
else:
    nodes = kube.list_labels("Node")
print(json.dumps({"nodes": len(nodes), "seconds": time.monotonic() - t, "hwm_before_mb": before,
                  "hwm_after_mb": hwm()}))
"""


def measure(way: str, kubeconfig: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, way, str(kubeconfig)], capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="bench-fleet")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    kubeconfig = dc.Cluster(dc.state_dir(args.name)).kubeconfig
    rows = {way: measure(way, kubeconfig) for way in ("full", "metadata")}
    print(f"{'read':<34}{'nodes':>8}{'seconds':>10}{'VmHWM before MB':>18}{'VmHWM after MB':>17}{'added MB':>10}")
    for way, label in (("full", "Kube.list('Node') (baseline)"), ("metadata", "Kube.list_labels('Node')")):
        r = rows[way]
        print(f"{label:<34}{r['nodes']:>8}{r['seconds']:>10.1f}{r['hwm_before_mb']:>18.0f}{r['hwm_after_mb']:>17.0f}"
              f"{r['hwm_after_mb'] - r['hwm_before_mb']:>10.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
