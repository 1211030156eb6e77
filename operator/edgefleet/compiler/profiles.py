"""HardwareProfile targets from YAML: the built-in set or a user file (checked by the API's Target)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..api import format_errors
from .types import CompileError, CompileTarget

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "profiles"

def _docs(path: Path):
    with open(path) as f:
        yield from (d for d in yaml.safe_load_all(f) if d)


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, CompileTarget]:
    """Profile name -> its target and size budget from ``path`` (a YAML file or directory of them; multi-document and
    ``kind: List`` allowed) or, when None, from the built-in ``edgefleet/profiles/*.yaml``."""
    if path is None:
        files = sorted(BUILTIN_DIR.glob("*.yaml")) if BUILTIN_DIR.is_dir() else []
        if not files:
            raise CompileError("InvalidRequest", f"no built-in HardwareProfiles in {BUILTIN_DIR} (a broken install)",
                               "reinstall edgefleet, or pass --profiles-file with your HardwareProfile YAML")
    else:
        p = Path(path)
        if not p.exists():
            raise CompileError("InvalidRequest", f"profiles file {p} does not exist", "check --profiles-file")
        files = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else [p]
    out: dict[str, CompileTarget] = {}
    for f in files:
        try:
            docs = list(_docs(f))
        except yaml.YAMLError as e:
            raise CompileError("InvalidRequest", f"{f} is not valid YAML ({e})", "fix the YAML syntax") from e
        for doc in docs:
            items = doc.get("items", []) if doc.get("kind") == "List" else [doc]
            for item in items:
                if not isinstance(item, dict) or item.get("kind", "HardwareProfile") != "HardwareProfile":
                    continue
                name = (item.get("metadata") or {}).get("name")
                spec = item.get("spec") or {}
                if not name or not isinstance(spec.get("target"), dict):
                    raise CompileError("InvalidRequest", f"{f}: a HardwareProfile without metadata.name or "
                                       "spec.target", "give every profile a name and a spec.target")
                try:
                    out[name] = CompileTarget.of_profile(spec)
                except ValidationError as e:
                    raise CompileError("InvalidRequest", f"{f}: HardwareProfile {name}: "
                                       + "; ".join(f"spec.target.{m}" for m in format_errors(e)),
                                       "fix the profile as the message says") from e
    return out
