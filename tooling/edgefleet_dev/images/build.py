"""`edgefleet images build | lock | list`: the steps, cached by their inputs so a warm build takes seconds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import toolchain as components
from . import debian, oci, sbom, wheels
from .spec import (
    DEFAULT_REGISTRY,
    IMAGES,
    LICENSE,
    PYTHON,
    REPO,
    SITE,
    SOURCE_URL,
    UID,
    VERSION,
    ImageSpec,
    source_root,
)

LOCKS = Path(__file__).resolve().parent / "locks"
TOOLS = ("crane", "pause", "registry")  # the Go components an image build needs
Echo = Callable[[str], None]


def cache() -> Path:
    """Layers, the image registry and the index of built images (EDGEFLEET_IMAGES_DIR overrides it)."""
    return Path(os.environ.get("EDGEFLEET_IMAGES_DIR") or components.cache_dir() / "images")


def downloads() -> Path:
    """apt state, Debian packages and wheels: shared by every image cache."""
    return components.cache_dir() / "downloads"


def arch_of(platform: str) -> str:
    return platform.split("/", 1)[1]


def host_platform() -> str:
    return {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}[os.uname().machine]


# ---- locks -------------------------------------------------------------------------------------------------


def deb_lock_path(arch: str) -> Path:
    return LOCKS / f"debian-{arch}.lock"


def wheel_lock_path(spec: ImageSpec, arch: str) -> Path:
    return LOCKS / f"{spec.name}-{arch}.txt"


def requirements_key(spec: ImageSpec) -> str:
    return hashlib.sha256("\n".join(sorted(wheels.requirements(spec))).encode()).hexdigest()[:16]


def lock(names: list[str], debian_too: bool = False, echo: Echo = print) -> None:
    """Resolve wheels (and Debian packages: when asked or not locked yet) for every platform of the named
    images; write the lock files."""
    LOCKS.mkdir(exist_ok=True)
    specs = [IMAGES[n] for n in names]
    for arch in sorted({arch_of(p) for s in specs for p in s.platforms if s.python}):
        wanted = {d for s in specs for d in s.debs}
        path = deb_lock_path(arch)
        if not debian_too and path.exists() and wanted <= {ln.split("=")[0] for ln in path.read_text().splitlines()}:
            continue
        apt = debian.Apt(downloads() / "apt", arch)
        echo(f"[lock] Debian packages ({arch}) ...")
        apt.update()
        debs = sorted({d for s in specs for d in s.debs})
        deb_lock_path(arch).write_text("".join(apt.candidate(d).line() + "\n" for d in debs))
    for spec in specs:
        if not spec.python:
            continue
        for platform in spec.platforms:
            arch = arch_of(platform)
            echo(f"[lock] wheels for {spec.name} ({arch}) ...")
            text = f"# requirements {requirements_key(spec)}: edgefleet images lock --only {spec.name}\n"
            wheel_lock_path(spec, arch).write_text(text + wheels.lock(spec, arch))


def _read_wheel_lock(spec: ImageSpec, arch: str) -> Path:
    path = wheel_lock_path(spec, arch)
    if not path.exists():
        raise wheels.WheelError(f"image {spec.name} ({arch}) has no wheel lock: run `edgefleet images lock "
                                f"--only {spec.name}`")
    if requirements_key(spec) not in path.read_text().splitlines()[0]:
        raise wheels.WheelError(f"{path.name} is stale: the image's requirements changed; run `edgefleet images lock "
                                f"--only {spec.name}` and commit the lock")
    return path


# ---- layers ------------------------------------------------------------------------------------------------


@dataclass
class Layer:
    path: Path
    unpacked: int
    key: str


def _cached_layer(key: str, fill: Callable[[Path], object]) -> Layer:
    """The layer for `key`, made by fill(rootfs) once and kept compressed under the cache."""
    key = f"{key}-{_hash(*oci.TAR_FLAGS)[:8]}"  # how the tar is written is part of its identity
    out = cache() / "layers" / f"{key}.tar.gz"
    size = out.parent / f"{key}.size"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        work = cache() / "work" / key
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        fill(work)
        tar = out.with_suffix("")
        size.write_text(str(oci.tar_layer(work, tar)))
        shutil.rmtree(work, ignore_errors=True)
        oci.gzip_layer(tar, out)
    return Layer(out, int(size.read_text()), key)


def _hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def base_layer(spec: ImageSpec, arch: str, echo: Echo) -> tuple[Layer, list[debian.Deb]]:
    locked = {d.name: d for d in map(debian.Deb.parse, deb_lock_path(arch).read_text().splitlines())}
    missing = [d for d in spec.debs if d not in locked]
    if missing:
        raise debian.PackageError(f"{deb_lock_path(arch).name} lacks {missing}: run `edgefleet images lock`")
    debs = [locked[d] for d in spec.debs]

    def fill(root: Path) -> None:
        apt = debian.Apt(downloads() / "apt", arch)
        if not any((apt.root / "lists").glob("*Packages*")):
            apt.update()
        echo(f"  [{spec.name} {arch}] unpacking {len(debs)} Debian packages")
        files = [apt.fetch(d, downloads() / "debs" / arch) for d in debs]
        debian.unpack(files, root)
        debian.ca_bundle(root)
        _users(root)

    return _cached_layer("base-" + _hash(arch, *(d.line() for d in debs), "users-v1"), fill), debs


def _users(root: Path) -> None:
    etc = root / "etc"
    (etc / "passwd").write_text(f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                                f"edgefleet:x:{UID}:{UID}:edgefleet:/tmp:/usr/sbin/nologin\n")
    (etc / "group").write_text(f"root:x:0:\nedgefleet:x:{UID}:\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)


def deps_layer(spec: ImageSpec, arch: str, echo: Echo) -> tuple[Layer, str]:
    lock_file = _read_wheel_lock(spec, arch)
    text = lock_file.read_text()

    def fill(root: Path) -> None:
        echo(f"  [{spec.name} {arch}] installing {len(wheels.locked(text))} wheels (hash-checked)")
        wheels.install(lock_file, arch, root / SITE.lstrip("/"), downloads() / "pip")

    return _cached_layer("deps-" + _hash(arch, text), fill), text


def _own_sources(spec: ImageSpec) -> list[tuple[Path, Path]]:
    """(source dir, package name) of the project's own packages the image carries."""
    root = source_root()
    runtime = (root / "runtime-image" / "edgefleet_runtime", Path("edgefleet_runtime"))
    if spec.project == "runtime":
        return [runtime]
    return [runtime, (root / "operator" / "edgefleet", Path("edgefleet"))]


