"""Importing the cron logs of Kissmetrics' own libraries (km, kmts, PHP): real log
files, real flock, real `kmagent` commands and a real loopback host."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import run_in_process, start_daemon, stop, stored_rows, wait_for

from kmagent.kmlog import BadRecord, KmLogImporter
from kmagent.kmlog.requests import from_request_line
from kmagent.spool import open_spool

KEY = "km-app-key"


@pytest.fixture(params=["sqlite", "jsonl"])
def backend(request) -> str:
    return request.param


def logged(path: str, **params: str) -> str:
    """A line as km/kmts write it: CGI-escaped, _k first."""
    from urllib.parse import urlencode
    return f"/{path}?" + urlencode({"_k": KEY, **params}) + "\n"


def append_as_km_does(path: Path, text: str) -> None:
    """km's writer: open for append, exclusive flock, one write."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(text)


def km_dir(tmp_path: Path) -> Path:
    logs = tmp_path / "km"
    logs.mkdir()
    append_as_km_does(logs / "kissmetrics_production_query.log",
                      logged("e", _p="bob@example.com", _n="Signed Up", _t="1700000000",
                             _d="1", Plan="Pro Plus")
                      + "this line is not a request\n"
                      + logged("s", _p="bob@example.com", _t="1700000100", Age="30"))
    # km_send renamed the log and died mid-file: nobody would ever send these.
    append_as_km_does(logs / "1700000500kissmetrics_production_sending.log",
                      logged("e", _p="ann", _n="Viewed", _t="1700000200")  # no _d
                      + logged("a", _p="ann", _n="ann@example.com", _t="1700000300"))
    append_as_km_does(logs / "kissmetrics_query.log",  # the older, env-less name
                      logged("e", _p="cat", _n="Paid", _t="1700000400", Amount="9.95"))
    return logs


def query_log_of(tmp_path: Path, events: int) -> tuple[Path, Path]:
    """A log directory whose query log holds ``events`` events: (directory, log)."""
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_production_query.log"
    append_as_km_does(log, "".join(logged("e", _p=f"p{n}", _n="Logged", _t="1700000000")
                                   for n in range(events)))
    return logs, log


# --- one line ------------------------------------------------------------------------

def test_a_logged_request_is_sent_as_logged_with_its_key_apart_and_d_after_t():
    event = from_request_line(
        b"/e?_n=Signed+Up&_p=bob%40example.com&_k=K1&_d=0&_t=1700000000&Plan=Pro%2B", now=0)
    assert (event.kind, event.person, event.name, event.time, event.api_key) == (
        "e", "bob@example.com", "Signed Up", 1700000000, "K1")
    assert event.query == "_n=Signed+Up&_p=bob%40example.com&_t=1700000000&_d=1&Plan=Pro%2B"


def test_sets_aliases_and_full_urls_are_read():
    assert from_request_line(b"/s?_p=bob&_k=K&_t=1700000000&Age=30", now=0).kind == "s"
    alias = from_request_line(b"/a?_p=bob&_n=robert&_k=K&_t=1700000000", now=0)
    assert (alias.kind, alias.person, alias.name) == ("a", "bob", "robert")
    assert from_request_line(b"https://trk.kissmetrics.io/e?_p=b&_n=x&_k=K&_t=1700000000",
                             now=0).name == "x"


def test_a_line_without_t_is_dated_when_imported():
    event = from_request_line(b"/e?_p=bob&_n=Did&_k=K", now=1800000000.5)
    assert event.time == 1800000000 and event.query.endswith("&_t=1800000000&_d=1")


def test_bytes_that_are_not_utf8_are_kept_as_logged():
    """km_send sends them; so does kmagent, escape for escape."""
    event = from_request_line(b"/e?_p=bob&_n=caf%E9&x=%FF%FE&raw=\xe9 t&_t=1700000000", now=0)
    assert event.query == "_p=bob&_n=caf%E9&x=%FF%FE&raw=%E9%20t&_t=1700000000&_d=1"


