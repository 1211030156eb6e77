"""The dev cluster with edgefleet's own images on its real node: what `edgefleet cluster up`, the demo and the
test session start. The only module that joins the cluster builder and the image builder."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator

from .devcluster import cluster as dc
from .devcluster import node
from .devcluster.cluster import Cluster
from .images import oci
from .images import sync as image_sync
from .images.spec import VERSION


def up(name: str = "default", echo: Callable[[str], None] = print, **kwargs) -> Cluster:
    """`devcluster.up`, then the built images pushed to the cluster's registry when it has a real node."""
    return dc.up(name, echo=echo, with_node=functools.partial(push_built_images, echo=echo), **kwargs)


def push_built_images(cluster: Cluster, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Push the images `edgefleet images build` made to the cluster's registry (only those it lacks: seconds
    when warm), so the real node runs them as ghcr.io/edgefleet/<name> through its mirror. Not built, or the
    push refused: says so and returns {} (the node runs; pods of those images cannot start)."""
    if missing := image_sync.unbuilt():
        echo(f"images not built ({', '.join(missing)}): the real node cannot run edgefleet's pods yet; run "
             f"`edgefleet images build`, then `edgefleet cluster up --name {cluster.state.name} --real-node` again")
        return {}
    started = time.monotonic()
    try:
        digests = image_sync.sync(f"{cluster.registry}/edgefleet", echo=lambda _: None)
        node.refresh_images(cluster.state, [f"ghcr.io/edgefleet/{name}:{VERSION}" for name in digests])
    except (oci.PushError, node.NodeError) as err:
        echo(f"could not push the built images to the cluster registry {cluster.registry}: {err}")
        return {}
    echo(f"built images in the cluster registry in {time.monotonic() - started:.1f}s ({', '.join(digests)}; "
         "the real node pulls them as ghcr.io/edgefleet/<name>)")
    return digests


@contextlib.contextmanager
def session_cluster(echo: Callable[[str], None] = print, stop: bool = True) -> Iterator[Cluster]:
    """For test sessions: reuse the cluster named by EDGEFLEET_CLUSTER (default 'default') when it runs,
    else start one (with the real node wherever this host can run it) and stop it afterwards unless `stop` is
    False (a shared cluster: sessions that started meanwhile reuse it and would lose it)."""
    name = os.environ.get("EDGEFLEET_CLUSTER", "default")
    if dc.is_running(name):
        yield Cluster(dc.state_dir(name))
        return
    reason = dc.real_node_skip_reason(name)
    if reason:
        echo(f"edgefleet: starting cluster {name!r} without a real node: {reason}")
    cluster = up(name, echo=echo, real_node=reason is None)
    try:
        yield cluster
    finally:
        if stop:
            dc.down(name)
        else:
            echo(f"edgefleet: cluster {name!r} left running (shared: other sessions may be using it)")
