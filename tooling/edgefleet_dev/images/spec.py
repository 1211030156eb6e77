"""What each image contains: Debian packages, Python extras, entrypoint, environment, platforms."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import edgefleet

VERSION = edgefleet.__version__  # images are tagged with the project's version
DEFAULT_REGISTRY = "ghcr.io/edgefleet"
SOURCE_URL = "https://github.com/edgefleet/edgefleet"
LICENSE = "Apache-2.0"
UID = 10001  # every image runs as this numeric user (restricted PodSecurity can check it)
PYTHON = "/usr/bin/python3.11"
SITE = "/opt/edgefleet/site"  # wheels and the project's packages, on PYTHONPATH
REPO = Path(__file__).resolve().parents[3]


def source_root() -> Path:
    """Where the project's sources are read from: the checkout, or EDGEFLEET_IMAGE_SOURCE (e.g. a `git archive`
    of one commit, so that a build does not see uncommitted edits)."""
    return Path(os.environ.get("EDGEFLEET_IMAGE_SOURCE") or REPO)

# A Python 3.11 userland from Debian 12, without a shell or package manager (like distroless python3).
PYTHON_DEBS = (
    "base-files", "netbase", "tzdata", "media-types", "ca-certificates",
    "libc6", "gcc-12-base", "libgcc-s1", "libstdc++6", "libgomp1", "zlib1g", "libexpat1", "libssl3",
    "libffi8", "libbz2-1.0", "liblzma5", "libcrypt1", "libsqlite3-0", "libuuid1", "libncursesw6", "libtinfo6",
    "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11-minimal",
)

RUNTIME_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class ImageSpec:
    name: str
    contains: str  # one line for `images list`
    project: str  # "runtime" (runtime-image/pyproject.toml) or "operator" (the top-level pyproject.toml)
    extras: tuple[str, ...] = ()  # extras of that project, as the Dockerfile installs them
    debs: tuple[str, ...] = PYTHON_DEBS
    entrypoint: tuple[str, ...] = ("edgefleet-runtime",)
    env: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = (8080,)
    platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64")
    dockerfile: str = ""  # recipe for people with Docker, relative to the repository
    default: bool = True  # built by a plain `edgefleet images build`
    python: bool = True

    @property
    def lock_name(self) -> str:
        return self.name


def _runtime(name: str, extras: tuple[str, ...], contains: str, **kw) -> ImageSpec:
    return ImageSpec(name, contains, "runtime", extras, dockerfile=f"runtime-image/Dockerfile.{name.split('-', 1)[1]}",
                     **kw)


IMAGES: dict[str, ImageSpec] = {
    s.name: s
    for s in [
        ImageSpec("pause", "the sandbox image of the dev cluster's real node (a static Go binary)", "pause",
                  debs=(), entrypoint=("/pause",), ports=(), python=False, platforms=("linux/amd64",)),
        ImageSpec("operator", "the edgefleet operator (Kopf) with the inline compiler (ONNX, ONNX Runtime)",
                  "operator", ("compile", "runtime"), entrypoint=("edgefleet",), ports=(8080,),
                  dockerfile="operator/Dockerfile"),
        ImageSpec("compiler", "`edgefleet compile` with ONNX Runtime, OpenVINO/NNCF, LiteRT and onnx2tf + TensorFlow",
                  "operator", ("compile", "runtime", "openvino", "litert", "tflite-convert"),
                  entrypoint=("edgefleet",), ports=(), dockerfile="operator/Dockerfile.compiler",
                  platforms=("linux/amd64",)),
        ImageSpec("trainer", "`edgefleet-federated` (FederatedTraining's server and clients): the runtime with "
                  "Flower and ONNX, numpy head training; pushes results with the operator's artifact client",
                  "operator", ("runtime", "federated"), entrypoint=("edgefleet-federated",), ports=(9092,),
                  dockerfile="operator/Dockerfile.trainer"),
        _runtime("runtime-cpu", ("onnx", "litert", "delta", "pipeline"),
                 "edgefleet-runtime with ONNX Runtime and LiteRT (XNNPACK), delta downloads and the node pipeline"),
        _runtime("runtime-openvino", ("onnx", "openvino", "delta", "pipeline"),
                 "edgefleet-runtime with OpenVINO and ONNX Runtime, delta downloads and the node pipeline",
                 env={"EDGEFLEET_BACKEND": "openvino"}, platforms=("linux/amd64",)),
        _runtime("runtime-coral", ("litert",), "edgefleet-runtime with LiteRT; loads the Edge TPU delegate "
                 "(libedgetpu.so.1) when the device and library are present, else CPU",
                 env={"EDGEFLEET_DELEGATE": "libedgetpu.so.1", "EDGEFLEET_DELEGATE_OPTIONAL": "true"}),
        _runtime("runtime-gpu", ("onnx-gpu",), "edgefleet-runtime with onnxruntime-gpu (CUDA/TensorRT providers)",
                 env={"EDGEFLEET_EXECUTION_PROVIDER": "auto"}, platforms=("linux/amd64",), default=False),
        _runtime("runtime-jetson", ("onnx-gpu",), "edgefleet-runtime with onnxruntime-gpu for Jetson (aarch64)",
                 env={"EDGEFLEET_EXECUTION_PROVIDER": "auto"}, platforms=("linux/arm64",), default=False),
    ]
}


def image_ref(registry: str, name: str, version: str = VERSION) -> str:
    return f"{registry.rstrip('/')}/{name}:{version}"
