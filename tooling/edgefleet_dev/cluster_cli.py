"""`edgefleet cluster up | down | status | kubeconfig | build`."""

from __future__ import annotations

import json
import sys

import click

from . import stack
from . import toolchain as components
from .devcluster import cluster as dc
from .devcluster.fleet import FleetError


def _fail(err: Exception) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(1)


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@click.group()
def cluster() -> None:
    """A local Kubernetes control plane with a kwok edge fleet and an OCI registry (no containers)."""


@cluster.command()
@click.option("--name", default="default", show_default=True, help="Cluster name (state directory).")
@click.option(
    "--fleet", "fleet_file", type=click.Path(dir_okay=False), help="Fleet file (default: examples/fleets/default.yaml)."
)
@click.option("--scale", type=click.IntRange(min=0), help="Nodes per device class (overrides each count).")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for each step.")
@click.option("--real-node", type=click.Choice(["yes", "auto", "no"]), default="no", is_flag=False,
              flag_value="yes", show_default=True,
              help="Also run this machine as a node with real pods (kubelet, containerd, runc, CNI, kube-proxy; "
                   "needs root, runc and iptables); adds it to a running cluster too. `--real-node=auto`: only "
                   "where this host can run it, else say why and go on without.")
def up(name: str, fleet_file: str | None, scale: int | None, timeout: float, real_node: str) -> None:
    """Build (once) and start the cluster, create the fleet, wait until every node is Ready."""
    if real_node == "auto":
        reason = dc.node.cannot_run(dc.state_dir(name))
        if reason:
            _echo(f"no real node: {reason}")
        real_node = "no" if reason else "yes"
    try:
        c = stack.up(name, fleet=fleet_file, scale=scale, echo=_echo, timeout=timeout, real_node=real_node == "yes")
    except (dc.ClusterError, components.BuildError, FleetError) as err:
        _fail(err)
    click.echo(f"export KUBECONFIG={c.kubeconfig}")


@cluster.command()
@click.option("--name", default="default", show_default=True)
@click.option("--only-real-node", is_flag=True, help="Stop only the real node; the control plane and fleet stay.")
def down(name: str, only_real_node: bool) -> None:
    """Stop every process `up` started and remove the cluster's state (also after a crashed `up`)."""
    if not only_real_node:
        dc.down(name, echo=_echo)
        return
    if not dc.is_running(name) or not dc.Cluster(dc.state_dir(name)).real_node:
        _fail(dc.ClusterError(f"cluster {name!r} is not running with a real node"))
    stopped = dc.stop_real_node(name, echo=_echo)
    _echo(f"real node of {name!r} stopped ({', '.join(stopped) or 'nothing was running'}); the cluster runs on")


@cluster.command()
@click.option("--name", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(name: str, as_json: bool) -> None:
    """Components, versions, ports and node counts."""
    st = dc.status(name)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    if not st["running"] and "components" not in st:
        click.echo(f"cluster {name!r}: not running")
        sys.exit(3)
    click.echo(f"cluster {name!r}: {'running' if st['running'] else 'DEGRADED'}  kubeconfig {st['kubeconfig']}")
    for comp, c in st["components"].items():
        state = "up" if c["running"] else "DOWN"
        click.echo(f"  {comp:<24} {c['version']:<9} port {c['port'] or '-':<6} pid {c['pid'] or '-':<8} {state}")
    if "nodes" in st:
        click.echo(f"  nodes: {st['nodes']['ready']}/{st['nodes']['total']} Ready")
    if "realNode" in st:
        real = st["realNode"]
        click.echo(f"  real node: {real['name']} {real['ip']} pods {real['podSubnet']} bridge {real['bridge']}")
    if not st["running"]:
        sys.exit(3)


@cluster.command()
@click.option("--name", default="default", show_default=True)
def kubeconfig(name: str) -> None:
    """Print the path of the cluster's kubeconfig."""
    path = dc.state_dir(name) / "kubeconfig"
    if not path.exists():
        _fail(dc.ClusterError(f"cluster {name!r} is not running; start it with `edgefleet cluster up`"))
    click.echo(str(path))


@cluster.command()
def build() -> None:
    """Build every component that is not cached yet (no-op when all are)."""
    try:
        timings = components.build_all(echo=_echo)
    except components.BuildError as err:
        _fail(err)
    for name, secs in timings.items():
        click.echo(f"{name}: {secs / 60:.1f} min")
    if not timings:
        click.echo(f"all components cached in {components.cache_dir() / 'bin'}")
