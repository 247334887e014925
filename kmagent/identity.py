"""Who ``KM`` records for: the current person, per thread and per asyncio task.

One ContextVar holds it, never a global: each thread and task has its own, and a task
or a thread-pool call starts with a copy of its creator's, so what one of them
identifies is its own. Its value is a person (``KM.identify``, ``KM.identified``), a
``LookedUp`` (a framework's signed-in user, found when an event is recorded), or a
``Request``: a web request or task (kmagent.web) that this context runs and has not
yet identified anyone in.

A Request is entered around the app, and again around each chunk of a streamed body and
its close(): each entry makes current what the request last left current and puts back,
on the way out, what was there before, so nothing outlives the request on the thread.
``KM.identify`` in a worker thread of a request (a sync endpoint or dependency that an
ASGI framework runs in its thread pool, on a copy of the request's context) is also
noted on the Request itself, so that it holds for the rest of that request, as it would
if the code ran in the request's own thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator

from .errors import InvalidEvent
from .events import check_person


class LookedUp:
    """The person a framework knows (its signed-in user), looked up each time an event
    is recorded, so that a login or logout during the request counts from then on.
    When the lookup finds no one, ``otherwise`` (what was current before) applies."""

    __slots__ = ("resolve", "otherwise")

    def __init__(self, resolve: Callable[[], str | int | None],
                 otherwise: Current = None) -> None:
        self.resolve = resolve
        self.otherwise = otherwise

    def person(self) -> str | None:
        try:
            found = self.resolve()
        except Exception as exc:  # the framework's lookup (a session, a database)
            raise InvalidEvent("person", "the request's person could not be found: "
                               f"{type(exc).__name__}: {exc}") from exc
        if found is not None:
            return check_person("person", found)
        return person_of(self.otherwise)


class Request:
    """What is current for one web request (or task), carried across its resumptions."""

    __slots__ = ("start", "left", "pooled")

    def __init__(self, start: Current = None) -> None:
        self.start = start  # the hook's person, a LookedUp, an outer request's
        self.left: Current | object = _NOTHING  # what its own thread or task set
        self.pooled: str | None = None  # identified in one of its worker threads

    def person(self) -> str | None:
        return self.pooled if self.pooled is not None else person_of(self.start)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This request is current inside the block (see the module's docstring)."""
        token = _identity.set(self if self.left is _NOTHING else self.left)
        request = _request.set(self)
        try:
            yield
        finally:
            left = _identity.get()
            if left is not self:
                self.left = left
            reset(_request, request)
            reset(_identity, token)


_NOTHING = object()
Current = str | LookedUp | Request | None

_identity: contextvars.ContextVar[Current] = contextvars.ContextVar(
    "kmagent_identity", default=None)
_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "kmagent_request", default=None)


def person_of(value: Current) -> str | None:
    if isinstance(value, (LookedUp, Request)):
        return value.person()
    return value


def current_person() -> str | None:
    return person_of(_identity.get())


def current() -> Current:
    """What is current, for a framework helper to fall back on (LookedUp's otherwise)."""
    return _identity.get()


def current_request() -> Request | None:
    """The request this thread or task runs, if any (an outer middleware's)."""
    return _request.get()


def identify(person: str | None) -> None:
    """``person`` (checked) is current in this thread or task; in a worker thread of a
    request, for the rest of that request too."""
    _identity.set(person)
    request = _request.get()
    if request is not None and not _in_event_loop():
        request.pooled = person


def _in_event_loop() -> bool:
    # Without asyncio imported there is no loop: the producer need not import it (~40 ms).
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def identified(person: str) -> Iterator[None]:
    token = _identity.set(person)
    try:
        yield
    finally:
        reset(_identity, token)


def reset(var: contextvars.ContextVar, token: contextvars.Token) -> None:
    """``var.reset(token)``, also when the block was left in another copy of the
    context than it was entered in (Starlette runs each chunk of a sync body, and each
    half of a sync dependency, in a fresh copy): then the value from before is set."""
    try:
        var.reset(token)
    except ValueError:
        old = token.old_value
        var.set(None if old is contextvars.Token.MISSING else old)
