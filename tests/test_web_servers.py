"""The web middleware under real servers, each serving the scenario of
web_scenario.py one request after another: gunicorn's gthread worker with one thread
(every request reuses it), with and without --preload (KM opened before the fork),
and uvicorn with a plain ASGI app and with FastAPI (sync endpoints in its thread pool),
uWSGI with one process and one thread, the app loaded before the fork or after."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import web_scenario
from helpers import free_port, terminate

APPS = Path(__file__).parent / "web_apps"
BIN = Path(sys.executable).parent


def serve(command: list[str], port: int, spool_path: Path) -> subprocess.Popen:
    """The server, once it accepts connections."""
    env = {**os.environ, "WEB_SPOOL": str(spool_path),
           "PYTHONPATH": os.pathsep.join([str(APPS), *sys.path])}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"{command[0]} exited {server.returncode}: "
                                 f"{server.stderr.read()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise AssertionError(f"{command[0]} did not listen on {port} within 30 s")


def run_scenario(command: list[str], port: int, spool_path: Path) -> None:
    steps = web_scenario.scenario()
    server = serve(command, port, spool_path)
    try:
        web_scenario.send_all(port, steps)
    finally:
        terminate(server)
    web_scenario.check(spool_path, steps)


@pytest.mark.parametrize("preload", [False, True], ids=["fork-then-import", "preload"])
def test_gunicorn_one_gthread_worker_one_thread(spool_path, preload):
    port = free_port()
    command = [str(BIN / "gunicorn"), "--worker-class", "gthread", "--workers", "1",
               "--threads", "1", "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
               *(["--preload"] if preload else []), "wsgi_app:app"]
    run_scenario(command, port, spool_path)


@pytest.mark.parametrize("module", ["asgi_app", "fastapi_app"])
def test_uvicorn(spool_path, module):
    port = free_port()
    command = [str(BIN / "uvicorn"), "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", f"{module}:app"]
    run_scenario(command, port, spool_path)


@pytest.mark.parametrize("lazy", [False, True], ids=["fork-after-load", "lazy-apps"])
def test_uwsgi_one_process_one_thread(spool_path, lazy):
    if not (BIN / "uwsgi").exists():
        pytest.skip("uWSGI is not installed (pip install pyuwsgi)")
    port = free_port()
    command = [str(BIN / "uwsgi"), "--http-socket", f"127.0.0.1:{port}", "--master",
               "--processes", "1", "--threads", "1", "--enable-threads", "--die-on-term",
               "--disable-logging", "--module", "wsgi_app:app",
               *(["--lazy-apps"] if lazy else [])]
    run_scenario(command, port, spool_path)
