"""The runtime Dockerfiles cannot be built here: parse them and check the rules they must keep."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime-image"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.jetson", "Dockerfile.coral", "Dockerfile.openvino", "Dockerfile.gpu"]
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def parse(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and backslash continuations joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_rules(name):
    ins = parse(RUNTIME / name)
    unknown = [w for w, _ in ins if w not in INSTRUCTIONS]
    assert not unknown, f"{name}: unknown instructions {unknown}"
    first = next(w for w, _ in ins if w != "ARG")
    assert first == "FROM", f"{name}: the first instruction after ARGs must be FROM"
    stages = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    final = ins[stages[-1] :]
    users = [a for w, a in final if w == "USER"]
    assert users, f"{name}: the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: must run as non-root, got USER {users[-1]}"
    assert user.isdigit() and int(user) >= 1000, f"{name}: use a numeric UID >= 1000 (runAsNonRoot can check it)"
    entry = [a for w, a in final if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["edgefleet-runtime"], f"{name}: ENTRYPOINT must be exec-form"
    assert ("EXPOSE", "8080") in final
    args = dict(a.split("=", 1) for w, a in ins[: stages[0]] if w == "ARG" and "=" in a)
    for w, a in ins:
        if w == "FROM":
            a = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), a)
        assert not (w == "ADD" and re.search(r"https?://", a)), f"{name}: use RUN curl with checks, not ADD URL"
        if w == "FROM":
            assert ":latest" not in a and re.search(r":[\w${}.-]+", a), f"{name}: pin base image tags: {a}"
            assert "--platform" not in a, f"{name}: do not hard-code the platform: {a}"
        if w == "RUN":
            if "pip install" in a:
                assert "--no-cache-dir" in a, f"{name}: pip install needs --no-cache-dir"
            if "apt-get install" in a:
                assert "--no-install-recommends" in a and "rm -rf /var/lib/apt/lists" in a, (
                    f"{name}: apt-get install needs --no-install-recommends and list cleanup"
                )
        if w == "COPY" and "--from=" not in a:
            for src in shlex.split(a)[:-1]:
                assert (RUNTIME / src).exists(), f"{name}: COPY source {src} is not in the build context"


def test_cpu_image_is_multi_arch():
    froms = [a for w, a in parse(RUNTIME / "Dockerfile.cpu") if w == "FROM"]
    # official python images are multi-arch manifests (amd64 + arm64); no arch-specific base
    assert all(a.startswith("python:") for a in froms)


def test_runtime_package_deps_match_the_repository_extra():
    root = tomllib.loads((RUNTIME.parent / "pyproject.toml").read_text())
    image = tomllib.loads((RUNTIME / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in reqs}

    image_all = names(image["dependencies"]) | names(r for v in image["optional-dependencies"].values() for r in v)
    missing = names(root["project"]["optional-dependencies"]["runtime"]) - image_all
    assert not missing, f"runtime-image/pyproject.toml lacks {missing} from the repository's runtime extra"
    assert image["scripts"]["edgefleet-runtime"] == "edgefleet_runtime.cli:main"
