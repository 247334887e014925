"""The SQLite spool's format: a spool written by an older kmagent is upgraded in place
with nothing lost, and a newer one is refused unless it says this kmagent may write."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import sqlite_utils
from helpers import start_daemon, stop, wait_for

from kmagent import SpoolError
from kmagent.spool import open_spool
from kmagent.spool.sqlite_schema import FORMAT_VERSION

FORMAT_1 = Path(__file__).parent / "fixtures" / "spool-format-1.db"  # see make_format_1_spool.py


@pytest.fixture
def format_1(spool_path) -> Path:
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FORMAT_1, spool_path)
    return spool_path


def contents(path: Path) -> dict[str, list[dict]]:
    db = sqlite_utils.Database(path)
    try:
        return {table: list(db[table].rows_where(order_by="id")) for table in ("events", "dead")}
    finally:
        db.close()


def test_a_format_1_spool_is_upgraded_in_place_and_keeps_every_row(format_1):
    before = contents(format_1)
    assert sqlite_utils.Database(format_1).execute("PRAGMA user_version").fetchone()[0] == 1
    assert (len(before["events"]), len(before["dead"])) == (100, 1)
    with open_spool(format_1) as spool:
        assert spool.stats(0)["pending"] == 100
    db = sqlite_utils.Database(format_1)
    assert db.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION == 2
    assert {"salvage_progress", "kmagent_format"} <= set(db.table_names())
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    assert contents(format_1) == before  # every row, every column, the leases too


def test_an_upgraded_spool_ships_everything_it_held(format_1, host, write_config):
    """The two events a killed daemon left in flight are recovered, the one waiting to
    retry goes when due, the dead letter stays dead: 100 requests, each once."""
    held = {row["query"] for row in contents(format_1)["events"]}
    config = write_config(host, extra="[ship]\nmax_backoff = 1\n")
    daemon = start_daemon(config)
    try:
        wait_for(lambda: len(host.delivered()) >= 100, timeout=60)
    finally:
        assert stop(daemon) == 0, daemon.log
    sent = [r.target.split("?", 1)[1] for r in host.delivered()]
    assert len(sent) == 100 and {dict(parse_qsl(q))["_p"] for q in sent} >= {"person0", "person99"}
    assert len(held) == 100 and all(any(h in q for q in sent) for h in held)
    with open_spool(format_1) as spool:
        assert spool.stats(0)["pending"] == 0 and spool.stats(0)["dead"] == 1


def _open_and_count(path: str, results) -> None:
    with open_spool(Path(path)) as spool:
        results.put(spool.stats(0)["pending"])


def test_two_processes_opening_an_old_spool_at_once_upgrade_it_once(format_1):
    results = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(
        target=_open_and_count, args=(str(format_1), results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert [results.get(timeout=5) for _ in procs] == [100] * 4
    db = sqlite_utils.Database(format_1)
    assert db["kmagent_format"].count == 1  # the step ran once


@pytest.mark.parametrize("writable_by, refused", [(2, False), (3, True)])
def test_a_newer_format_is_refused_unless_it_says_this_kmagent_may_write(
        spool_path, writable_by, refused):
    with open_spool(spool_path):
        pass
    with sqlite3.connect(spool_path) as conn:  # as a future kmagent would leave it
        conn.execute("PRAGMA user_version = 3")
        conn.execute("UPDATE kmagent_format SET writable_by = ?", (writable_by,))
    if refused:
        with pytest.raises(SpoolError, match="format 3 is newer .* upgrade kmagent"):
            open_spool(spool_path)
    else:
        with open_spool(spool_path) as spool:  # appends and ships, upgrades nothing
            spool.stats(0)
        with sqlite3.connect(spool_path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 3


@pytest.mark.parametrize("backend, names", [
    ("sqlite", {"lock": "spool.db.lock", "figures.json": "spool.db.lock.figures.json",
                "dropped": "spool.db.dropped", "ballast": "spool.db.ballast"}),
    ("jsonl", {"lock": "shipper.lock", "figures.json": "shipper.lock.figures.json",
               "dropped": "dropped", "ballast": "ballast"})])
def test_the_files_beside_a_spool_keep_their_names(tmp_path, backend, names):
    # A daemon of the previous version, running through an upgrade, and the new
    # commands (status, reload, flush) must meet at the same lock and figures.
    from kmagent.spool.files import sidecar
    spool = tmp_path / ("spool.db" if backend == "sqlite" else "spool.jsonl.d")
    for name, file in names.items():
        path = sidecar(spool, backend, name)
        assert path.name == file and path.parent == (spool if backend == "jsonl"
                                                     else tmp_path)
