"""Dev cluster benchmark: cold build per component, warm `up` to all nodes Ready, control-plane RSS.

    python benchmarks/devcluster.py [--scale-large 125] [--repeat 1] [--cold] [--real-node] [--json PATH]

1. Cold build minutes per component. By default nothing is rebuilt: ``components.build_all`` ends each
   build log (``logs/build-<name>-<ver>.log``) with the seconds that build took, and those are read
   back. ``--cold`` instead rebuilds everything into a temporary EDGEFLEET_CACHE with an empty GOCACHE
   (the module cache is kept: downloads are not what we measure) - slow: tens of minutes on 2 cores.
2. Warm ``up`` (binaries cached) until every node is Ready, for: no nodes (``--scale 0``, the
   baseline: the bare control plane), the default fleet, and ``--scale-large`` nodes per class (default 125 x 8
   classes = 1,000 nodes). Ratios are against the baseline measured in the same run.
   With ``--real-node``, also the default fleet plus this machine as a real node (`up --real-node`): the
   whole `up`, and the real node's part (containerd start to node Ready, as `up` reports it; goal 30 s).
3. RSS of the control plane: the sum of VmRSS of the processes in the cluster's pid files, read
   from /proc after the fleet has been Ready for ``--settle`` seconds (and VmHWM, the peak).

Clusters are named ``bench-*`` and always torn down (also on Ctrl-C or failure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgefleet_dev import stack
from edgefleet_dev import toolchain as components
from edgefleet_dev.devcluster import cluster as dc
from edgefleet_dev.devcluster import node
from edgefleet_dev.devcluster.fleet import load_fleet

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_DEFAULT_S = 20.0
GOAL_LARGE_S = 90.0
GOAL_REAL_NODE_S = 30.0
REAL_LABEL = "default fleet + real node"


# ---------------------------------------------------------------- cold build


def build_times_from_cache() -> list[dict]:
    """Per component: the seconds its cached binary took to build, as `build_all` wrote at the end of its
    build log. Components share one Go build cache, so these are marginal times in build order."""
    cache = components.cache_dir()
    rows = []
    for comp in components.COMPONENTS.values():
        log = cache / "logs" / f"build-{comp.name}-{comp.version}.log"
        found = re.findall(r"^built in ([0-9.]+)s$", log.read_text(), re.M) if log.exists() else []
        rows.append({"component": comp.name, "version": comp.version,
                     "seconds": float(found[-1]) if found else None,
                     "how": "its build log" if found else "no timing recorded (built before logs kept it)",
                     "log": str(log) if log.exists() else None})
    return rows


def build_times_cold() -> list[dict]:
    """Rebuild every component into a temporary cache with an empty Go build cache."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-cold-") as tmp:
        saved = {k: os.environ.get(k) for k in ("EDGEFLEET_CACHE", "GOCACHE")}
        os.environ["EDGEFLEET_CACHE"] = str(Path(tmp) / "cache")
        os.environ["GOCACHE"] = str(Path(tmp) / "gocache")
        try:
            timings = components.build_all(echo=lambda m: print(m, file=sys.stderr))
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return [{"component": n, "version": components.COMPONENTS[n].version, "seconds": s,
             "how": "--cold: rebuilt now, empty GOCACHE"} for n, s in timings.items()]


# ---------------------------------------------------------------- warm up


