"""Keep a registry in step with the built images: push only those whose tag there is not the built digest
(a dev cluster's registry, so its real node pulls what `edgefleet images build` made; cheap when warm)."""

from __future__ import annotations

from . import oci
from .build import Echo, push, read_index
from .spec import IMAGES, VERSION

# what a dev cluster's real node runs: the operator, the default runtimes, the compiler (compile Jobs) and the
# trainer (FederatedTraining runs)
CLUSTER_IMAGES = ("operator", "runtime-cpu", "runtime-openvino", "runtime-coral", "compiler", "trainer")


def unbuilt(names: tuple[str, ...] | list[str] = CLUSTER_IMAGES) -> list[str]:
    """The named images that `edgefleet images build` has not built yet."""
    index = read_index()
    return [n for n in names if n not in index]


def sync(dest: str, names: tuple[str, ...] | list[str] = CLUSTER_IMAGES, echo: Echo = print) -> dict[str, str]:
    """Push the built images that dest (REGISTRY/PREFIX, plain HTTP) lacks at their built digest; returns
    name -> digest for all of them. Raises PushError naming the build command when one is not built."""
    unknown = [n for n in names if n not in IMAGES]
    if unknown:
        raise ValueError(f"unknown images {unknown}; known: {sorted(IMAGES)}")
    if missing := unbuilt(names):
        raise oci.PushError(f"not built yet: {missing}; run `edgefleet images build`")
    index = read_index()
    stale = [n for n in names if _digest_at(f"{dest.rstrip('/')}/{n}:{VERSION}") != index[n]["digest"]]
    if stale:
        push(stale, dest, insecure=True, echo=echo)
    return {n: index[n]["digest"] for n in names}


def _digest_at(ref: str) -> str | None:
    try:
        return oci.digest(ref)
    except oci.PushError:
        return None
