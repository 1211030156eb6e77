"""The `edgefleet` command line. Subcommands load lazily so `--help` stays fast. Commands of the development
tooling (`cluster`, `images`, `demo`) come from the `edgefleet.commands` entry points of an installed checkout;
the product never imports them, and its images carry none."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import click

# name -> "module:attribute" of a click command or group
SUBCOMMANDS = {
    "crds": "edgefleet.api.crdgen:crds_command",
    "compile": "edgefleet.compiler.cli:compile_command",
    "operator": "edgefleet.handlers.cli:operator_command",
    "examples": "edgefleet.artifacts.examples:examples",
    "keygen": "edgefleet.signing:keygen_command",
    "registry-token-server": "edgefleet.registry_token:registry_token_command",
    "sign": "edgefleet.signing:sign_command",
    "verify": "edgefleet.signing:verify_command",
}


def _commands() -> dict[str, str]:
    """The product's subcommands and the installed tooling's (entry point group `edgefleet.commands`)."""
    plugged = {ep.name: ep.value for ep in entry_points(group="edgefleet.commands")}
    return {**plugged, **SUBCOMMANDS}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_commands())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _commands().get(name)
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
