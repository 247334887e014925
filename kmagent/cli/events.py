"""``kmagent record``, ``set`` and ``alias``: an app's calls, from a shell."""

from __future__ import annotations

import click

from ..config import Config
from ..errors import InvalidEvent
from .options import common_options, config as _config


def _properties(pairs: tuple[str, ...]) -> dict[str, str]:
    props: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidEvent(f"property {pair!r}", "expected NAME=VALUE")
        props[name] = value
    return props


def _client(config: Config):
    from ..client import Client
    return Client(config=config)


TIMESTAMP_HELP = "Unix seconds when it happened (default: now)."


@click.command()
@click.argument("person")
@click.argument("event")
@click.argument("properties", nargs=-1, metavar="[NAME=VALUE]...")
@click.option("--timestamp", type=int, help=TIMESTAMP_HELP)
@common_options
def record(person: str, event: str, properties: tuple[str, ...], timestamp: int | None) -> int:
    """Append an event: PERSON did EVENT.

    \b
    Example:
      kmagent record bob@example.com "Signed Up" Plan=Pro Amount=99.95
    """
    config = _config()
    _client(config).record(person, event, _properties(properties), timestamp=timestamp)
    return 0


@click.command(name="set")
@click.argument("person")
@click.argument("properties", nargs=-1, metavar="NAME=VALUE...")
@click.option("--timestamp", type=int, help=TIMESTAMP_HELP)
@common_options
def set_(person: str, properties: tuple[str, ...], timestamp: int | None) -> int:
    """Append properties of PERSON.

    \b
    Example:
      kmagent set bob@example.com gender=male "Plan Name=Pro"
    """
    config = _config()
    _client(config).set(person, _properties(properties), timestamp=timestamp)
    return 0


@click.command()
@click.argument("person")
@click.argument("identity")
@common_options
def alias(person: str, identity: str) -> int:
    """Append an alias: PERSON and IDENTITY are the same person.

    \b
    Example:
      kmagent alias "User 12345" bob@example.com
    """
    config = _config()
    _client(config).alias(person, identity)
    return 0
