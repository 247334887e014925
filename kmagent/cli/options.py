"""What every ``kmagent`` command shares: its options, the configuration they name,
the exit codes."""

from __future__ import annotations

from typing import Any

import click

from .. import logs
from ..config import LOG_LEVELS, Config, load_config

EX_USAGE = 2
EX_IOERR = 74
EX_CONFIG = 78


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # --config and --log-level are accepted before or after the command name: whichever
    # is given is kept on the root context, the one after the command winning.
    if value is not None:
        ctx.find_root().meta[f"kmagent.{param.name}"] = value
    return value


def common_options(fn):
    fn = click.option("--log-level", type=click.Choice(LOG_LEVELS), callback=_remember,
                      expose_value=False, is_eager=True,
                      help="Override [log] level.")(fn)
    fn = click.option("--config", "-c", callback=_remember,
                      expose_value=False, is_eager=True, metavar="PATH",
                      help="Configuration file (default: $KMAGENT_CONFIG, then "
                           "/etc/kmagent/config.toml, then built-in defaults).")(fn)
    return fn


def config() -> Config:
    """Load the configuration named on the command line and set up logging from it."""
    meta = click.get_current_context().find_root().meta
    config = load_config(meta.get("kmagent.config"))
    logs.setup(meta.get("kmagent.log_level") or config.log_level)
    logs.hide(config.api_key)
    return config
