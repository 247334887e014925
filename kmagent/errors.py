"""The errors kmagent raises.

Every error the public API raises derives from ``KmagentError``; a raw ``sqlite3`` or
``OSError`` never escapes. Data travels as attributes so callers need not parse messages.
"""

from __future__ import annotations


class KmagentError(Exception):
    """Root of every error kmagent raises on purpose."""


class InvalidEvent(KmagentError, ValueError):
    """The event can never be delivered; ``field`` names the culprit, ``rule`` the limit."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class SpoolError(KmagentError):
    """The spool cannot be opened or written (disk full, read-only, permissions, format)."""


class SpoolDamaged(SpoolError):
    """The spool file is damaged (a bad disk, a lost lock): the daemon keeps it aside
    and salvages what it can read into a fresh spool; ``path`` is the damaged file."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class SpoolFull(KmagentError):
    """The spool is at ``[spool] max_bytes``, or its filesystem down to ``[spool]
    keep_free``, and ``when_full = "error"``."""


class ConfigError(KmagentError):
    """The configuration is wrong: ``source`` (file or variable), ``key`` and the rule."""

    def __init__(self, source: str, key: str | None, rule: str) -> None:
        self.source = source
        self.key = key
        self.rule = rule
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {rule}")