def shipped_files(spec: ImageSpec) -> list[tuple[Path, Path]]:
    """(file, its package's source dir) for every file of the project's own packages the image carries."""
    return sorted((f, src) for src, _ in _own_sources(spec) for f in src.rglob("*") if _shipped(f))


def _scripts(spec: ImageSpec) -> dict[str, str]:
    path = source_root() / ("runtime-image/pyproject.toml" if spec.project == "runtime" else "pyproject.toml")
    return tomllib.loads(path.read_text())["project"]["scripts"]


def app_layer(spec: ImageSpec, arch: str) -> Layer:
    if not spec.python:
        pause = components.binary_path("pause")
        return _cached_layer("pause-" + _hash(pause.read_bytes()),
                             lambda root: shutil.copy2(pause, root / "pause"))
    sources = _own_sources(spec)
    files = shipped_files(spec)
    scripts = {name: _script(target) for name, target in _scripts(spec).items()}
    key = _hash(spec.project, json.dumps(scripts, sort_keys=True),
                *(f"{f.relative_to(source_root())}:{hashlib.sha256(f.read_bytes()).hexdigest()}" for f, _ in files))

    def fill(root: Path) -> None:
        site = root / SITE.lstrip("/")
        for src, pkg in sources:
            for f in src.rglob("*"):
                if _shipped(f):
                    dest = site / pkg / f.relative_to(src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, dest)
        bindir = root / "usr/local/bin"
        bindir.mkdir(parents=True)
        for name, text in scripts.items():
            script = bindir / name
            script.write_text(text)
            script.chmod(0o755)

    return _cached_layer("app-" + key, fill)


