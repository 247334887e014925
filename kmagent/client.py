"""The producer side: Client (person explicit) and KM (Kissmetrics' module-level style).

Nothing here touches the network: each call validates, freezes the event's time and
appends it to the spool. It raises only for the caller's own mistakes (InvalidEvent)
and for a spool it cannot write (SpoolError).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from . import identity
from .config import Config, load_config
from .errors import InvalidEvent
from .events import check_name, check_person, make_alias, make_event, make_set
from .spool import open_configured


class Client:
    """Record events for any person; thread-safe and fork-safe.

    >>> km = Client()                                  # doctest: +SKIP
    >>> km.record("bob@example.com", "Signed Up", {"Plan": "Pro", "Amount": 99.95})
    """

    def __init__(self, api_key: str | None = None, *,
                 config: str | os.PathLike | Config | None = None,
                 spool: str | os.PathLike | None = None) -> None:
        self.api_key = None if api_key is None else check_name("api_key", api_key)
        cfg = config if isinstance(config, Config) else load_config(config)
        self._spool = open_configured(cfg, spool)

    def record(self, person: str | int, event: str | Mapping[str, Any], props: Mapping[str, Any] | None = None,
               *, timestamp: Any = None) -> None:
        """``person`` did ``event`` (with ``props``); ``record(person, props)`` is a set."""
        if type(event) is not str and isinstance(event, Mapping) and props is None:
            return self.set(person, event, timestamp=timestamp)
        self._spool.append(make_event(person, event, props, timestamp=timestamp,
                                      api_key=self.api_key, now=time.time()))

    def set(self, person: str | int, props: Mapping[str, Any], *, timestamp: Any = None) -> None:
        """Properties of ``person``, without an event."""
        self._spool.append(make_set(person, props, timestamp=timestamp,
                                    api_key=self.api_key, now=time.time()))

    def alias(self, person: str | int, identity: str | int) -> None:
        """``person`` and ``identity`` are the same person (irreversible)."""
        self._spool.append(make_alias(person, identity, api_key=self.api_key))

    def close(self) -> None:
        self._spool.close()

    def __repr__(self) -> str:
        return f"<kmagent.Client spool={str(self._spool.path)!r}>"


class _KM:
    """``kmagent.KM``: module-level calls with a current identity per thread / task."""

    def __init__(self) -> None:
        self._client: Client | None = None
        self._lock = threading.Lock()

    def init(self, api_key: str | None = None, *, config: str | os.PathLike | None = None,
             spool: str | os.PathLike | None = None) -> None:
        """Choose the key and spool; optional (the first call uses the configuration)."""
        client = Client(api_key, config=config, spool=spool)
        with self._lock:
            old, self._client = self._client, client
        if old is not None:
            old.close()

    def identify(self, person: str | int) -> None:
        """Who the current person is, in this thread or task (no request is sent); in a
        web request (kmagent.web), until that request ends."""
        identity.identify(check_person("person", person))

    def clear_identity(self) -> None:
        """Forget the current person in this thread or task."""
        identity.identify(None)

    def identified(self, person: str | int) -> contextlib.AbstractContextManager[None]:
        """``with KM.identified(person):`` ``person`` is the current person inside the
        block; whatever was current before is back after it, exceptions included."""
        return identity.identified(check_person("person", person))

    def _get_client(self) -> Client:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = Client()
                client = self._client
        return client

    def _client_and_person(self) -> tuple[Client, str]:
        person = identity.current_person()
        if person is None:
            raise InvalidEvent("person", "call KM.identify(person) first, in this thread or task")
        return self._get_client(), person

    def record(self, event: str | Mapping[str, Any], props: Mapping[str, Any] | None = None, *,
               timestamp: Any = None) -> None:
        """The current person did ``event``; ``record(props)`` is a set."""
        client, person = self._client_and_person()
        client.record(person, event, props, timestamp=timestamp)

    def set(self, props: Mapping[str, Any], *, timestamp: Any = None) -> None:
        """Properties of the current person."""
        client, person = self._client_and_person()
        client.set(person, props, timestamp=timestamp)

    def alias(self, person: str | int, identity: str | int) -> None:
        """Two identities are one person (needs no current identity)."""
        self._get_client().alias(person, identity)


KM = _KM()
