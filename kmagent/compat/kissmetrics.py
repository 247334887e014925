"""py-KISSmetrics 1.1.0's public names and signatures, spooling through kmagent.

Migrating is one line::

    from KISSmetrics import Client, KM           # before: a blocking request per call
    from kmagent.compat.kissmetrics import Client, KM   # after: appended to the spool

Every call validates at once (``kmagent.InvalidEvent`` names the field and the rule) and
appends to the spool found as kmagent's configuration says; ``kmagent run`` sends it.
The key given to the constructor travels with each event. What differs from
py-KISSmetrics: calls return None instead of an HTTP response (there is none yet); the
tracking host is the agent's ``endpoint``, so ``trk_host``/``trk_scheme`` and ``host`` are
checked as before but not used for sending; ``path`` must be the method's own path
(e/s/a); every event carries its time with ``_d=1``, so a resend is never counted
twice; and what py-KISSmetrics sent wrongly is refused (README: "Coming from").
As in py-KISSmetrics, ``KM``'s identity belongs to the instance.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from uuid import UUID

from ..client import Client as _SpoolClient
from ..config import Config
from ..errors import InvalidEvent
from ..events import check_name

TRACKING_HOSTNAME = "trk.kissmetrics.io"
TRACKING_SCHEME = "http"
RECORD_PATH, SET_PATH, ALIAS_PATH = "e", "s", "a"
_PORT_SCHEMES = {"80": "http", "443": "https"}

__all__ = ["Client", "ClientCompat", "KM", "TRACKING_HOSTNAME", "TRACKING_SCHEME",
           "RECORD_PATH", "SET_PATH", "ALIAS_PATH"]


def _properties(properties: Any) -> dict[str, Any]:
    """py-KISSmetrics merged properties with dict.update (a mapping or (name, value)
    pairs) and sent every name and value as urlencode does: its ``str()``."""
    if not properties:
        return {}
    if not isinstance(properties, Mapping):
        try:
            properties = dict(properties)
        except (TypeError, ValueError):
            raise InvalidEvent("properties", "must be a mapping or (name, value) pairs, not "
                                             f"{type(properties).__name__}") from None
    return {_text("property name", name): _value(name, value)
            for name, value in properties.items()}


def _text(field: str, value: Any) -> Any:
    """A person, event name or property name as py-KISSmetrics sent it: ``str()`` of
    anything (bytes as their UTF-8 text); an int person stays an int (sent in decimal)."""
    if type(value) is str or value is None or (type(value) is int and field != "property name"):
        return value  # None is refused by kmagent: py-KISSmetrics sent the text "None"
    if isinstance(value, bytes):
        return _utf8(field, value)
    return str(value)


def _value(name: Any, value: Any) -> Any:
    """A property value as py-KISSmetrics sent it (``str()``), except what it sent
    wrongly, which kmagent refuses or fixes (README, "What differs"): containers (it
    sent their repr), booleans (``True``) and None (``None``)."""
    if value is None or isinstance(value, (str, int, float, Decimal, UUID)):
        return value  # kmagent's own rules (bool is an int: sent as true/false)
    if isinstance(value, bytes):
        return _utf8(f"property {name!r}", value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return value  # refused by kmagent, naming the property
    return str(value)  # dates, datetimes and other objects, as py-KISSmetrics sent them


def _utf8(field: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent(field, "bytes must be UTF-8 text (Kissmetrics reads UTF-8)") from None


def _only(path: str, expected: str) -> None:
    if path != expected:
        raise InvalidEvent("path", f"must be {expected!r} here: kmagent sends this call "
                                   f"to /{expected} (got {path!r})")


class Client:
    """py-KISSmetrics' ``Client``: ``record``, ``set`` and ``alias`` for any person.

    ``config`` and ``spool`` (keyword-only, not in py-KISSmetrics) choose the spool as
    ``kmagent.Client`` does; by default the configuration is found as usual.
    """

    def __init__(self, key: str, trk_host: str = TRACKING_HOSTNAME,
                 trk_scheme: str = TRACKING_SCHEME, *,
                 config: str | os.PathLike | Config | None = None,
                 spool: str | os.PathLike | None = None) -> None:
        if trk_scheme not in ("http", "https"):
            raise ValueError("trk_scheme must be one of (http, https)")
        self.key, self.trk_host, self.trk_scheme = key, trk_host, trk_scheme
        self._spool_client = _SpoolClient(key, config=config, spool=spool)

    def _client(self) -> _SpoolClient:
        # py-KISSmetrics reads self.key on every call: a key changed later is used.
        if self.key != self._spool_client.api_key:
            self._spool_client.api_key = check_name("key", self.key)
        return self._spool_client

    def record(self, person: Any, event: Any, properties: Mapping[str, Any] | None = None,
               timestamp: Any = None, path: str = RECORD_PATH) -> None:
        _only(path, RECORD_PATH)
        self._client().record(_text("person", person), _text("event", event),
                              _properties(properties), timestamp=timestamp or None)

    def set(self, person: Any, properties: Mapping[str, Any] | None = None,
            timestamp: Any = None, path: str = SET_PATH) -> None:
        _only(path, SET_PATH)
        self._client().set(_text("person", person), _properties(properties),
                           timestamp=timestamp or None)

    def alias(self, person: Any, identity: Any, path: str = ALIAS_PATH) -> None:
        _only(path, ALIAS_PATH)
        self._client().alias(_text("person", person), _text("identity", identity))

    def close(self) -> None:
        self._spool_client.close()


class ClientCompat:
    """py-KISSmetrics' ``ClientCompat`` (also ``KM``): identify once, then record."""

    def __init__(self, key: str, host: str | None = None, http_timeout: Any = None,
                 logging: bool = True, *, config: str | os.PathLike | Config | None = None,
                 spool: str | os.PathLike | None = None) -> None:
        self.key = key
        if host:
            trk_host, _, port = host.partition(":")
            if port not in _PORT_SCHEMES:
                raise ValueError("port in supplied host is not 80 or 443")
            scheme = _PORT_SCHEMES[port]
        else:
            trk_host, scheme = TRACKING_HOSTNAME, TRACKING_SCHEME
        self.client = Client(key, trk_host, scheme, config=config, spool=spool)
        self.identity: Any = None

    def identify(self, identity: Any) -> None:
        self.identity = identity

    def record(self, action: str, props: Mapping[str, Any] | None = None,
               path: str = RECORD_PATH, resp: bool = False) -> None:
        self.check_id_key()
        self.client.record(self.identity, action, props or {}, path=path)

    def set(self, data: Mapping[str, Any], path: str = SET_PATH, resp: bool = False) -> None:
        self.check_id_key()
        self.client.set(self.identity, data, path=path)

    def alias(self, name: str, alias_to: str, path: str = ALIAS_PATH, resp: bool = False) -> None:
        self.check_init()
        self.client.alias(name, alias_to, path=path)

    def log_file(self) -> str:
        """Where py-KISSmetrics said it logged (it never wrote there either); kmagent
        logs through the ``logging`` module, and the daemon to its journal."""
        return "/tmp/kissmetrics_error.log"

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)

    def reset(self) -> None:
        """Forget the identity and the key: calls raise until both are given again."""
        self.identity = None
        self.key = None

    def check_identify(self) -> None:
        if self.identity is None:
            raise InvalidEvent("person", "call identify(person) first")

    def check_init(self) -> None:
        if self.key is None:
            raise InvalidEvent("key", "no API key: set .key after reset()")

    def check_id_key(self) -> None:
        self.check_init()
        self.check_identify()


KM = ClientCompat
