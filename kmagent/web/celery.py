"""Celery: ``kmagent.web.celery.scope_tasks()`` once, where the worker imports the app.

A worker process runs task after task in the same thread, so a person set with
``KM.identify`` in one task would still be current in the next. With ``scope_tasks``
each task starts with no current person, or with ``identify(task, args, kwargs)``'s
answer, and ``KM.identify`` inside a task lasts until that task ends, failures
included (Celery's task_prerun and task_postrun signals).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from . import request_for

# The requests of the tasks running, per thread: the same task id may run in two
# threads at once (a redelivered message, a threads pool).
_running = threading.local()


def _open() -> dict[str, contextlib.AbstractContextManager]:
    if not hasattr(_running, "tasks"):
        _running.tasks = {}
    return _running.tasks


def scope_tasks(identify: Callable[[Any, tuple, dict], Any] | None = None) -> None:
    """Give every task of this process a scope of its own (idempotent)."""
    from celery import signals

    def hook(found: tuple) -> Any:
        return identify(*found)

    def started(task_id: str, task: Any, args: tuple = (), kwargs: dict | None = None,
                **_: Any) -> None:
        request = request_for(hook if identify else None,
                              (task, tuple(args or ()), kwargs or {}))
        entered = request.entered()
        entered.__enter__()
        _open()[task_id] = entered

    def finished(task_id: str, **_: Any) -> None:
        entered = _open().pop(task_id, None)
        if entered is not None:
            entered.__exit__(None, None, None)

    signals.task_prerun.connect(started, weak=False, dispatch_uid="kmagent.task_prerun")
    signals.task_postrun.connect(finished, weak=False, dispatch_uid="kmagent.task_postrun")