def _rss(state: Path) -> dict[str, dict[str, int]]:
    """kB of VmRSS and VmHWM per component process, from /proc/<pid>/status."""
    out = {}
    for name in dc.PROCESSES + node.PROCESSES:  # the real node's, when it runs
        try:
            pid = int((state / "pids" / f"{name}.pid").read_text().split()[0])
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        out[name] = {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return out


def timed_up(name: str, scale: int | None, settle: float, measure_rss: bool, real_node: bool = False) -> dict:
    dc.down(name, echo=lambda _m: None)  # leftovers of an interrupted run
    marks: list[tuple[float, str]] = []
    start = time.monotonic()

    def echo(msg: str) -> None:
        marks.append((time.monotonic() - start, msg))

    try:
        cluster = stack.up(name, scale=scale, echo=echo, timeout=600, real_node=real_node)
        total = time.monotonic() - start
        ready, nodes = cluster.nodes_ready()
        result = {"scale": scale, "nodes": nodes, "ready": ready, "up_seconds": total}
        if real_node:  # from containerd's start to the node Ready, as `up` reports it
            result["real_node_seconds"] = next(float(m) for _, msg in marks
                                               if (m := _real_node_ready(msg)) is not None)
        t_fleet = next((t for t, m in marks if m.startswith("creating ")), None)
        if t_fleet is not None:
            result["control_plane_seconds"] = t_fleet
            result["fleet_seconds"] = total - t_fleet
        if measure_rss:
            time.sleep(settle)
            rss = _rss(cluster.state)
            result["rss_kb"] = rss
            result["rss_total_mb"] = sum(v["VmRSS"] for v in rss.values()) / 1024
            result["hwm_total_mb"] = sum(v["VmHWM"] for v in rss.values()) / 1024
            result["rss_after_settle_seconds"] = settle
        return result
    finally:
        dc.down(name, echo=lambda _m: None)


def _real_node_ready(msg: str) -> str | None:
    found = re.match(r"real node \S+ Ready in ([0-9.]+)s", msg)
    return found.group(1) if found else None


# ---------------------------------------------------------------- report


def _table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [head, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) for r in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true", help="rebuild everything into a temp cache (slow)")
    ap.add_argument("--scale-large", type=int, default=None,
                    help="nodes per class for the large fleet (default: 1,000 nodes in all)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size (median reported)")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after Ready before reading RSS")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--real-node", action="store_true",
                    help="also time the default fleet plus this machine as a real node (needs root, runc, iptables)")
    ap.add_argument("--json", type=Path, default=RESULTS / "devcluster.json")
    args = ap.parse_args()

    builds = build_times_cold() if args.cold else build_times_from_cache()
    missing = components.missing()
    if missing:
        sys.exit(f"not every component is built ({', '.join(c.name for c in missing)}): run `edgefleet cluster "
                 "build` first; warm `up` timings need cached binaries")

    classes = len(load_fleet().classes)
    if args.scale_large is None:
        args.scale_large = round(1000 / classes)
    sizes = [("baseline: no nodes", 0, False), ("default fleet", None, True)]
    if not args.skip_large:
        sizes.append((f"{args.scale_large} per class", args.scale_large, True))
    if args.real_node and (reason := node.cannot_run()):
        sys.exit(f"--real-node: {reason}")
    runs: dict[str, list[dict]] = {}
    for label, scale, rss in sizes + ([(REAL_LABEL, None, True)] if args.real_node else []):
        for i in range(args.repeat):
            print(f"[up] {label} run {i + 1}/{args.repeat} ...", file=sys.stderr)
            real = label == REAL_LABEL
            runs.setdefault(label, []).append(timed_up(
                f"bench-dc-{'real' if real else scale if scale is not None else 'default'}", scale, args.settle,
                rss, real_node=real))

    def med(label: str, key: str) -> float | None:
        values = [r[key] for r in runs[label] if r.get(key) is not None]
        return statistics.median(values) if values else None

    base = med("baseline: no nodes", "up_seconds")
    build_rows = [[b["component"], b["version"], f"{b['seconds'] / 60:.1f}" if b["seconds"] is not None else "-",
                   b["how"]] for b in builds]
    known = [b["seconds"] for b in builds if b["seconds"] is not None]
    build_rows.append(["total", "", f"{sum(known) / 60:.1f}", f"{len(known)}/{len(builds)} components known"])
    up_rows = []
    for label, scale, _ in sizes:
        r = runs[label][-1]
        secs = med(label, "up_seconds")
        goal = {None: GOAL_DEFAULT_S, args.scale_large: GOAL_LARGE_S}.get(scale)
        verdict = "-" if goal is None or scale == 0 else (
            f"<= {goal:.0f}s ok" if secs <= goal else f"MISSED by {secs - goal:.1f}s")
        up_rows.append([label, r["nodes"], f"{secs:.1f}", f"{med(label, 'control_plane_seconds') or 0:.1f}",
                        f"{med(label, 'fleet_seconds') or 0:.1f}", f"{secs / base:.2f}x",
                        f"{r['rss_total_mb']:.0f}" if "rss_total_mb" in r else "-",
                        f"{r['hwm_total_mb']:.0f}" if "hwm_total_mb" in r else "-", verdict])
    print(f"load at end: {os.getloadavg()}, pytest running: {_pytest_running()}")
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cpus; fleet classes: {classes}; "
          f"repeat: {args.repeat} (median)\n")
    print("cold build (minutes)")
    print(_table(["component", "version", "min", "how"], build_rows))
    print("\nwarm `up` to all nodes Ready (baseline = bare control plane, same run)")
    print(_table(["fleet", "nodes", "up s", "ctl-plane s", "fleet s", "vs baseline", "RSS MB", "peak MB", "goal"],
                 up_rows))
    if REAL_LABEL in runs:
        secs, real_secs = med(REAL_LABEL, "up_seconds"), med(REAL_LABEL, "real_node_seconds")
        verdict = f"<= {GOAL_REAL_NODE_S:.0f}s ok" if real_secs <= GOAL_REAL_NODE_S else (
            f"MISSED by {real_secs - GOAL_REAL_NODE_S:.1f}s")
        print("\nwarm `up --real-node` (default fleet + this machine; baseline = bare control plane, same run)")
        print(_table(["fleet", "up s", "real node s", "vs baseline", "vs default fleet", "goal (real node)"],
                     [[REAL_LABEL, f"{secs:.1f}", f"{real_secs:.1f}", f"{secs / base:.2f}x",
                       f"{secs / med('default fleet', 'up_seconds'):.2f}x", verdict]]))
        rss = runs[REAL_LABEL][-1]["rss_kb"]
        print(f"\nreal node RSS, {args.settle:.0f}s after Ready, no pods (MB, VmRSS / VmHWM)")
        print(_table(["process", "RSS MB", "peak MB"], [[k, f"{rss[k]['VmRSS'] / 1024:.0f}",
                                                         f"{rss[k]['VmHWM'] / 1024:.0f}"]
                                                        for k in node.PROCESSES if k in rss]))
    large = runs.get(sizes[-1][0], [{}])[-1]
    if "rss_kb" in large:
        print(f"\ncontrol-plane RSS at {large['nodes']} nodes, {args.settle:.0f}s after Ready (MB, VmRSS / VmHWM)")
        print(_table(["process", "RSS MB", "peak MB"],
                     [[k, f"{v['VmRSS'] / 1024:.0f}", f"{v['VmHWM'] / 1024:.0f}"] for k, v in large["rss_kb"].items()]
                     + [["total", f"{large['rss_total_mb']:.0f}", f"{large['hwm_total_mb']:.0f}"]]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": {"host": platform.node(), "cpus": os.cpu_count()},
        "cold_build": {"mode": "rebuilt" if args.cold else "inferred from cache", "components": builds},
        "warm_up": runs, "baseline_up_seconds": base,
        "goals": {"default_fleet_s": GOAL_DEFAULT_S, "large_fleet_s": GOAL_LARGE_S,
                  "real_node_s": GOAL_REAL_NODE_S},
        "load_during_run": {"pytest_running_at_end": _pytest_running(), "loadavg_at_end": os.getloadavg()},
    }, indent=2))
    print(f"\nwrote {args.json}", file=sys.stderr)


def _pytest_running() -> bool:
    with contextlib.suppress(OSError):
        return subprocess.run(["pgrep", "-f", "pytest"], capture_output=True).returncode == 0
    return False


if __name__ == "__main__":
    main()
