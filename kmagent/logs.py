"""Logging set-up for the commands, and the guarantee that API keys never reach a log."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Iterable

from .protocol import quote_param


# Any key in a request target, including keys that events carry of their own.
_KEY_IN_URL = re.compile(r"([?&]_k=)[^&\s\"']*")


def redact(text: str, secrets: "Iterable[str]") -> str:
    """Hide API keys in text bound for a log, an error or status: every ``_k=`` value in
    a URL, and each secret, raw and percent-encoded."""
    text = _KEY_IN_URL.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote_param(secret), "***")
    return text


class _Redact(logging.Filter):
    """Replaces secrets (raw and percent-encoded) and every ``_k=`` value in every record
    before it is written, whoever logged it (the sender logs request targets at debug level)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # A traceback can hold a URL too; the formatter uses exc_text when it is set.
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
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


# Shorter strings are too common to replace everywhere (a one-letter test key would turn
# every such letter into ***); real Kissmetrics keys are 40 hex digits.
MIN_SECRET_CHARS = 6


def hide(secret: str | None) -> None:
    """Never let ``secret`` appear in a log line from now on."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        _redact.secrets.add(secret)
