"""`edgefleet operator`: run the Kopf operator in this process."""

from __future__ import annotations

import asyncio
import logging

import click
import kopf


@click.command("operator")
@click.option("--namespace", "namespaces", multiple=True, help="Watch only these namespaces (default: all).")
@click.option("--liveness", default="http://0.0.0.0:8080/healthz", show_default=True,
              help="Health endpoint for the liveness probe ('' to disable).")
@click.option("--verbose", is_flag=True)
def operator_command(namespaces: tuple[str, ...], liveness: str, verbose: bool) -> None:
    """Reconcile EdgeModels and EdgeDeployments until stopped."""
    from ..settings import Settings
    from . import start  # noqa: F401 - registers the handlers

    watch = list(namespaces) or Settings().watch_namespaces
    kopf.configure(verbose=verbose)
    if not verbose:  # one line per watch event is noise; our reconcilers log what they change
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(kopf.operator(
        standalone=True, clusterwide=not watch, namespaces=watch, liveness_endpoint=liveness or None,
    ))
