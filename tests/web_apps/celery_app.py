"""A Celery app for the tests: tasks that identify and record, one that fails, on a
filesystem broker (no server) in CELERY_BROKER_DIR."""

import os

from celery import Celery

from kmagent import KM, InvalidEvent
from kmagent.web.celery import scope_tasks

if os.environ.get("WEB_SPOOL"):
    KM.init(spool=os.environ["WEB_SPOOL"])

folder = os.environ.get("CELERY_BROKER_DIR", "/tmp/kmagent-celery")
app = Celery("celery_app", broker="filesystem://")
app.conf.update(broker_transport_options={"data_folder_in": folder,
                                          "data_folder_out": folder,
                                          "control_folder": folder + "-control"},
                task_ignore_result=True, worker_hijack_root_logger=False)
# The person a task is for, when its caller names one: the "person" keyword argument.
scope_tasks(identify=lambda task, args, kwargs: kwargs.get("person"))


def record(event: str, n: int) -> None:
    try:
        KM.record(event, {"req": f"t{n}"})
    except InvalidEvent:
        pass  # an anonymous task records nothing


@app.task
def signed_up(n: int, login: str, person: str | None = None) -> None:
    KM.identify(login)  # as a task that signs someone up would
    record("Signed Up", n)


@app.task
def report(n: int, person: str | None = None) -> None:
    record("Report", n)


@app.task
def failing(n: int, login: str) -> None:
    KM.identify(login)
    raise RuntimeError("the task failed")
