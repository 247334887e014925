"""App patterns that are Kissmetrics' own libraries, writing the query logs the
daemon takes over ([km_log])."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .app import App
from .registry import API_KEY, EVENT_NAMES, pattern


# -- Kissmetrics' own libraries, writing the query logs kmagent takes over ([km_log]) --
# Each writes as its library does: open, append one record, close; km 1.3.0, km.php and
# kissmetrics-php take no lock, kmts takes an flock. A record is ledgered "ok" once its
# write() returned whole: from then on it is kmagent's to deliver.
KM_LOG_DIRS = ("km", "kmts", "kmphp", "kissmetrics_php")


def km_log_dir(workdir: Path, style: str) -> Path:
    return workdir / "km-logs" / style


def _php_string(text: str) -> str:
    return f's:{len(text.encode())}:"{text}";'


def km_log_record(style: str, kind: str, fields: dict[str, str]) -> bytes:
    """One record as the library ``style`` logs it, newline included."""
    if style == "kissmetrics_php":  # its Delayed transport: PHP serialize()d arrays
        inner = "".join(_php_string(k) + _php_string(v) for k, v in fields.items())
        record = (f"a:1:{{i:0;a:2:{{i:0;{_php_string(kind)}i:1;"
                  f"a:{len(fields)}:{{{inner}}}}}}}")
    else:
        from urllib.parse import quote
        record = f"/{kind}?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}"
                                         for k, v in fields.items())
    return record.encode() + b"\n"


def km_log_writer(app: App, style: str) -> None:
    import fcntl
    rng = app.rng
    name = "kissmetrics_query.log" if style in ("kmphp", "kissmetrics_php") \
        else "kissmetrics_production_query.log"
    path = km_log_dir(app.workdir, style) / name
    while app.running():
        tid = app.tid()
        person = f"person{rng.randrange(50)}"
        kind = rng.choice("eeees")
        fields = {"_k": API_KEY, "_p": person, "tid": tid, "who": person,
                  "_t": str(int(time.time())), "_d": "1"}
        if kind == "e":
            fields.update({"_n": rng.choice(EVENT_NAMES), "pad": "z" * rng.randrange(200)})
        record = km_log_record(style, kind, fields)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if style == "kmts":
                    fcntl.flock(fd, fcntl.LOCK_EX)
                written = os.write(fd, record)
            finally:
                os.close(fd)
        except OSError as exc:
            app.ledger.line("raised", tid, "OSError", json.dumps(str(exc)))
            app.pace(rng)
            continue
        if written == len(record):
            app.ledger.line("ok", tid)
        else:
            app.ledger.line("raised", tid, "short_write", json.dumps(f"{written} bytes"))
        app.pace(rng)


for _style in KM_LOG_DIRS:
    pattern(f"km_log_{_style}", f"{_style}-style writer of a Kissmetrics query log",
            weight=0.5)(lambda app, style=_style: km_log_writer(app, style))
