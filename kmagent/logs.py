"""Logging set-up for the commands, and the guarantee that API keys never reach a log."""

from __future__ import annotations

import logging
import os
import sys

from .protocol import quote_param


class _Redact(logging.Filter):
    """Replaces secrets (raw and percent-encoded) in every record before it is written,
    whoever logged it (urllib3 logs request URLs at debug level, ``_k`` included)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "***").replace(quote_param(secret), "***")
            record.msg, record.args = message, None
        return True


_redact = _Redact()


def setup(level: str) -> None:
    """Log to standard error; under journald (JOURNAL_STREAM set) without timestamps,
    which the journal adds itself."""
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact)


def hide(secret: str | None) -> None:
    """Never let ``secret`` appear in a log line from now on."""
    if secret:
        _redact.secrets.add(secret)
