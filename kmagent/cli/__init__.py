"""The ``kmagent`` command: parse, load the configuration, call the library.

Exit codes: 0 ok; 1 flush left events pending (or ``check`` failed); 2 invalid input;
74 the spool cannot be used; 78 configuration error (so systemd's
``RestartPreventExitStatus=78`` stops a restart loop). Standard output carries only the
command's own output; logs and messages go to standard error.
"""

from __future__ import annotations

import sys

import click

from .. import __version__, logs
from ..errors import ConfigError, InvalidEvent, KmagentError, SpoolError
from .events import alias, record, set_
from .options import EX_CONFIG, EX_IOERR, EX_USAGE, common_options
from .shipping import check, flush, reload_, run
from .spool import dead, export, import_
from .status import status
from .testhost import testhost


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


for _command in (run, reload_, flush, status, check, record, set_, alias, testhost,
                 dead, import_, export):
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
