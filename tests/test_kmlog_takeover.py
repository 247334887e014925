"""Migration from the real libraries' logs: the files km 1.3.0, kmts 3.1.0, km.php 1.1.1
and kissmetrics-php wrote (tests/fixtures/km-logs, with what each sent in its direct
mode), and writers that append as they do, with no lock, while the import runs."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

import pytest
from helpers import run_in_process, start_daemon, stop, stored_rows, wait_for

from kmagent.kmlog import KmLogImporter
from kmagent.spool import open_spool


pytestmark = pytest.mark.backends()  # each test taking ``backend``: on each

FIXTURES = Path(__file__).parent / "fixtures" / "km-logs"
# Per library: what Kissmetrics itself cannot take, by reason (the fixtures' README).
CANNOT_ACCEPT = {
    "km-1.3.0": {"time": 2, "size": 1, "name": 1, "empty": 1},
    "kmts-3.1.0": {"time": 2, "size": 1, "name": 1, "empty": 1},
    "km.php-1.1.1": {"time": 1, "size": 1, "name": 1, "empty": 1},
    "kissmetrics-php-master": {"time": 1, "size": 1, "name": 1},
}


def comparable(path: str, params: list[tuple[str, str]], library: str) -> tuple:
    """A request as compared with the library's own: ``_d`` left out (kmagent always
    sends 1: the time was frozen when logged), and kissmetrics-php's alias ``_t``, which
    its Delayed log adds and its direct mode does not send."""
    kept = [(n, v) for n, v in params if n != "_d" and not (
        library.startswith("kissmetrics-php") and path == "/a" and n == "_t")]
    return path, tuple(sorted(kept))


@pytest.mark.parametrize("library", sorted(CANNOT_ACCEPT))
def test_each_librarys_logs_and_orphan_are_sent_as_it_sent_them(
        library, tmp_path, host, write_config):
    logs = tmp_path / "logs"
    shutil.copytree(FIXTURES / library, logs)
    (logs / "expected.jsonl").unlink()
    config = write_config(host, api_key=None)
    # The commands' own code, run in this process (a Python start each spared): what
    # is compared is what they store and send, not how a process starts.
    result = run_in_process("import", "km-log", str(logs), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert list(logs.iterdir()) == []  # query log and orphan: read, stored, deleted
    for reason, count in CANNOT_ACCEPT[library].items():
        assert f"{count} set aside ({reason}:" in result.stderr
    assert run_in_process("flush", "--timeout", "20", "--config", str(config)).returncode == 0

    expected = [json.loads(line) for line in (FIXTURES / library / "expected.jsonl").open()]
    delivered = [r for r in host.delivered()]
    assert all(dict(r.params)["_d"] == "1" and "_t" in dict(r.params) for r in delivered)
    sent = collections.Counter(comparable("/" + r.path, r.params, library) for r in delivered)
    wanted = collections.Counter(comparable(e["path"], list(e["params"].items()), library)
                                 for e in expected)
    refused = sum(CANNOT_ACCEPT[library].values())
    assert sum(sent.values()) == len(expected) - refused
    assert not sent - wanted  # every request sent is one the library sent, byte for byte


def test_bytes_that_are_not_utf8_reach_the_host_as_logged(tmp_path, host, write_config):
    logs = tmp_path / "km"
    logs.mkdir()
    (logs / "kissmetrics_query.log").write_bytes(
        b"/e?_n=caf%E9&_p=bob&_k=K&_t=1700000000&bytes=%FF%FE\n")
    config = write_config(host)
    assert run_in_process("import", "km-log", str(logs), "--config", str(config)).returncode == 0
    assert run_in_process("flush", "--timeout", "20", "--config", str(config)).returncode == 0
    (request,) = host.delivered()
    raw = dict((unquote_to_bytes(n), unquote_to_bytes(v)) for n, _, v in (
        item.partition("=") for item in urlsplit(request.target).query.split("&")))
    assert (raw[b"_n"], raw[b"bytes"], raw[b"_k"]) == (b"caf\xe9", b"\xff\xfe", b"K")


def test_a_log_in_no_known_format_is_left_as_it_is(tmp_path, write_config, spool_path):
    logs = tmp_path / "km"
    logs.mkdir()
    odd = logs / "kissmetrics_query.log"
    odd.write_text('{"_p": "bob", "_n": "Did", "_t": 1700000000}\n')  # JSON: not ours
    (logs / "kissmetrics_production_query.log").write_text(
        "/e?_p=ann&_n=Did&_k=K&_t=1700000000\n")
    result = run_in_process("import", "km-log", str(logs), "--config", str(write_config()))
    assert result.returncode == 1 and "imported 1 events" in result.stdout
    assert f"{odd}: not a log kmagent reads" in result.stderr
    assert odd.read_text().startswith('{"_p": "bob"') and len(stored_rows(spool_path)) == 1


def test_an_imported_p2_is_sent_but_left_out_of_an_export(tmp_path, write_config):
    logs = tmp_path / "km"
    logs.mkdir()
    (logs / "kissmetrics_query.log").write_text(
        "/e?_p=bob&_n=Did&_k=K&_t=1700000000&_p2=ann\n/e?_p=cat&_n=Did&_k=K&_t=1700000000\n")
    config = write_config()
    assert run_in_process("import", "km-log", str(logs), "--config", str(config)).returncode == 0
    result = run_in_process("export", "--config", str(config))
    assert result.returncode == 1 and "1 left out: a property named '_p2'" in result.stderr
    assert [json.loads(line)["_p"] for line in result.stdout.splitlines()] == ["cat"]


# --- writers that take no lock -------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    log, style, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pause_every = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    for n in range(count):
        if style == "php":  # kissmetrics-php: a serialize()d array, a newline inside
            value = f"line1\\nline2 {n}"
            entry = ('a:1:{i:0;a:2:{i:0;s:1:"s";i:1;a:4:{s:2:"nl";s:%d:"%s";s:2:"_p";'
                     's:%d:"%s";s:2:"_t";i:1700000000;s:2:"_d";b:1;}}}'
                     % (len(value), value, len(f"w{n}"), f"w{n}"))
        else:  # km 1.3.0, km.php: one line
            entry = f"/e?_n=Wrote&_p=w{n}&_k=K&_t=1700000000"
        with open(log, "a") as fh:  # open, append, close: no flock
            fh.write(entry + "\\n")
        if n % pause_every == 0:
            time.sleep(0.005)
""")


