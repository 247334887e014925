"""One SQLite connection per process per spool file, and safe forks.

POSIX locks belong to the process: a descriptor of the database closed anywhere in the
process drops every lock it holds on the file, a live connection's included, and the
connection then writes into a WAL that another process may checkpoint and delete. The
invariant is tested where the kernel keeps it: while a process has the spool open,
/proc/locks shows it holding a lock on the database file, whatever the app did.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from helpers import wait_for

from kmagent.spool import open_spool

PRELUDE = textwrap.dedent("""
    import json, os, sys, time
    import kmagent
    from kmagent import Client, KM
    from kmagent.compat import kissmetrics as compat
    CONFIG, DB = sys.argv[1], sys.argv[2]

    def holds_lock():
        st = os.stat(DB)
        for line in open("/proc/locks"):
            parts = line.split()
            if parts[1] == "->":
                continue  # a waiter, not a holder
            if parts[1] == "POSIX" and int(parts[4]) == os.getpid() \\
                    and int(parts[5].split(":")[2]) == st.st_ino:
                return True
        return False

    def report(**figures):
        print(json.dumps({"pid": os.getpid(), "locked": holds_lock(), **figures}), flush=True)
""")

PATTERNS = {
    "two_clients": """
        a, b = Client(config=CONFIG), Client(config=CONFIG)
        a.record("p", "a"); b.record("p", "b"); b.close(); a.record("p", "a2")
        report()
    """,
    "status_in_the_app": """
        a = Client(config=CONFIG)
        a.record("p", "a"); kmagent.status(CONFIG); a.record("p", "a2")
        report()
    """,
    "km_init_after_use": """
        KM.init(config=CONFIG); KM.identify("p"); KM.record("a")
        KM.init(config=CONFIG); KM.record("b")
        report()
    """,
    "compat_per_request": """
        for n in range(50):
            km = compat.KM("key", config=CONFIG); km.identify("p"); km.record(f"request {n}")
        report()
    """,
    "fork_child_inherited_client": """
        a = Client(config=CONFIG); a.record("p", "parent")
        pid = os.fork()
        if pid == 0:
            a.record("p", "child"); report(); os._exit(0)
        os.waitpid(pid, 0); a.record("p", "parent again"); report()
    """,
    "fork_child_new_client": """
        a = Client(config=CONFIG); a.record("p", "parent")
        pid = os.fork()
        if pid == 0:
            Client(config=CONFIG).record("p", "child"); report(); os._exit(0)
        os.waitpid(pid, 0); a.record("p", "parent again"); report()
    """,
}


def run_pattern(body: str, config, spool_path) -> list[dict]:
    script = PRELUDE + textwrap.dedent(body)
    runner = subprocess.run([sys.executable, "-c", script, str(config), str(spool_path)],
                            capture_output=True, text=True, timeout=60)
    assert runner.returncode == 0, runner.stderr
    return [json.loads(line) for line in runner.stdout.splitlines()]


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_a_process_with_the_spool_open_holds_its_lock_on_the_database(
        pattern, write_config, spool_path):
    reports = run_pattern(PATTERNS[pattern], write_config(), spool_path)
    assert reports and all(r["locked"] for r in reports), reports
    assert sqlite3.connect(spool_path).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def stored(spool_path) -> list[str]:
    conn = sqlite3.connect(spool_path)
    try:
        return [q for (q,) in conn.execute("SELECT query FROM events ORDER BY id")]
    finally:
        conn.close()


def test_an_orphaned_child_still_holds_its_lock(write_config, spool_path, tmp_path):
    """The parent exits at once; the child's client (inherited) must take its own lock."""
    config = write_config()
    out_path = tmp_path / "orphan.json"
    script = PRELUDE + textwrap.dedent(f"""
        PARENT = os.getpid()
        a = Client(config=CONFIG); a.record("p", "parent")
        if os.fork() != 0:
            os._exit(0)
        while os.getppid() == PARENT:
            time.sleep(0.01)
        a.record("p", "orphan"); kmagent.status(CONFIG); a.record("p", "orphan 2")
        with open({str(out_path)!r}, "w") as fh:
            fh.write(json.dumps({{"locked": holds_lock()}}))
    """)
    subprocess.run([sys.executable, "-c", script, str(config), str(spool_path)],
                   check=True, timeout=60)
    wait_for(out_path.exists, timeout=20)
    wait_for(lambda: out_path.read_text(), timeout=5)
    assert json.loads(out_path.read_text()) == {"locked": True}
    assert len(stored(spool_path)) == 3


def test_handles_in_one_process_share_one_connection(spool_path):
    first, second = open_spool(spool_path), open_spool(spool_path)
    try:
        assert first._connection() is second._connection()
        second.close()  # the other handle's connection stays open
        first.append(_event())
        assert first.stats(0)["pending"] == 1
    finally:
        first.close()


def _event():
    from kmagent.events import make_event
    return make_event("bob", "Did", {}, now=1_700_000_000)


def test_nothing_but_sqlite_opens_the_database_file(spool_path, monkeypatch):
    """Every descriptor of the database file is SQLite's (a stray open and close would
    drop the process's locks)."""
    opened = []
    real_open = os.open

    def watching_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", watching_open)
    spool = open_spool(spool_path)
    spool.append(_event())
    spool.stats(0)
    spool.close()
    files = {f"{spool_path}{suffix}" for suffix in ("", "-wal", "-shm", "-journal")}
    assert not [p for p in opened if p in files]


def test_a_new_spool_file_gets_the_spool_mode_whatever_the_umask(spool_path):
    old = os.umask(0o077)
    try:
        open_spool(spool_path).close()
    finally:
        os.umask(old)
    assert os.stat(spool_path).st_mode & 0o777 == 0o660


def test_a_handle_used_after_close_opens_afresh_and_others_keep_theirs(spool_path):
    first, second = open_spool(spool_path), open_spool(spool_path)
    first.close()
    first.close()  # twice: harmless
    first.append(_event())  # used again: it joins the process's connection again
    second.close()
    first.append(_event())
    assert first.stats(0)["pending"] == 2
    first.close()
    third = open_spool(spool_path)
    assert third.stats(0)["pending"] == 2
    third.close()
