"""Python dependencies of an image: resolved once per architecture into a lock of wheels pinned by sha256
(pip's resolver, `--report`), then installed from that lock with `--require-hashes` into the image's
site directory. Wheels only: no compiler toolchain ever runs for an image."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from .spec import ImageSpec, source_root

GLIBC_MINOR = 36  # Debian 12
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}


class WheelError(RuntimeError):
    """A wheel could not be resolved or installed; the message names the package."""


def requirements(spec: ImageSpec) -> list[str]:
    """The dependencies the image's Dockerfile would install: the project's plus the named extras."""
    path = source_root() / ("runtime-image/pyproject.toml" if spec.project == "runtime" else "pyproject.toml")
    project = tomllib.loads(path.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    unknown = [e for e in spec.extras if e not in extras]
    if unknown:
        raise WheelError(f"image {spec.name}: {path.name} has no extra {unknown}")
    reqs = list(project["dependencies"])
    for extra in spec.extras:
        reqs += [r for r in extras[extra] if not r.startswith(project["name"])]
    return reqs


def platform_args(arch: str) -> list[str]:
    machine = MACHINE[arch]
    tags = [f"manylinux_2_{v}_{machine}" for v in range(17, GLIBC_MINOR + 1)] + [f"manylinux2014_{machine}"]
    args = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    for abi in ("cp311", "abi3", "none"):
        args += ["--abi", abi]
    for tag in tags + [f"linux_{machine}"]:
        args += ["--platform", tag]
    return args


def lock(spec: ImageSpec, arch: str) -> str:
    """`name==version --hash=sha256:...` lines for every wheel the image needs on `arch`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(Path(tmp) / "t"), *platform_args(arch), *requirements(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise WheelError(f"image {spec.name} ({arch}): pip cannot resolve wheels: {_pip_error(proc.stderr)}")
        installs = json.loads(report.read_text())["install"]
    lines = []
    for item in sorted(installs, key=lambda i: i["metadata"]["name"].lower()):
        digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{item['metadata']['name']}=={item['metadata']['version']} --hash=sha256:{digest}")
    return "\n".join(lines) + "\n"


def install(lock_file: Path, arch: str, target: Path, cache: Path) -> None:
    """Install the locked wheels into target (no scripts, no byte code: both are added reproducibly later)."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes", "--no-compile",
           "--disable-pip-version-check", "--cache-dir", str(cache), "--target", str(target),
           *platform_args(arch), "-r", str(lock_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WheelError(f"installing wheels from {lock_file.name} ({arch}) failed: {_pip_error(proc.stderr)}")
    for scripts in (target / "bin",):  # console scripts carry the build host's interpreter path
        if scripts.exists():
            subprocess.run(["rm", "-rf", str(scripts)], check=True)


def _pip_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("ERROR") or "No matching distribution" in ln]
    text = " ".join(lines) or stderr.strip()[-600:]
    return re.sub(r"\s+", " ", text)


def locked(lock_text: str) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of each locked wheel."""
    out = []
    for line in lock_text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+) --hash=sha256:([0-9a-f]{64})$", line.strip())
        if m:
            out.append((m.group(1), m.group(2), m.group(3)))
    return out