def _script(target: str) -> str:
    """A console script for module:func, with pip's guard: multiprocessing's spawn children import the main
    script as __mp_main__ and must not run the command again."""
    module, func = target.split(":")
    return (f"#!{PYTHON}\nimport sys\nfrom {module} import {func}\n"
            f"if __name__ == \"__main__\":\n    sys.exit({func}())\n")


def _shipped(f: Path) -> bool:
    return f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".pyo")


# ---- images ------------------------------------------------------------------------------------------------


def revision() -> str:
    if os.environ.get("EDGEFLEET_IMAGE_REVISION"):
        return os.environ["EDGEFLEET_IMAGE_REVISION"]
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def config_args(spec: ImageSpec, platform: str, rev: str) -> list[str]:
    labels = {
        "org.opencontainers.image.title": f"edgefleet {spec.name}",
        "org.opencontainers.image.description": spec.contains,
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.revision": rev,
        "org.opencontainers.image.version": VERSION,
        "org.opencontainers.image.licenses": LICENSE,
    }
    env = dict(spec.env)
    if spec.python:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": SITE, "HOME": "/tmp",
               "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", **env}
    args = ["--set-platform", platform, "--user", f"{UID}:{UID}", "--workdir", "/",
            "--entrypoint", ",".join(spec.entrypoint)]
    for k, v in sorted(env.items()):
        args += ["--env", f"{k}={v}"]
    for k, v in sorted(labels.items()):
        args += ["--label", f"{k}={v}"]
    if spec.ports:
        args += ["--exposed-ports", ",".join(f"{p}/tcp" for p in spec.ports)]
    return args


@dataclass
class Built:
    name: str
    ref: str
    digest: str
    platforms: list[str]
    compressed_bytes: int
    unpacked_bytes: int
    contains: str
    seconds: float
    manifests: dict[str, str]  # platform -> manifest digest

    def as_dict(self) -> dict:
        return {"name": self.name, "ref": self.ref, "digest": self.digest, "platforms": self.platforms,
                "compressedBytes": self.compressed_bytes, "unpackedBytes": self.unpacked_bytes,
                "contains": self.contains, "buildSeconds": round(self.seconds, 1), "manifests": self.manifests}


def build_one(spec: ImageSpec, registry: str, platforms: list[str], echo: Echo) -> Built:
    start = time.monotonic()
    repo = f"{registry}/edgefleet/{spec.name}"
    rev = revision()
    per_platform, unpacked, compressed, inventory, manifests = [], 0, 0, {}, {}
    for platform in platforms:
        arch = arch_of(platform)
        layers: list[Layer] = []
        debs: list[Any] = []
        lock_text = ""
        if spec.python:
            base, debs = base_layer(spec, arch, echo)
            deps, lock_text = deps_layer(spec, arch, echo)
            layers += [base, deps]
        layers.append(app_layer(spec, arch))
        ref = _assemble(repo, arch, layers, config_args(spec, platform, rev), echo, spec.name)
        m = oci.manifest(ref)
        compressed = max(compressed, m["config"]["size"] + sum(lay["size"] for lay in m["layers"]))
        unpacked = max(unpacked, sum(layer.unpacked for layer in layers))
        per_platform.append(ref)
        manifests[platform] = ref.rsplit("@", 1)[1]
        inventory[arch] = (debs, wheels.locked(lock_text))
    index = oci.crane("index", "append", *sum((["-m", r] for r in per_platform), []), "-t", f"{repo}:{VERSION}")
    digest = index.rsplit("@", 1)[1]
    sbom.attach(f"{repo}@{digest}", sbom.cyclonedx(spec, inventory, digest))
    return Built(spec.name, f"{repo}:{VERSION}", digest, platforms, compressed, unpacked, spec.contains,
                 time.monotonic() - start, manifests)


