"""``kmagent dead``, ``import`` and ``export``: commands on what the spool holds."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from .options import common_options, config as _config
from ..config import Config


@click.group()
def dead() -> None:
    """Dead letters: events the host refused for good, or that expired (max_age).

    \b
    Examples:
      kmagent dead list
      kmagent dead retry 17 18
      kmagent dead purge --all
    """


def _spool(config: Config):
    from ..spool import open_configured
    return open_configured(config)


@dead.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@common_options
def dead_list(as_json: bool) -> int:
    """List dead letters: id, reason, person, event, properties.

    \b
    Example:
      kmagent dead list --json
    """
    with _spool(_config()) as spool:
        letters = spool.dead_letters()
    if as_json:
        click.echo(json.dumps(letters))
        return 0
    for letter in letters:
        what = letter["event"] if letter["path"] == "e" else (
            f"alias of {letter['identity']}" if letter["path"] == "a" else "(set)")
        props = " ".join(f"{k}={v}" for k, v in letter["properties"].items())
        click.echo(f"{letter['id']}\t{letter['reason']}\t{letter['person']}\t{what}\t{props}")
    return 0


def _dead_action(act: Callable[[Any, list[str] | None], int], done: str,
                 ids: tuple[str, ...], everything: bool) -> int:
    """``act(spool, ids)`` (None: every dead letter), then say how many were ``done``."""
    if bool(ids) == everything:
        raise click.UsageError("give the ids of the dead letters, or --all (not both)")
    with _spool(_config()) as spool:
        try:
            count = act(spool, None if everything else list(ids))
        except KeyError as exc:
            raise click.UsageError(f"no dead letter with id {exc.args[0]}") from None
    click.echo(f"{count} dead letters {done}", err=True)
    return 0


@dead.command(name="retry")
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
@common_options
def dead_retry(ids: tuple[str, ...], everything: bool) -> int:
    """Put dead letters back in the spool, to be sent again.

    \b
    Example:
      kmagent dead retry --all
    """
    return _dead_action(lambda spool, chosen: spool.retry_dead(chosen), "back to pending",
                        ids, everything)


@dead.command(name="purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
@common_options
def dead_purge(ids: tuple[str, ...], everything: bool) -> int:
    """Delete dead letters for good.

    \b
    Example:
      kmagent dead purge 17
    """
    return _dead_action(lambda spool, chosen: spool.purge_dead(chosen), "purged",
                        ids, everything)


@click.group(name="import")
def import_() -> None:
    """Bring events logged by other tools into the spool."""


@import_.command(name="km-log")
@click.argument("directories", nargs=-1, required=True, metavar="DIR...",
                type=click.Path(exists=True, file_okay=False))
@common_options
def import_km_log(directories: tuple[str, ...]) -> int:
    """Move the events in the logs of km, kmts, km.php and kissmetrics-php into the
    spool: the query logs (kissmetrics_<env>_query.log, kissmetrics_query.log) and
    the sending logs their senders left behind. Each query log is renamed, read once
    no writer can add to it, and deleted; nothing is cut out of a file a writer may
    append to. Each request is sent as the library would have sent it, with _d=1;
    importing again sends nothing twice. What Kissmetrics cannot accept is counted by
    reason and set aside (exit 0); a log that cannot be read, or is in no format
    kmagent reads, is named and left as it is, and the others imported (exit 1).

    \b
    Example:
      kmagent import km-log /var/log/myapp/km
    """
    from pathlib import Path

    from ..kmlog import REASONS, KmLogImporter
    with _spool(_config()) as spool:
        result = KmLogImporter(spool).import_and_finish([Path(d) for d in directories])
    click.echo(f"imported {result.imported} events from {len(result.files)} files")
    for reason, count in sorted(result.set_aside.items()):
        click.echo(f"{count} set aside ({reason}: {REASONS[reason]}) in {result.bad_path}",
                   err=True)
    for path in result.waiting:
        click.echo(f"kmagent: {path} is still being written to; its rest is imported "
                   "next time", err=True)
    for problem in result.errors:
        click.echo(f"kmagent: cannot import {problem}", err=True)
    return 1 if result.errors else 0


@click.command()
@click.option("--dead", is_flag=True, help="The dead letters instead of the pending events.")
@click.option("--key", metavar="API_KEY",
              help="Only the events of this API key (needed when the spool holds several).")
@click.option("--output", "-o", type=click.File("w", encoding="utf-8"), default="-",
              help="Write here instead of standard output.")
@common_options
def export(dead: bool, key: str | None, output) -> int:
    """Write the pending events (or, with --dead, the dead letters) as Kissmetrics
    newline-JSON import lines, oldest first, for a bulk backfill. Read only: the spool
    is unchanged (after importing dead letters elsewhere, `kmagent dead purge --all`).
    An import is for one product: if the events carry several API keys, choose one
    with --key. An event the import would read differently (a property named _p2, a
    parameter given twice, bytes that are not UTF-8) is left out and counted (exit 1).

    \b
    Example:
      kmagent export --dead -o backfill.jsonl
    """
    from ..config import configured_api_key
    from ..export import export_lines
    config = _config()
    with _spool(config) as spool:
        # Events without a key of their own go with the agent's: tell the keys apart.
        result = export_lines(spool, dead=dead, key=key,
                              configured_key=configured_api_key(config))
    for line in result.lines:
        output.write(line + "\n")
    click.echo(f"exported {len(result.lines)} {'dead letters' if dead else 'pending events'}",
               err=True)
    for reason, count in sorted(result.left_out.items()):
        click.echo(f"kmagent: {count} left out: {reason}", err=True)
    return 1 if result.left_out else 0
