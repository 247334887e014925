"""The README and the code agree: every command, option and configuration key the
code has is documented in the README, and everything the README's tables document
exists in the code (as sqlite-utils checks its CLI reference)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from kmagent.cli import cli
from kmagent.config import KEYS
from kmagent.report import Status

README = (Path(__file__).parent.parent / "README.md").read_text()


def commands(group: click.Group = cli, prefix: str = "") -> dict[str, click.Command]:
    """Every command by its full name ("dead list"), groups included."""
    found = {}
    for name, command in group.commands.items():
        full = f"{prefix}{name}"
        found[full] = command
        if isinstance(command, click.Group):
            found.update(commands(command, full + " "))
    return found


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


COMMANDS = {name: command for name, command in commands().items()
            if not isinstance(command, click.Group)}
OPTIONS = sorted({(name, option) for name, command in COMMANDS.items()
                  for param in command.params if isinstance(param, click.Option)
                  for option in param.opts if option.startswith("--")})


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_in_the_commands_table(name):
    assert f"| `kmagent {name}" in section("Commands"), f"kmagent {name} is not documented"


@pytest.mark.parametrize("name, option", OPTIONS)
def test_every_option_is_documented(name, option):
    if option in ("--config", "--log-level", "--help"):  # every command's: said once
        assert f"`{option}" in section("Commands")
        return
    row = next(line for line in section("Commands").splitlines()
               if line.startswith(f"| `kmagent {name}"))
    assert option in row, f"kmagent {name} {option} is not in its row of the table"


def test_every_documented_command_exists():
    documented = re.findall(r"^\| `kmagent ([a-z-]+(?: [a-z-]+)?)", section("Commands"), re.M)
    for name in documented:
        assert name in COMMANDS or name.split()[0] in COMMANDS, \
            f"kmagent {name} is documented but does not exist"


def table_keys() -> set[tuple[str, str]]:
    """(section, key) of every row of the README's configuration table."""
    keys = set()
    for cell in re.findall(r"^\| (`[^|]+`) \|", section("Configuration"), re.M):
        sect = re.match(r"`\[(\w+)\] ", cell)
        for key in re.findall(r"(?:\[\w+\] )?(\w+)`", cell):
            keys.add((sect.group(1) if sect else "", key))
    return keys


@pytest.mark.parametrize("sect, key", sorted(KEYS))
def test_every_configuration_key_is_in_the_configuration_table(sect, key):
    assert (sect, key) in table_keys(), f"[{sect}] {key} is not documented"


def test_every_documented_configuration_key_exists():
    assert table_keys() - set(KEYS) == set()


def test_every_configuration_key_is_in_the_example_file():
    example = (Path(__file__).parent.parent / "config.example.toml").read_text()
    for sect, key in KEYS:
        assert re.search(rf"^#? ?{key} =", example, re.M), f"{key} not in config.example.toml"


@pytest.mark.parametrize("field", [f for f in Status.__dataclass_fields__])
def test_every_status_field_is_documented(field):
    commands = section("Commands")  # in the prose, or in the example of --json
    assert f"`{field}`" in commands or f'"{field}":' in commands, \
        f"status field {field} is not in the README"
