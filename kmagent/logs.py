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


# sd-daemon(3) priority prefixes (SD_DEBUG ... SD_CRIT): syslog levels.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: CRITICAL 2, ERROR 3, WARNING 4, INFO 6,
    anything lower 7 (DEBUG); levels in between take the next lower standard one's."""
    for threshold, value in _PRIORITIES:
        if levelno >= threshold:
            return value
    return 7


def stderr_is_journal() -> bool:
    """True when standard error is the journal's stream: ``JOURNAL_STREAM`` (systemd.exec:
    "DEV:INODE", decimal) names the device and inode of file descriptor 2. A child that
    inherited the variable but writes its stderr elsewhere does not match."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def as_error(message: str) -> str:
    """``message`` as the CLI prints a failure on stderr: each line with the error
    priority prefix when stderr is the journal's stream (so that the configuration a
    unit refuses, exit 78, shows in ``journalctl -p err``), else as it is."""
    if not stderr_is_journal():
        return message
    return "\n".join(f"<{priority(logging.ERROR)}>" + line for line in message.split("\n"))


class _JournalFormatter(logging.Formatter):
    """Prefixes every line of a record with ``<N>``, its syslog priority, as journald
    reads it (sd-daemon(3)). journald makes each line of the stream a separate entry and
    gives a line without a prefix the default priority (6, info): so every line of a
    traceback carries the prefix too, or ``journalctl -p err`` would show only its first."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup(level: str) -> None:
    """Log to standard error; under journald (JOURNAL_STREAM set) without timestamps,
    which the journal adds itself, and when stderr really is the journal's stream, with
    each line's priority as an sd-daemon ``<N>`` prefix."""
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    journal = stderr_is_journal()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact)
        if journal:
            handler.setFormatter(_JournalFormatter(fmt))


# Shorter strings are too common to replace everywhere (a one-letter test key would turn
# every such letter into ***); real Kissmetrics keys are 40 hex digits.
MIN_SECRET_CHARS = 6


def hide(secret: str | None) -> None:
    """Never let ``secret`` appear in a log line from now on."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        _redact.secrets.add(secret)
