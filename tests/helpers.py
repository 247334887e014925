"""What tests call: the real ``kmagent`` command in processes, a daemon started and
stopped, waits on a condition, what a spool holds, a filesystem filled up."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

API_KEY = "test-key"


def kmagent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kmagent", *args]


def run_kmagent(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run the kmagent command to completion and capture its output."""
    return subprocess.run(kmagent_cmd(*args), capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy(), **kwargs)


def start_kmagent(*args: str, **kwargs) -> subprocess.Popen:
    """Start the kmagent command in the background (its stderr is captured)."""
    return subprocess.Popen(kmagent_cmd(*args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            **kwargs)


def wait_for(predicate: Callable[[], object], timeout: float = 20.0,
             interval: float = 0.02) -> object:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout`` seconds.
    The pause grows to 0.1 s: a long wait need not look 50 times a second (polls
    that parse thousands of requests cost the CPU the processes under test need)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)
        interval = min(interval * 1.25, max(interval, 0.1))


def stored_rows(spool_path) -> list[tuple[str, str, str | None]]:
    """(path, query, api_key) of every event in a spool, oldest first: the rows of a
    SQLite spool, or every valid line of a jsonl spool's files."""
    if Path(spool_path).is_dir():
        from kmagent.protocol import encode
        from kmagent.spool.jsonl.line import BadLine, from_line
        rows = []
        files = sorted(Path(spool_path).glob("events.*.jsonl")) + [
            Path(spool_path) / "events.jsonl"]
        for file in files:
            for line in file.read_bytes().splitlines(keepends=True) if file.exists() else []:
                try:
                    event, _ = from_line(line)
                except BadLine:
                    continue
                rows.append((*encode(event), event.api_key))
        return rows
    conn = sqlite3.connect(spool_path)
    try:
        return conn.execute("SELECT path, query, api_key FROM events ORDER BY id").fetchall()
    finally:
        conn.close()


def record_many(config, count: int, prefix: str = "e") -> None:
    """``count`` events from ``person0``…, named ``"<prefix> <n>"``, each with ``n``."""
    from kmagent import Client
    client = Client(config=config)
    for n in range(count):
        client.record(f"person{n}", f"{prefix} {n}", {"n": n})
    client.close()


def status(config) -> dict:
    """``kmagent status --json`` for this configuration, as a real command."""
    result = run_kmagent("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def figures(config) -> dict:
    """What ``kmagent status --json`` prints, read in-process: for polls, where a
    command each time would cost a Python start (~0.4 s of CPU) per look."""
    from kmagent.report import read_status
    return read_status(config).to_json()


def shipper_pid(config) -> int | None:
    """What ``status`` says as ``daemon_pid`` (the holder of the spool's shipper lock),
    read in-process: a poll of ``kmagent status`` costs a Python start each time."""
    from kmagent.config import load_config
    from kmagent.lock import ShipperLock
    settings = load_config(config)
    path = settings.spool_path
    lock = (path.with_name(path.name + ".lock") if settings.spool_backend == "sqlite"
            else path / "shipper.lock")
    return ShipperLock(lock).holder()


def start_daemon(config) -> subprocess.Popen:
    """``kmagent run`` in the background, returned once it holds the spool. Its stderr
    is read as it comes (a pipe left unread would block a daemon that logs a lot)."""
    daemon = start_kmagent("run", "--config", str(config))
    lines: list[str] = []
    daemon.drained = lines
    daemon.drainer = threading.Thread(target=lambda: lines.extend(daemon.stderr),
                                      daemon=True)
    daemon.drainer.start()
    try:
        wait_for(lambda: daemon.poll() is not None or shipper_pid(config) == daemon.pid,
                 timeout=20)
    except AssertionError:
        daemon.kill()  # never left running behind a failed test, loading the machine
        daemon.wait(10)
        raise
    if daemon.poll() is not None:
        daemon.drainer.join(10)
        raise AssertionError(f"kmagent run exited {daemon.returncode}: "
                             f"{''.join(lines)[-3000:]}")
    return daemon


def stop(process: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> int:
    """Signal the process, wait for it, and keep its stderr in ``process.log``."""
    process.send_signal(sig)
    if hasattr(process, "drainer"):
        process.wait(timeout)
        process.drainer.join(10)
        process.log = "".join(process.drained)
    else:
        _, process.log = process.communicate(timeout=timeout)
    return process.returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fill(directory, leave: int = 0, name: str = "filler") -> None:
    """What another program does: take every byte left on the filesystem holding
    ``directory`` (then give back ``leave`` bytes)."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass  # full at this granularity; try smaller pieces
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


def shipping_session(spool):
    """The spool's shipping session for this test, its shipper lock taken (and held
    until the test's process exits or the spool's lock file goes)."""
    from kmagent.lock import ShipperLock
    lock = ShipperLock(spool.lock_path)
    assert lock.try_acquire(), "another shipper holds the spool"
    session = spool.ship(lock)
    session.lock = lock  # kept alive with the session
    return session


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """``kmagent ARGS`` in this process, its output captured by click's CliRunner:
    for commands whose process is not what is tested (help, argument and
    configuration errors, short commands), a fraction of a process start each."""
    import logging

    from click.testing import CliRunner

    from kmagent.cli import main
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the command sets up its own logging
    try:
        with CliRunner().isolation() as (out, err, *_):
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    finally:
        root.handlers[:], root.level = handlers, level
    return subprocess.CompletedProcess(["kmagent", *args], code, stdout, stderr)


def terminate(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a server the test started, and SIGKILL it if it will not stop in time."""
    process.send_signal(signal.SIGTERM)
    try:
        process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def sender_for(url: str, **options):
    """A Sender to ``url`` with short timeouts and the key "secret-key"."""
    from kmagent.sender import Sender
    settings = dict(connect_timeout=2, read_timeout=2, api_key="secret-key")
    settings.update(options)
    return Sender(url, **settings)