@pytest.mark.parametrize("line, reason", [
    (b"GET /e?_p=bob", "unreadable"),
    (b"/x?_p=bob&_n=y", "unreadable"),
    (b"/e?_n=Did&_k=K&_t=1700000000", "person"),
    (b"/e?_p=bob&_k=K&_t=1700000000", "event"),
    (b"/e?_p=bob&_n=Did&_t=yesterday", "time"),
    (b"/e?_p=bob&_n=Did&_t=1000000000", "time"),
    (b"/e?_p=bob&_n=Did&_t=1234567890000", "time"),
    (b"/s?_p=bob&_t=1700000000", "empty"),
    (b"/e?_p=bob&_n=" + b"E" * 256, "name"),
    (b"/s?_p=bob&big=" + b"y" * 8193, "size"),
])
def test_what_kissmetrics_cannot_accept_is_set_aside_with_its_reason(line, reason):
    with pytest.raises(BadRecord) as info:
        from_request_line(line, now=1700000000)
    assert info.value.reason == reason


# --- the command -------------------------------------------------------------------------

def test_import_moves_every_logged_event_and_a_second_import_sends_nothing(
        tmp_path, host, write_config, spool_path):
    logs = km_dir(tmp_path)
    config = write_config(host, api_key=None)
    result = run_in_process("import", "km-log", str(logs), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "imported 5 events from 3 files" in result.stdout
    assert "1 set aside (unreadable: " in result.stderr
    # Every log taken over, read once settled, and deleted; the orphan too.
    assert list(logs.iterdir()) == []

    assert run_in_process("flush", "--timeout", "20", "--config", str(config)).returncode == 0
    sent = {(r.path, dict(r.params).get("_p")): dict(r.params) for r in host.delivered()}
    assert len(sent) == 5
    signed_up = sent[("e", "bob@example.com")]
    assert (signed_up["_k"], signed_up["_n"], signed_up["_t"], signed_up["_d"],
            signed_up["Plan"]) == (KEY, "Signed Up", "1700000000", "1", "Pro Plus")
    viewed = sent[("e", "ann")]  # logged without _d: sent with its own _t and _d=1
    assert (viewed["_t"], viewed["_d"]) == ("1700000200", "1")
    assert sent[("s", "bob@example.com")]["Age"] == "30"
    assert sent[("a", "ann")]["_n"] == "ann@example.com"
    assert sent[("e", "cat")]["Amount"] == "9.95"

    again = run_in_process("import", "km-log", str(logs), "--config", str(config))
    assert again.returncode == 0 and "imported 0 events" in again.stdout
    assert run_in_process("flush", "--timeout", "5", "--config", str(config)).returncode == 0
    assert len(host.received) == 5
    bad = (spool_path.parent / (spool_path.name + ".km-log-bad.jsonl")
           if backend_is_sqlite(spool_path) else spool_path / "km-log-bad.jsonl")
    assert "this line is not a request" in bad.read_text()


def backend_is_sqlite(spool_path: Path) -> bool:
    return spool_path.suffix == ".db"


def test_a_missing_directory_is_a_usage_error(tmp_path, write_config):
    result = run_in_process("import", "km-log", str(tmp_path / "nope"),
                         "--config", str(write_config()))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_writer_appending_during_imports_loses_nothing_and_nothing_is_doubled(
        tmp_path, spool_path, backend):
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_production_query.log"
    log.touch()
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, time
        for n in range(600):
            with open({str(log)!r}, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.write(f"/e?_k=K&_p=p{{n}}&_n=Wrote&_t=1700000000\\n")
            if n % 50 == 0:
                time.sleep(0.01)
    """)])
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0)
    imported = 0
    while writer.poll() is None:
        imported += importer.import_dirs([logs]).imported
    assert writer.wait() == 0
    imported += importer.import_dirs([logs]).imported
    spool.close()
    persons = sorted(int(q.split("_p=p")[1].split("&")[0]) for _, q, _ in stored_rows(spool_path))
    assert imported == 600 and persons == list(range(600))


def test_a_crash_before_a_log_read_is_deleted_stores_nothing_twice(
        tmp_path, spool_path, backend, monkeypatch):
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_production_query.log"
    append_as_km_does(log, logged("e", _p="first", _n="A", _t="1700000000"))
    spool = open_spool(spool_path, backend=backend)

    def crash(path):
        raise OSError(5, "crashed before deleting the log")
    monkeypatch.setattr("kmagent.kmlog.importer.os.unlink", crash)
    errors = KmLogImporter(spool, settle_s=0).import_dirs([logs]).errors
    assert len(errors) == 1 and "crashed before deleting" in errors[0]
    monkeypatch.undo()
    append_as_km_does(log, logged("e", _p="second", _n="B", _t="1700000001"))
    assert KmLogImporter(spool, settle_s=0).import_dirs([logs]).imported == 1  # the new line
    spool.close()
    assert [q.split("&")[0] for _, q, _ in stored_rows(spool_path)] == ["_p=first", "_p=second"]
    assert list(logs.iterdir()) == []


def test_a_log_replaced_under_a_name_read_before_is_read_from_its_start(
        tmp_path, spool_path, backend):
    """What is remembered of a file (its inode, its first bytes) must be its own: a
    record left by a crash, naming another file's offset, never skips a line."""
    import json
    logs, log = query_log_of(tmp_path, 2)
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0)
    importer.state_path.write_text(json.dumps({str(log): {
        "inode": log.stat().st_ino, "offset": 40, "head": "0" * 64}}))
    assert importer.import_dirs([logs]).imported == 2
    spool.close()


def test_the_daemon_follows_km_log_dirs(tmp_path, host, write_config):
    logs = tmp_path / "km"
    logs.mkdir()
    config = write_config(host, extra=f'[km_log]\ndirs = ["{logs}"]\n')
    daemon = start_daemon(config)
    try:
        log = logs / "kissmetrics_staging_query.log"
        for n in range(5):
            append_as_km_does(log, logged("e", _p=f"p{n}", _n="Followed", _t="1700000000"))
            time.sleep(0.05)
        wait_for(lambda: len(host.delivered()) == 5)
        assert {dict(r.params)["_k"] for r in host.delivered()} == {KEY}
        wait_for(lambda: list(logs.iterdir()) == [])  # taken over, read, deleted
    finally:
        assert stop(daemon) == 0


def test_km_log_dirs_must_be_a_list(tmp_path, write_config):
    config = write_config(extra='[km_log]\ndirs = "/var/log/km"\n')
    result = run_in_process("status", "--config", str(config))
    assert result.returncode == 78 and "[km_log] dirs" in result.stderr


def test_two_imports_at_once_store_each_line_once(tmp_path, spool_path, backend, write_config):
    logs = tmp_path / "km"
    logs.mkdir()
    for n in range(3):
        append_as_km_does(logs / f"17000000{n}0kissmetrics_production_sending.log", "".join(
            logged("e", _p=f"p{n}-{i}", _n="Raced", _t="1700000000") for i in range(200)))
    append_as_km_does(logs / "kissmetrics_production_query.log", "".join(
        logged("e", _p=f"q-{i}", _n="Raced", _t="1700000000") for i in range(200)))
    config = write_config()
    importers = [subprocess.Popen([sys.executable, "-m", "kmagent", "import", "km-log",
                                   str(logs), "--config", str(config)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    counts = [int(p.communicate(timeout=60)[0].split()[1]) for p in importers]
    assert sum(counts) == 800
    assert len(stored_rows(spool_path)) == 800


def test_a_large_log_is_read_a_chunk_at_a_time_and_the_daemon_takes_one_per_turn(
        tmp_path, spool_path, backend, monkeypatch):
    monkeypatch.setattr("kmagent.kmlog.importer.CHUNK_BYTES", 1000)
    logs, log = query_log_of(tmp_path, 100)
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0)
    first = importer.import_dirs([logs], budget=1000)
    assert first.more and 0 < first.imported < 100 and log.stat().st_size > 0
    rest = importer.import_dirs([logs])
    assert first.imported + rest.imported == 100 and not rest.more
    assert list(logs.iterdir()) == []
    spool.close()
    assert len(stored_rows(spool_path)) == 100


def test_the_follower_survives_a_full_spool_and_says_so(tmp_path, spool_path, backend, caplog):
    from kmagent.errors import SpoolFull
    from kmagent.kmlog import KmLogFollower
    logs = km_dir(tmp_path)
    spool = open_spool(spool_path, backend=backend)

    def full(events):
        raise SpoolFull("spool is at its max_bytes")
    spool.append_many = full
    follower = KmLogFollower(spool)
    assert follower.follow((logs,)) is False  # no exception: shipping goes on
    assert "max_bytes" in caplog.text
    spool.close()


def test_a_log_that_cannot_be_read_is_named_and_the_others_imported(tmp_path, write_config):
    logs = tmp_path / "km"
    logs.mkdir()
    (logs / "kissmetrics_query.log").mkdir()  # not a file
    append_as_km_does(logs / "kissmetrics_production_query.log",
                      logged("e", _p="bob", _n="Fine", _t="1700000000"))
    result = run_in_process("import", "km-log", str(logs), "--config", str(write_config()))
    assert result.returncode == 1
    assert "imported 1 events" in result.stdout
    assert "kissmetrics_query.log: a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_follower_skips_a_turn_while_an_import_holds_the_lock(tmp_path, spool_path, backend):
    from kmagent.kmlog import KmLogFollower
    from kmagent.spool.files import flocked
    logs = km_dir(tmp_path)
    spool = open_spool(spool_path, backend=backend)
    follower = KmLogFollower(spool)
    held = flocked(Path(str(follower._importer.state_path) + ".lock"), create=True)
    try:
        started = time.monotonic()
        assert follower.follow((logs,)) is False
        assert time.monotonic() - started < 1  # did not wait for the import
        assert stored_rows(spool_path) == []
    finally:
        os.close(held)
    follower._last = -1.0
    follower.follow((logs,))
    spool.close()
    assert len(stored_rows(spool_path)) == 5


def test_a_log_cut_short_while_held_is_read_again_not_spun_on(tmp_path, spool_path, backend,
                                                              monkeypatch):
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_production_query.log"
    append_as_km_does(log, logged("e", _p="bob", _n="Cut", _t="1700000000"))
    spool = open_spool(spool_path, backend=backend)
    real_pread, calls = os.pread, []

    def cut_after_the_stat(fd, n, at):  # the file shrank between its fstat and the read
        calls.append(n)
        return b"" if len(calls) == 2 else real_pread(fd, n, at)  # 1: the format check
    monkeypatch.setattr("kmagent.kmlog.importer.os.pread", cut_after_the_stat)
    first = KmLogImporter(spool, settle_s=0).import_dirs([logs]).imported  # returns at all
    monkeypatch.undo()
    assert first + KmLogImporter(spool, settle_s=0).import_dirs([logs]).imported == 1
    spool.close()


def test_a_query_log_renamed_midway_resumes_under_its_new_name(tmp_path, spool_path, backend,
                                                                monkeypatch):
    monkeypatch.setattr("kmagent.kmlog.importer.CHUNK_BYTES", 200)
    logs, log = query_log_of(tmp_path, 10)
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0)
    first = importer.import_dirs([logs], budget=200).imported
    log.rename(logs / "1700000999kissmetrics_production_sending.log")  # km_send took it
    rest = importer.import_dirs([logs]).imported
    spool.close()
    assert first + rest == 10 and len(stored_rows(spool_path)) == 10


def test_a_state_file_of_the_wrong_shape_is_started_over(tmp_path, spool_path, backend):
    logs = km_dir(tmp_path)
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0)
    importer.state_path.write_text("[]")
    assert importer.import_dirs([logs]).imported == 5
    spool.close()


# --- what a crash, a kill or a deploy leaves behind ----------------------------------------

@pytest.mark.parametrize("where", ["head", "tail", "mid-line"])
def test_nul_bytes_a_crash_left_are_skipped_counted_and_never_sent(
        where, tmp_path, write_config, spool_path):
    """A crash can leave a log's last blocks zeroed (ext4's delayed allocation): at the
    head of a log just created, or before what the app wrote after the reboot. The NULs
    are no record: skipped, counted, and the first line after them is kept."""
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_production_query.log"
    before = "".join(logged("e", _p=f"a{n}", _n="Before", _t="1700000000") for n in range(3))
    after = "".join(logged("e", _p=f"b{n}", _n="After", _t="1700000000") for n in range(3))
    nuls = b"\0" * 300
    log.write_bytes({"head": nuls + after.encode(),
                     "tail": before.encode() + nuls + after.encode(),
                     "mid-line": before.encode() + b"/e?_k=K&_p=torn&_n" + nuls + after.encode(),
                     }[where])
    result = run_in_process("import", "km-log", str(logs), "--config", str(write_config()))
    assert result.returncode == 0, result.stderr
    assert "1 set aside (nul:" in result.stderr
    queries = [q for _, q, _ in stored_rows(spool_path)]
    wanted = {"head": 3, "tail": 6, "mid-line": 6}[where]
    assert len(queries) == wanted and all("\0" not in q and "%00" not in q for q in queries)
    assert sum("_p=b" in q for q in queries) == 3  # the first line after the NULs too
    assert not any("_p=torn" in q for q in queries)  # torn by the crash: set aside
    assert list(logs.iterdir()) == []


def test_a_kill_between_taking_a_log_over_and_recording_it_stores_nothing_twice(
        tmp_path, write_config, spool_path, backend):
    """SIGKILL right after the rename, before anything else is saved; the app logs
    again meanwhile (the query log's name exists anew). What was read in place before
    the kill is not read again: the taken file is known by its identity, not its name."""
    logs, log = query_log_of(tmp_path, 0)
    config = write_config()
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from kmagent.kmlog import KmLogImporter, takeover
        from kmagent.spool import open_spool
        spool = open_spool(Path({str(spool_path)!r}), backend={backend!r})
        importer = KmLogImporter(spool, settle_s=0.2)
        for n in range(5):  # follower turns: read where it lies, not taken over
            with open({str(log)!r}, "a") as fh:
                fh.write("".join(f"/e?_k=K&_p=p{{n}}-{{i}}&_n=Logged&_t=1700000000\\n"
                                 for i in range(200)))
            importer.import_dirs([Path({str(logs)!r})], take_over=False)
        real = takeover.take_over
        def take_over_then_die(path):
            real(path)
            os.kill(os.getpid(), signal.SIGKILL)
        takeover.take_over = take_over_then_die
        importer.import_dirs([Path({str(logs)!r})])
    """)], timeout=60)
    assert killed.returncode == -9
    assert len(stored_rows(spool_path)) == 1000
    append_as_km_does(log, logged("e", _p="after", _n="Logged", _t="1700000000"))
    result = run_in_process("import", "km-log", str(logs), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "imported 1 events" in result.stdout
    assert len(stored_rows(spool_path)) == 1001 and list(logs.iterdir()) == []


def test_a_symlinked_log_is_named_and_left_as_it_is(tmp_path, write_config, spool_path):
    """Renaming a link would take the link, not the file: the target would never be
    emptied and the apps would log to a new plain file. A link is left where it is,
    its target untouched, and named (exit 1); the other logs are imported."""
    logs = tmp_path / "km"
    logs.mkdir()
    target = tmp_path / "shared.log"
    target.write_text(logged("e", _p="linked", _n="Logged", _t="1700000000"))
    link = logs / "kissmetrics_production_query.log"
    link.symlink_to(target)
    orphan = logs / "1700000500kissmetrics_production_sending.log"
    orphan.symlink_to(target)
    append_as_km_does(logs / "kissmetrics_query.log",
                      logged("e", _p="plain", _n="Logged", _t="1700000000"))
    config = write_config()
    for _ in range(2):
        result = run_in_process("import", "km-log", str(logs), "--config", str(config))
        assert result.returncode == 1 and "imported 1 events" in result.stdout
        assert f"{link}: a symbolic link" in result.stderr
        assert f"{orphan}: a symbolic link" in result.stderr
        assert "Traceback" not in result.stderr
        append_as_km_does(logs / "kissmetrics_query.log",
                          logged("e", _p="plain2", _n="Logged", _t="1700000000"))
    assert link.is_symlink() and orphan.is_symlink()
    assert target.read_text() == logged("e", _p="linked", _n="Logged", _t="1700000000")
    assert sorted(q.split("&")[0] for _, q, _ in stored_rows(spool_path)) == [
        "_p=plain", "_p=plain2"]


def test_the_follower_says_once_that_a_log_is_a_symlink(tmp_path, spool_path, backend, caplog):
    from kmagent.kmlog import KmLogFollower
    logs = tmp_path / "km"
    logs.mkdir()
    (tmp_path / "shared.log").write_text(logged("e", _p="x", _n="L", _t="1700000000"))
    (logs / "kissmetrics_query.log").symlink_to(tmp_path / "shared.log")
    spool = open_spool(spool_path, backend=backend)
    follower = KmLogFollower(spool)
    for _ in range(3):
        follower._last = -1.0
        follower.follow((logs,))
    spool.close()
    assert caplog.text.count("a symbolic link") == 1
    assert (logs / "kissmetrics_query.log").is_symlink()
