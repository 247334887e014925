"""The ``kmagent`` command: parse, load the configuration, call the library.

Exit codes: 0 ok; 1 flush left events pending (or ``check`` failed); 2 invalid input;
74 the spool cannot be used; 78 configuration error (so systemd's
``RestartPreventExitStatus=78`` stops a restart loop). Standard output carries only the
command's own output; logs and messages go to standard error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from . import __version__, logs
from .cli_options import common_options, config as _config
from .cli_spool import dead, export, import_
from .config import Config
from .errors import ConfigError, InvalidEvent, KmagentError, SpoolError

if TYPE_CHECKING:  # read lazily: status is not the only command
    from .report import Status

EX_USAGE = 2
EX_IOERR = 74
EX_CONFIG = 78

log = logging.getLogger("kmagent")


def _properties(pairs: tuple[str, ...]) -> dict[str, str]:
    props: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidEvent(f"property {pair!r}", "expected NAME=VALUE")
        props[name] = value
    return props


def _client(config: Config):
    from .client import Client
    return Client(config=config)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kmagent")
@common_options
def cli() -> None:
    """kmagent: log events to a local spool, ship them to Kissmetrics.

    \b
    Quick tour:
      kmagent record bob@example.com "Signed Up" Plan=Pro Amount=99.95
      kmagent status
      kmagent run          # the shipping daemon, in the foreground
      kmagent flush        # ship what is pending, then exit
    """


@cli.command()
@common_options
def run() -> int:
    """Ship the spool continuously until SIGTERM or SIGINT (exit 0); SIGHUP reloads
    the configuration. Under systemd (Type=notify) it reports READY, STATUS, WATCHDOG
    and STOPPING.

    \b
    Example:
      kmagent run --config /etc/kmagent/config.toml
    """
    from .daemon import Daemon
    daemon = Daemon(_config(), reload=_config)
    daemon.install_signal_handlers()
    return daemon.run()


@cli.command(name="reload")
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
    from .reloading import reload
    result = reload(_config(), pid)
    if result.error is not None:
        click.echo(f"kmagent: reload refused by pid {result.pid}, which keeps its running "
                   f"configuration: {result.error}", err=True)
        return EX_CONFIG
    click.echo(f"pid {result.pid}: configuration reloaded", err=True)
    return 0


@cli.command()
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
    from .flush import flush as run_flush
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common_options
def status(as_json: bool) -> int:
    """Show the spool's figures: pending, dead, oldest pending age, the shipper.

    \b
    Example:
      kmagent status --json
    """
    from .report import read_status
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


@cli.command()
@common_options
def check() -> int:
    """Validate the configuration and make one harmless request to the endpoint
    (GET /, no event, no key): 0 when the host answers, 1 when it cannot be reached.

    \b
    Example:
      kmagent check --config /etc/kmagent/config.toml
    """
    from .config import shipping_config
    from .shipping import make_sender
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


TIMESTAMP_HELP = "Unix seconds when it happened (default: now)."


@cli.command()
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


@cli.command(name="set")
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


@cli.command()
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


@cli.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8089, show_default=True)
@click.option("--status", "answer", type=click.IntRange(100, 599), default=200,
              show_default=True, help="HTTP status to answer with.")
@click.option("--delay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to wait before answering.")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests answered 503, at random.")
@click.option("--reset-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of connections reset without an answer, at random.")
def testhost(port: int, answer: int, delay: float, fail_rate: float, reset_rate: float) -> int:
    """Run a stand-in tracking host on 127.0.0.1 that prints every request it gets.

    Point kmagent at it with  endpoint = "http://127.0.0.1:8089"  to watch events
    arrive without a Kissmetrics account.

    \b
    Example:
      kmagent testhost --port 8089
    """
    import threading
    from urllib.parse import unquote

    from .testhost import StandInHost

    def show(request: Any) -> None:
        click.echo(f"{request.status or 'RST'} GET {unquote(request.target)}")

    try:
        host = StandInHost(port, status=answer, delay=delay, fail_rate=fail_rate,
                           reset_rate=reset_rate, on_request=show)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}")
    click.echo(f"stand-in tracking host on {host.url} (Ctrl-C to stop)", err=True)
    with host:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


for _command in (dead, import_, export):
    cli.add_command(_command)


def _fail(message: str) -> None:
    click.echo(logs.as_error(message), err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command and turn every known failure into its exit code."""
    try:
        code = cli.main(args=argv, prog_name="kmagent", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        _fail("aborted")
        code = 1
    except ConfigError as exc:
        _fail(f"kmagent: configuration error: {exc}")
        code = EX_CONFIG
    except InvalidEvent as exc:
        _fail(f"kmagent: invalid event: {exc}")
        code = EX_USAGE
    except SpoolError as exc:
        _fail(f"kmagent: {exc}")
        code = EX_IOERR
    except KmagentError as exc:
        _fail(f"kmagent: {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code or 0)
