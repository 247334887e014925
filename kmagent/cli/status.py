"""``kmagent status``: the spool's figures, for people or as JSON."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import click

from .options import common_options, config as _config

if TYPE_CHECKING:  # read lazily: status is not the only command
    from ..report import Status


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common_options
def status(as_json: bool) -> int:
    """Show the spool's figures: pending, dead, oldest pending age, the shipper.

    \b
    Example:
      kmagent status --json
    """
    from ..report import read_status
    config = _config()
    figures = read_status(config)
    if as_json:
        click.echo(json.dumps(figures.to_json()))
        return 0
    if not figures.exists:
        click.echo(f"no spool at {figures.spool} yet: nothing has been recorded", err=True)
    click.echo(_status_text(figures))
    return 0


def _ago(at: float | None) -> str:
    return "never" if at is None else f"{_seconds(max(0.0, time.time() - at))} ago"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.0f} min" if value < 7200 \
        else f"{value / 3600:.1f} h"


def _status_text(f: Status) -> str:
    """``kmagent status`` for people: the backlog first, then how shipping goes."""
    age, pid = f.oldest_pending_age_s, f.daemon_pid
    lines = [
        f"spool:      {f.spool}",
        f"pending:    {f.pending} ({f.in_flight} in flight)"
        + ("" if age is None else f", oldest {_seconds(age)} old"),
        f"dead:       {f.dead}" + (" (kmagent dead list)" if f.dead else ""),
        f"shipper:    {'none running' if pid is None else f'pid {pid}'}"
        + (f", {f.rate_1m:.1f} events/s over the last minute" if pid else ""),
        f"delivered:  {f.delivered_total} (last {_ago(f.last_success_at)}), "
        f"retried {f.retried_total}",
    ]
    if f.last_error:
        lines.append(f"last error: {f.last_error} ({_ago(f.last_error_at)})")
    if f.dropped_total:
        lines.append(f"dropped:    {f.dropped_total} (spool full, when_full = \"drop\")")
    if f.bad_lines is not None:
        lines.append(f"bad lines:  {f.bad_lines}")
    if f.damaged:
        lines.append(f"DAMAGED:    {f.damaged} (the daemon keeps it aside and salvages it)")
    if f.salvaged:
        lines.append(f"salvaged:   {f.salvaged['saved']} events from a damaged spool "
                     f"({_ago(f.salvaged['at'])}; at most {f.salvaged['unreadable']} could "
                     f"not be read), kept as {f.salvaged['kept_as']}")
    return "\n".join(lines)
