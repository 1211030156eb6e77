"""The control-plane components: pinned versions, how to build each from its Go module, where it is cached."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.progress import Progress, duration

RECIPE = Path(__file__).resolve().parent / "recipe"

KUBE_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
REGISTRY_VERSION = "v3.1.1"
HELM_VERSION = "v3.22.0"
CONTAINERD_VERSION = "v2.4.2"
CNI_PLUGINS_VERSION = "v1.10.0"
CRANE_VERSION = "v0.22.1"
PAUSE_VERSION = "v1.0.0"  # our own sandbox program, recipe/pause/main.go


def _kube_ldflags() -> list[str]:
    major, minor = KUBE_VERSION.lstrip("v").split(".")[:2]
    stamp = {"gitVersion": KUBE_VERSION, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    return [
        f"-X k8s.io/{pkg}/version.{key}={value}"
        for pkg in ("component-base", "client-go/pkg")
        for key, value in stamp.items()
    ]


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    recipe: str  # folder under recipe/ holding the go.mod that pins it
    package: str | tuple[str, ...]  # Go main package; several build into one folder, a binary each
    ldflags: list[str] = field(default_factory=list)
    tags: tuple[str, ...] = ()  # Go build tags

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.package,) if isinstance(self.package, str) else self.package


def _kube(name: str) -> Component:
    return Component(name, KUBE_VERSION, "kubernetes", f"k8s.io/kubernetes/cmd/{name}", _kube_ldflags())


def _containerd(name: str) -> Component:
    module = "github.com/containerd/containerd/v2"
    return Component(name, CONTAINERD_VERSION, "containerd", f"{module}/cmd/{name}",
                     [f"-X {module}/version.Version={CONTAINERD_VERSION}"],
                     tags=("no_btrfs", "no_devmapper", "no_zfs"))


_CNI = "github.com/containernetworking/plugins"


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in [
        Component("etcd", ETCD_VERSION, "etcd", "go.etcd.io/etcd/server/v3"),
        Component(
            "kwok",
            KWOK_VERSION,
            "kwok",
            "sigs.k8s.io/kwok/cmd/kwok",
            [
                f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",
                f"-X sigs.k8s.io/kwok/pkg/consts.KubeVersion={KUBE_VERSION}",
            ],
        ),
        _kube("kube-apiserver"),
        _kube("kube-controller-manager"),
        _kube("kube-scheduler"),
        _kube("kubectl"),
        Component(
            "registry",
            REGISTRY_VERSION,
            "registry",
            "github.com/distribution/distribution/v3/cmd/registry",
            [f"-X github.com/distribution/distribution/v3/version.version={REGISTRY_VERSION}"],
        ),
        Component(
            "crane",
            CRANE_VERSION,
            "crane",
            "github.com/google/go-containerregistry/cmd/crane",
            [f"-X github.com/google/go-containerregistry/cmd/crane/cmd.Version={CRANE_VERSION}"],
        ),
        Component("pause", PAUSE_VERSION, "pause", "edgefleet.io/devcluster/pause"),
        Component(
            "helm",
            HELM_VERSION,
            "helm",
            "helm.sh/helm/v3/cmd/helm",
            [f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"]
            + [  # the Kubernetes version `helm template` assumes without a cluster
                f"-X helm.sh/helm/v3/pkg/{pkg}.k8sVersion{part}={value}"
                for pkg in ("chartutil", "lint/rules")
                for part, value in (("Major", "1"), ("Minor", KUBE_VERSION.split(".")[1]))
            ],
        ),
        # the real node (`edgefleet cluster up --real-node`); runc and iptables come from the host
        _kube("kubelet"),
        _kube("kube-proxy"),
        _containerd("containerd"),
        _containerd("containerd-shim-runc-v2"),
        _containerd("ctr"),
        Component(
            "cni-plugins",
            CNI_PLUGINS_VERSION,
            "cni",
            tuple(f"{_CNI}/plugins/{p}" for p in ("main/bridge", "ipam/host-local", "main/loopback", "meta/portmap")),
            [f"-X {_CNI}/pkg/utils/buildversion.BuildVersion={CNI_PLUGINS_VERSION}"],
        ),
    ]
}

# what `up --real-node` needs beyond the control plane
NODE_COMPONENTS = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "cni-plugins")


class BuildError(RuntimeError):
    """A component could not be built; the message names it and its log."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet")).expanduser()


