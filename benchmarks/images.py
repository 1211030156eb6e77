"""Image build benchmark: cold (empty layer and image caches) vs warm (everything cached) `edgefleet images build`,
and the size of every image, compressed (what an edge link carries) and unpacked (what the node stores).

    python benchmarks/images.py [--only NAME ...] [--json PATH]

Cold builds into a temporary EDGEFLEET_IMAGES_DIR: Debian packages are unpacked, wheels installed, layers tarred
and compressed, crane assembles and pushes. Downloads (apt state, .debs, wheels) are shared with the normal cache,
so the network is not what is measured. Warm repeats the build on that same cache. The warm/cold ratio is the
result; the sizes are checked against the issue's goals (runtime-cpu <= 150 MB, runtime-openvino <= 250 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from edgefleet_dev.images import build
from edgefleet_dev.images.spec import IMAGES

RESULTS = Path(__file__).resolve().parent / "results"
GOALS_MB = {"runtime-cpu": 150, "runtime-openvino": 250}


def timed_build(names: list[str]) -> tuple[float, list[build.Built]]:
    start = time.monotonic()
    built = build.build(names, None, echo=lambda msg: print(msg, file=sys.stderr))
    return time.monotonic() - start, built


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="image name (repeatable); default: the default images")
    parser.add_argument("--json", default=str(RESULTS / "images.json"))
    args = parser.parse_args()
    names = args.only or [n for n, s in IMAGES.items() if s.default]
    with tempfile.TemporaryDirectory(prefix="images-bench-") as tmp:
        os.environ["EDGEFLEET_IMAGES_DIR"] = tmp
        os.environ.setdefault("EDGEFLEET_IMAGE_REVISION", build.revision())
        cold, built = timed_build(names)
        warm, again = timed_build(names)
    same = all(a.digest == b.digest for a, b in zip(built, again, strict=True))
    print(f"\n{'image':18} {'compressed MB':>14} {'unpacked MB':>12} {'platforms':22} goal")
    for b in built:
        goal = GOALS_MB.get(b.name)
        verdict = "" if goal is None else ("ok" if b.compressed_bytes <= goal * 1e6 else "OVER") + f" (<= {goal})"
        print(f"{b.name:18} {b.compressed_bytes / 1e6:14.1f} {b.unpacked_bytes / 1e6:12.1f} "
              f"{','.join(b.platforms):22} {verdict}")
    print(f"\ncold build {cold:.0f} s, warm build {warm:.1f} s (warm/cold {warm / cold:.3f}); "
          f"warm digests identical to cold: {same}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "coldSeconds": round(cold, 1), "warmSeconds": round(warm, 2), "sameDigests": same,
        "images": [b.as_dict() for b in built]}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