def persons(spool_path) -> collections.Counter:
    found = collections.Counter()
    for _, query, _ in stored_rows(spool_path):
        found.update(v for n, v in parse_qsl(query) if n == "_p")
    return found


@pytest.mark.parametrize("style", ["km", "php"])
def test_writers_without_a_lock_lose_nothing_to_repeated_imports(
        tmp_path, spool_path, backend, style):
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_query.log"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER.replace("w{n}", f"w{i}-{{n}}"),
                                 str(log), style, "1500"]) for i in range(2)]
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0.2)
    while any(w.poll() is None for w in writers):
        importer.import_and_finish([logs], within=0.5)
    assert [w.wait() for w in writers] == [0, 0]
    importer.import_and_finish([logs])
    spool.close()
    found = persons(spool_path)
    assert set(found) == {f"w{i}-{n}" for i in range(2) for n in range(1500)}
    assert max(found.values()) == 1  # nothing twice
    assert list(logs.iterdir()) == []


def test_the_daemon_following_a_log_dir_loses_nothing_to_unlocked_writers(
        tmp_path, host, write_config, spool_path, monkeypatch):
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_production_query.log"
    config = write_config(host, extra=f'[km_log]\ndirs = ["{logs}"]\n')
    daemon = start_daemon(config)
    try:
        # 1000 lines, pausing every 20: the writer appends for as long (~0.3 s, the
        # follower's turns and its first takeover land while it writes) as 3000 lines
        # pausing every 100 did, for a third of the requests to ship.
        writer = subprocess.run([sys.executable, "-c", WRITER, str(log), "km", "1000",
                                 "20"], timeout=60)
        assert writer.returncode == 0
        wait_for(lambda: len(host.delivered()) >= 1000, timeout=60)
        wait_for(lambda: list(logs.iterdir()) == [], timeout=30)
        time.sleep(0.5)
    finally:
        assert stop(daemon) == 0
    sent = collections.Counter(dict(r.params)["_p"] for r in host.delivered())
    assert set(sent) == {f"w{n}" for n in range(1000)} and max(sent.values()) == 1


def test_a_writer_stopped_with_the_log_open_is_waited_for(tmp_path, spool_path, backend):
    """A writer that opened the log before it was taken over, then stopped (SIGSTOP, a
    slow disk) for longer than the settle time: the file is not finished while a
    process holds it open, so its line lands in the spool, not in a deleted file."""
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_query.log"
    log.write_text("/e?_n=First&_p=a&_k=K&_t=1700000000\n")
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        fh = open({str(log)!r}, "a")
        print("open", flush=True)
        sys.stdin.readline()  # held open, as a stopped writer would
        fh.write("/e?_n=Late&_p=b&_k=K&_t=1700000000\\n")
        fh.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "open\n"
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0.1)
    first = importer.import_and_finish([logs], within=0.5)
    assert first.imported == 1 and len(first.waiting) == 1  # not finished: held open
    writer.communicate("go\n", timeout=10)
    rest = importer.import_and_finish([logs], within=5)
    spool.close()
    assert rest.imported == 1 and not rest.waiting and list(logs.iterdir()) == []
    assert set(persons(spool_path)) == {"a", "b"}


def php_entry(person: str) -> bytes:
    """One kissmetrics-php Delayed entry, and its newline."""
    return (b'a:1:{i:0;a:2:{i:0;s:1:"e";i:1;a:4:{s:2:"_n";s:2:"Ev";s:2:"_p";s:%d:"%s";'
            b's:2:"_k";s:1:"K";s:2:"_t";i:1700000000;}}}\n' % (len(person), person.encode()))