def binary_path(name: str) -> Path:
    c = COMPONENTS[name]
    return cache_dir() / "bin" / f"{c.name}-{c.version}"


def missing(names: list[str] | None = None) -> list[Component]:
    chosen = [COMPONENTS[n] for n in names] if names is not None else list(COMPONENTS.values())
    return [c for c in chosen if not binary_path(c.name).exists()]


def control_plane() -> list[str]:
    """Every component a plain `up` builds (all but the real node's)."""
    return [n for n in COMPONENTS if n not in NODE_COMPONENTS]


# Seconds a cold `go build` of each took on 2 cores (the build logs' "built in"); the estimate scales with the cores.
COLD_BUILD_SECONDS = {
    "kube-apiserver": 614, "kwok": 187, "containerd": 158, "kubelet": 133, "helm": 110, "etcd": 59, "kubectl": 42,
    "kube-controller-manager": 41, "kube-proxy": 35, "cni-plugins": 14, "ctr": 12, "kube-scheduler": 6,
    "containerd-shim-runc-v2": 2,
}
DEFAULT_BUILD_SECONDS = 60


def estimate(comp: Component) -> float:
    """Seconds a cold build of `comp` should take here: its last build's time from its log (any version), else
    the 2-core figure scaled by this machine's cores."""
    for log in sorted((cache_dir() / "logs").glob(f"build-{comp.name}-*.log"), reverse=True):
        found = re.search(r"^built in ([0-9.]+)s$", log.read_text(errors="replace"), re.M)
        if found:
            return float(found.group(1))
    return COLD_BUILD_SECONDS.get(comp.name, DEFAULT_BUILD_SECONDS) * 2 / max(2, os.cpu_count() or 2)


def build_all(echo: Callable[[str], None] = print, names: list[str] | None = None,
              live: bool | None = None) -> dict[str, float]:
    """Build every missing component (of `names`, default all); returns seconds per component built.
    Builds nothing when cached. Progress: live on a terminal (``live`` None), else plain lines through echo."""
    todo = missing(names)
    if not todo:
        return {}
    go = shutil.which("go")
    if go is None:
        raise BuildError(
            "the Go toolchain is not on PATH: the dev cluster is built from Go modules. "
            "Install Go >= 1.26 (https://go.dev/doc/install) and run `edgefleet cluster up` again."
        )
    timings: dict[str, float] = {}
    estimates = {comp.name: estimate(comp) for comp in todo}
    with Progress(echo, live) as progress:
        progress.say(f"building {len(todo)} components from their Go modules, about "
                     f"{duration(sum(estimates.values()))} in all (cached afterwards)")
        for i, comp in enumerate(todo, 1):
            task = progress.add(f"[build {i}/{len(todo)}] {comp.name} {comp.version}", estimate=estimates[comp.name],
                                status="building")
            start = time.monotonic()
            with _build_lock(comp):  # another process (a second `up`, `images build`) may be building it too
                if binary_path(comp.name).exists():
                    progress.done(task, "built meanwhile by another process")
                    continue
                log = _build_one(go, comp)
            timings[comp.name] = time.monotonic() - start
            with log.open("a") as fh:
                fh.write(f"built in {timings[comp.name]:.1f}s\n")
            progress.done(task, f"done in {duration(timings[comp.name])}")
    return timings


@contextlib.contextmanager
def _build_lock(comp: Component):
    path = cache_dir() / "locks" / f"build-{comp.name}-{comp.version}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _build_one(go: str, comp: Component) -> Path:
    out = binary_path(comp.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = cache_dir() / "logs" / f"build-{comp.name}-{comp.version}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    target = f"{tmp}/" if len(comp.packages) > 1 else str(tmp)  # a folder: one binary per package
    tags = ["-tags", ",".join(comp.tags)] if comp.tags else []
    cmd = [go, "build", "-trimpath", *tags, "-ldflags", " ".join(["-s", "-w", *comp.ldflags]), "-o", target,
           *comp.packages]
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"}
    with log.open("w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=RECIPE / comp.recipe, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        tail = log.read_text().splitlines()[-5:]
        raise BuildError(
            f"building {comp.name} {comp.version} failed (exit {proc.returncode}); full log: {log}\n"
            + "\n".join("    " + line for line in tail)
        )
    tmp.rename(out)
    return log


def main() -> None:  # pragma: no cover - convenience for `python -m`
    try:
        build_all()
    except BuildError as err:
        sys.exit(str(err))
