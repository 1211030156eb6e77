"""Golden files of rendered manifests (tests/data/render/): a render test compares its YAML with the file;
`EDGEFLEET_UPDATE_GOLDEN=1 python -m pytest tests/unit -k golden` regenerates them all (review the diff)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "render"


def assert_golden(name: str, manifest: dict | list) -> None:
    path = GOLDEN_DIR / f"{name}.yaml"
    text = yaml.safe_dump(manifest, sort_keys=True)
    if os.environ.get("EDGEFLEET_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden {path}: run with EDGEFLEET_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path.name} differs: rerun with EDGEFLEET_UPDATE_GOLDEN=1 and review the diff"
