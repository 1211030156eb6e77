"""README's two commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner
from edgefleet.cli import main

REPO = Path(__file__).resolve().parents[2]


def command_after(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```sh\n(.+?)\n```", text)
    assert match, f"README.md has no ```sh block after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    command = command_after("test-command")
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_readme_demo_command_exists():
    command = command_after("demo-command")
    assert command.endswith("edgefleet demo")
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0 and "one table per hardware class" in result.output


def test_every_cli_subcommand_loads():
    for name in main.list_commands(None):
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_ci_runs_the_static_checks_before_the_tests():
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    tests = ci_lines.index(command_after("test-command"))
    for check in ("ruff check .", "lint-imports", "mypy"):
        assert check in ci_lines[:tests], f".ci/run should run `{check}` before the tests"