def test_a_torn_php_entry_costs_only_itself(tmp_path, spool_path, backend):
    """A worker killed mid-fwrite (or a full disk) leaves an entry whose string runs
    past the data, with no newline; other workers append whole entries right after it.
    Only the torn part is set aside: reading starts again at the next entry."""
    import json
    logs = tmp_path / "km"
    logs.mkdir()
    log = logs / "kissmetrics_query.log"
    torn = b'a:1:{i:0;a:2:{i:0;s:1:"e";i:1;a:5:{s:4:"note";s:5000:"' + b"x" * 100
    log.write_bytes(b"".join(php_entry(f"p{n}") for n in range(5)) + torn
                    + b"".join(php_entry(f"p{n}") for n in range(5, 30)))
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0.1)
    result = importer.import_and_finish([logs], within=5)
    spool.close()
    assert result.imported == 30 and dict(result.set_aside) == {"unreadable": 1}
    assert set(persons(spool_path)) == {f"p{n}" for n in range(30)}
    (bad,) = [json.loads(line) for line in importer.bad_path.read_text().splitlines()]
    assert bad["line"].encode() == torn and "bytes" not in bad
    assert list(logs.iterdir()) == []


NOT_DUMPABLE_WRITER = textwrap.dedent("""
    import ctypes, sys
    fh = open(sys.argv[1], "a")
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0, as php-fpm's workers
    print("open", flush=True)
    sys.stdin.readline()  # stalled before its write
    fh.write("/e?_n=Late&_p=b&_k=K&_t=1700000000\\n")
""")
CHECK_SETTLED = textwrap.dedent("""
    import os, sys
    from kmagent.kmlog import takeover
    fd = os.open(sys.argv[1], os.O_RDONLY)
    st = os.fstat(fd)
    print(takeover.held_open(st), takeover.settled(fd, st, 0.1))
""")


def test_a_writer_whose_fds_cannot_be_seen_is_given_the_longer_settle_time(tmp_path):
    """php-fpm's workers are not dumpable: even of our own user, their /proc/<pid>/fd
    cannot be read, so a stalled one holding the taken file open is not seen. Where
    any process could not be inspected, a file is finished only once its last write is
    BLIND_SETTLE_S old, not SETTLE_S. (As root: writer and checker run as nobody.)"""
    import os
    from kmagent.kmlog import takeover
    as_nobody = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
                 if os.geteuid() == 0 else [])
    if as_nobody and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to run as another user")
    shared = Path(__import__("tempfile").mkdtemp())  # tmp_path is root's alone
    try:
        shared.chmod(0o777)
        log = shared / "kmagent-taken-1-kissmetrics_query.log"
        log.write_text("/e?_n=First&_p=a&_k=K&_t=1700000000\n")
        log.chmod(0o666)
        old = time.time() - 5  # older than SETTLE_S, younger than BLIND_SETTLE_S
        os.utime(log, (old, old))
        assert takeover.SETTLE_S < 5 < takeover.BLIND_SETTLE_S
        env = {"PYTHONPATH": str(Path(__file__).parent.parent), "PATH": "/usr/bin:/bin"}
        writer = subprocess.Popen(as_nobody + [sys.executable, "-c", NOT_DUMPABLE_WRITER,
                                               str(log)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert writer.stdout.readline() == "open\n"
            os.utime(log, (old, old))
            check = subprocess.run(as_nobody + [sys.executable, "-c", CHECK_SETTLED,
                                                str(log)], capture_output=True, text=True,
                                   env=env, timeout=30)
            assert check.stdout.split() == ["None", "False"], check.stderr  # unseen: wait
            older = time.time() - takeover.BLIND_SETTLE_S - 1
            os.utime(log, (older, older))
            check = subprocess.run(as_nobody + [sys.executable, "-c", CHECK_SETTLED,
                                                str(log)], capture_output=True, text=True,
                                   env=env, timeout=30)
            assert check.stdout.split() == ["None", "True"], check.stderr
        finally:
            writer.communicate("go\n", timeout=10)
    finally:
        shutil.rmtree(shared)


def test_an_orphan_a_live_sender_holds_open_is_not_read(tmp_path, spool_path, backend):
    """km_send still running beside kmagent (its cron job not yet removed) holds the
    sending log open while it sends it: kmagent leaves that file to it, rather than
    send each line a second time; once the sender is gone, an orphan is read."""
    logs = tmp_path / "km"
    logs.mkdir()
    orphan = logs / "1700000500kissmetrics_production_sending.log"
    orphan.write_text("/e?_n=Sending&_p=a&_k=K&_t=1700000000\n")
    old = time.time() - 10
    import os
    os.utime(orphan, (old, old))
    sender = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        fh = open({str(orphan)!r})
        print("open", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sender.stdout.readline() == "open\n"
    spool = open_spool(spool_path, backend=backend)
    importer = KmLogImporter(spool, settle_s=0.1)
    first = importer.import_and_finish([logs], within=0.5)
    sender.communicate("done\n", timeout=10)  # died without deleting it
    rest = importer.import_and_finish([logs], within=5)
    spool.close()
    assert first.imported == 0 and first.waiting == [str(orphan)]
    assert rest.imported == 1 and list(logs.iterdir()) == []
