"""``kmagent testhost``: a stand-in tracking host, to watch events arrive."""

from __future__ import annotations

from typing import Any

import click


@click.command()
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

    from ..testhost import StandInHost

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