def _assemble(repo: str, arch: str, layers: list[Layer], config: list[str], echo: Echo, name: str) -> str:
    """The platform image (repo@digest): from the cache when these layers and this config were assembled before."""
    key = _hash(*(layer.key for layer in layers), *config)
    known = cache() / "manifests" / key
    if known.exists():
        ref = f"{repo}@{known.read_text().strip()}"
        if oci.exists(ref):
            return ref
    echo(f"  [{name} {arch}] assembling {len(layers)} layers with crane")
    tmp_ref = f"{repo}:build-{arch}"
    oci.crane("append", "--oci-empty-base", *sum((["-f", str(layer.path)] for layer in layers), []), "-t", tmp_ref)
    ref = oci.crane("mutate", tmp_ref, *config, "-t", f"{repo}:{VERSION}-{arch}")
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text(ref.rsplit("@", 1)[1])
    return ref


def index_path() -> Path:
    return cache() / "index.json"


def read_index() -> dict:
    path = index_path()
    return json.loads(path.read_text()) if path.exists() else {}


def build(names: list[str], platforms: list[str] | None, echo: Echo = print) -> list[Built]:
    components.build_all(echo=echo, names=list(TOOLS))
    results = []
    with oci.local_registry(cache() / "registry") as registry:
        for i, name in enumerate(names, 1):
            spec = IMAGES[name]
            wanted = [p for p in (platforms or spec.platforms) if p in spec.platforms] or [host_platform()]
            echo(f"[image {i}/{len(names)}] {name} ({', '.join(wanted)}) ...")
            built = build_one(spec, registry, wanted, echo)
            echo(f"[image {i}/{len(names)}] {name} {built.digest[:19]} "
                 f"{built.compressed_bytes / 1e6:.0f} MB compressed, {built.unpacked_bytes / 1e6:.0f} MB unpacked, "
                 f"{built.seconds:.0f}s")
            results.append(built)
    index = read_index()
    index.update({b.name: b.as_dict() for b in results})
    index_path().write_text(json.dumps(index, indent=2, sort_keys=True))
    return results


def push(names: list[str], dest: str, insecure: bool, echo: Echo = print) -> dict[str, str]:
    """Copy built images (all platforms, then the tag) to dest = REGISTRY/PREFIX; returns name -> digest."""
    index = read_index()
    unbuilt = [n for n in names if n not in index]
    if unbuilt:
        raise oci.PushError(f"not built yet: {unbuilt}; run `edgefleet images build --only {' --only '.join(unbuilt)}`")
    pushed = {}
    with oci.local_registry(cache() / "registry") as registry:
        for name in names:
            src = f"{registry}/edgefleet/{name}@{index[name]['digest']}"
            dst = f"{dest.rstrip('/')}/{name}:{VERSION}"
            echo(f"[push] {name} -> {dst}")
            try:
                oci.crane("copy", src, dst, insecure=insecure)
                sbom.copy(src, f"{dest.rstrip('/')}/{name}", index[name]["digest"], insecure=insecure)
            except (oci.PushError, sbom.SbomError) as err:
                raise oci.PushError(f"pushing {name} to {dest} failed (the tag {VERSION} was not written): "
                                    f"{err}") from err
            pushed[name] = index[name]["digest"]
    return pushed


def helm_set_line(dest: str, digests: dict[str, str]) -> str:
    sets = [f"--set images.registry={dest.rstrip('/')}"]
    sets += [f"--set images.digests.{name}={d}" for name, d in sorted(digests.items())]
    return "helm upgrade --install edgefleet charts/edgefleet " + " ".join(sets)


__all__ = ["DEFAULT_REGISTRY", "build", "lock", "push", "read_index", "helm_set_line"]
