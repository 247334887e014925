"""``kmagent export``: events in the spool as lines of Kissmetrics' newline-JSON import
format, for bulk backfills: one JSON object a line with ``_p`` and ``_t``, ``_n`` for an
event, ``_p2`` for an alias, every other key a property (values as they would be sent).
"""

from __future__ import annotations

import json
from .errors import InvalidEvent
from .events import ALIAS, EVENT
from .protocol import split_query
from .spool import Spool


def import_line(path: str, query: str, created: float) -> str:
    """One stored request as an import line. An alias carries no time of its own: it is
    given the time it was recorded (the import format requires ``_t``)."""
    fields, properties = split_query(query)
    line: dict[str, object] = {"_p": fields["_p"]}
    if path == EVENT:
        line["_n"] = fields["_n"]
    elif path == ALIAS:
        line["_p2"] = fields["_n"]
    line["_t"] = int(fields["_t"]) if "_t" in fields else int(created)
    line.update(properties)
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def export_lines(spool: Spool, *, dead: bool = False, key: str | None = None,
                 configured_key: str | None = None) -> list[str]:
    """Import lines for every pending event (or every dead letter), oldest first.

    An import is for one Kissmetrics product, that is one API key: events recorded with
    a key of their own are told apart from those sent with ``configured_key``. With
    events of several keys, ``key`` must choose one (InvalidEvent says so otherwise)."""
    requests = [(path, query, api_key or configured_key, created)
                for path, query, api_key, created in spool.requests(dead=dead)]
    keys = {api_key for _, _, api_key, _ in requests}
    if key is None and len(keys) > 1:
        raise InvalidEvent("--key", f"these events belong to {len(keys)} API keys (one "
                                    "Kissmetrics product each): export one key at a time")
    return [import_line(path, query, created) for path, query, api_key, created in requests
            if key is None or api_key == key]
