"""The logs of Kissmetrics' own libraries, taken over and imported into the spool:
``importer`` (files, state, set-aside), ``takeover`` (renaming without losing a line),
``records`` and ``phpserial`` (the two formats), ``requests`` (what is sent),
``follower`` (``[km_log] dirs`` in the daemon)."""

from .follower import KmLogFollower
from .importer import ImportResult, KmLogImporter
from .requests import REASONS, BadRecord

__all__ = ["BadRecord", "ImportResult", "KmLogFollower", "KmLogImporter", "REASONS"]
