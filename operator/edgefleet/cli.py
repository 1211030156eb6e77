"""The `edgefleet` command line. Subcommands load lazily so `--help` stays fast."""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command or group
SUBCOMMANDS = {
    "cluster": "edgefleet.devcluster.cli:cluster",
    "crds": "edgefleet.api.crdgen:crds_command",
    "compile": "edgefleet.compiler.cli:compile_command",
    "operator": "edgefleet.handlers.cli:operator_command",
    "demo": "edgefleet.demo:demo_command",
    "examples": "edgefleet.artifacts.examples:examples",
    "images": "edgefleet.images.cli:images",
    "keygen": "edgefleet.signing:keygen_command",
    "sign": "edgefleet.signing:sign_command",
    "verify": "edgefleet.signing:verify_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="edgefleet")
def main() -> None:
    """edgefleet: optimize a model per hardware class and run it across an edge fleet."""


if __name__ == "__main__":
    main()
