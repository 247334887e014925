"""kmagent.web.celery.scope_tasks: a task's person is the task's only, in a real
prefork worker (one child, so every task runs in the same process and thread) and
eagerly, failures included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("celery")
import web_scenario  # noqa: E402
from helpers import terminate, wait_for  # noqa: E402

APPS = Path(__file__).parent / "web_apps"

# (task, args, kwargs, what it records: person or None)
TASKS = [("signed_up", (0, "alice"), {}, "alice"), ("report", (1,), {}, None),
         ("failing", (2, "mallory"), {}, None), ("report", (3,), {}, None),
         ("report", (4,), {"person": "bob"}, "bob"), ("report", (5,), {}, None),
         ("signed_up", (6, "carol"), {"person": "bob"}, "carol"), ("report", (7,), {}, None)]


def expected() -> dict[str, list[tuple[str, str]]]:
    names = {"signed_up": "Signed Up", "report": "Report"}
    return {f"t{args[0]}": [(names[task], person)]
            for task, args, _, person in TASKS if person}


@pytest.fixture
def celery_env(tmp_path, spool_path, monkeypatch):
    broker = tmp_path / "broker"
    broker.mkdir()
    monkeypatch.setenv("CELERY_BROKER_DIR", str(broker))
    monkeypatch.setenv("WEB_SPOOL", str(spool_path))
    monkeypatch.syspath_prepend(str(APPS))
    sys.modules.pop("celery_app", None)
    import celery_app
    yield celery_app
    sys.modules.pop("celery_app", None)
    from kmagent import KM
    KM.clear_identity()


def test_a_prefork_worker_scopes_each_task(celery_env, spool_path):
    for task, args, kwargs, _ in TASKS:
        getattr(celery_env, task).apply_async(args, kwargs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), *sys.path])}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork",
         "--concurrency", "1", "--loglevel", "WARNING", "--without-heartbeat",
         "--without-mingle", "--without-gossip"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(web_scenario.recorded(spool_path)) >= len(expected())
                 or worker.poll() is not None, timeout=60)
        assert worker.poll() is None, worker.stderr.read()[-3000:]
        wait_for(lambda: not list(Path(os.environ["CELERY_BROKER_DIR"]).iterdir()),
                 timeout=30)  # every message taken, the last tasks done
    finally:
        terminate(worker)
    assert web_scenario.recorded(spool_path) == expected()


def test_eager_tasks_in_this_thread_are_scoped_too(celery_env, spool_path):
    for task, args, kwargs, _ in TASKS:
        getattr(celery_env, task).apply(args, kwargs)  # a failure is kept in its result
    assert web_scenario.recorded(spool_path) == expected()


def test_one_task_id_running_in_two_threads_at_once_leaves_no_one_behind(celery_env,
                                                                         spool_path):
    # A redelivered message, or a task id chosen for deduplication, under a threads pool.
    import threading
    from kmagent import KM
    from kmagent.identity import current_request
    both = threading.Barrier(2)
    first_done = threading.Event()
    after = {}

    @celery_env.app.task
    def sync_account(n: int, login: str) -> None:
        KM.identify(login)
        both.wait(10)
        if login == "ben":
            first_done.wait(10)  # ann's run finishes first
        celery_env.record("Synced", n)

    def worker(n: int, login: str) -> None:
        try:
            sync_account.apply((n, login), task_id="same-id")
        finally:
            first_done.set() if login == "ann" else None
        celery_env.report.apply((n + 10,))  # nobody identified: records nothing
        after[login] = (current_request(), KM._client is not None)
    # Bound to the app here, once: a task made at run time and first applied from two
    # threads at once races in Celery's own lazy binding (its request stack is None).
    assert None not in (sync_account.request_stack, celery_env.report.request_stack)
    threads = [threading.Thread(target=worker, args=a) for a in ((0, "ann"), (1, "ben"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert web_scenario.recorded(spool_path) == {"t0": [("Synced", "ann")],
                                                 "t1": [("Synced", "ben")]}
    assert [request for request, _ in after.values()] == [None, None]
