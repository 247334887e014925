"""``kmagent run``, ``reload``, ``flush`` and ``check``: the shipping side's commands."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import click

from .options import EX_CONFIG, common_options, config as _config


@click.command()
@common_options
def run() -> int:
    """Ship the spool continuously until SIGTERM or SIGINT (exit 0); SIGHUP reloads
    the configuration. Under systemd (Type=notify) it reports READY, STATUS, WATCHDOG
    and STOPPING.

    \b
    Example:
      kmagent run --config /etc/kmagent/config.toml
    """
    from ..daemon import Daemon
    daemon = Daemon(_config(), reload=_config)
    daemon.install_signal_handlers()
    return daemon.run()


@click.command(name="reload")
@click.option("--pid", type=click.IntRange(min=1), metavar="PID",
              help="The daemon's pid (systemd passes $MAINPID); default: the one "
                   "shipping the configured spool.")
@common_options
def reload_(pid: int | None) -> int:
    """Make the running daemon read its configuration again (SIGHUP) and wait for
    it: 0 applied; 78 refused (the daemon keeps the running one, and says why);
    1 no daemon, or no answer.

    \b
    Example (the unit's ExecReload):
      kmagent reload --pid $MAINPID --config /etc/kmagent/config.toml
    """
    from ..reloading import reload
    result = reload(_config(), pid)
    if result.error is not None:
        click.echo(f"kmagent: reload refused by pid {result.pid}, which keeps its running "
                   f"configuration: {result.error}", err=True)
        return EX_CONFIG
    click.echo(f"pid {result.pid}: configuration reloaded", err=True)
    return 0


@click.command()
@click.option("--timeout", type=click.FloatRange(min=0), metavar="S",
              help="Give up when nothing was delivered for S seconds "
                   "(default: 2 x [ship] max_backoff).")
@common_options
def flush(timeout: float | None) -> int:
    """Ship what is pending, then exit: 0 when nothing is left, 1 when events remain.

    If the daemon is running, waits for it to deliver instead of sending itself.

    \b
    Example:
      kmagent flush --timeout 30
    """
    from ..flush import flush as run_flush
    config = _config()
    bar = None
    if sys.stderr.isatty():
        bar = click.progressbar(length=1, label="flushing", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.length = total
            bar.update(done - bar.pos)

    result = run_flush(config, timeout=timeout, on_progress=progress)
    if bar is not None:
        bar.render_finish()
    who = f" (delivered by pid {result.waited_for})" if result.waited_for else ""
    if result.dead:
        click.echo(f"{result.dead} dead letters in the spool (kmagent dead list)", err=True)
    if result.remaining == 0:
        refused = f"; {result.dead_new} of them refused for good" if result.dead_new else ""
        click.echo(f"flushed {result.total} events{who}{refused}", err=True)
        return 0
    if result.no_key:
        reason = "they carry no API key and none is configured (api_key or api_key_file)"
    else:
        waited = 2 * config.max_backoff if timeout is None else timeout
        reason = f"nothing was delivered for {waited:g} s"
        if result.last_error:
            reason += f"; last error: {result.last_error}"
    click.echo(f"{result.remaining} of {result.total} events still pending: {reason}",
               err=True)
    return 1


@click.command()
@common_options
def check() -> int:
    """Validate the configuration and make one harmless request to the endpoint
    (GET /, no event, no key): 0 when the host answers, 1 when it cannot be reached.

    \b
    Example:
      kmagent check --config /etc/kmagent/config.toml
    """
    from ..config import shipping_config
    from ..shipping import make_sender
    config = _config()
    key_file = config.api_key_file
    # The probe sends no key: an app user, who may not read the service's credential,
    # can still check the rest (the daemon says at start if it cannot read it).
    unreadable = key_file is not None and not os.access(key_file, os.R_OK)
    if unreadable:
        config = dataclasses.replace(config, api_key_file=None)
    config = shipping_config(config)
    click.echo(f"configuration: {config.source}: ok")
    click.echo(f"spool:         {config.spool_backend} at {config.spool_path}")
    if unreadable:
        click.echo(f"api key:       in {key_file}, which this user cannot read (the "
                   "service can: not checked)")
    elif config.api_key is None:
        click.echo("api key:       none configured: events without a key of their own will wait")
    else:
        click.echo("api key:       configured")
    sender = make_sender(config)
    started = time.monotonic()
    outcome = sender.probe()
    sender.close()
    took = time.monotonic() - started
    if outcome.status is None:
        click.echo(f"endpoint:      {config.endpoint}: unreachable ({outcome.error})")
        return 1
    click.echo(f"endpoint:      {config.endpoint}: HTTP {outcome.status} in {took * 1000:.0f} ms")
    return 0
