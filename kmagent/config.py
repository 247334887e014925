"""One frozen Config: where it is found, its documented defaults, and its validation.

Lookup order: an explicit path (``--config`` or ``config=``), else ``$KMAGENT_CONFIG``,
else ``/etc/kmagent/config.toml``, else built-in defaults that work for a non-root user.
Anything wrong is refused at start with one line naming the file, the key and the rule.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import SplitResult, urlsplit

from .errors import ConfigError
from .spool import BACKENDS, DEFAULT_ROTATE_BYTES, DEFAULT_ROTATE_SECONDS

SYSTEM_CONFIG = Path("/etc/kmagent/config.toml")
ENV_CONFIG = "KMAGENT_CONFIG"

DEFAULT_ENDPOINT = "https://trk.kissmetrics.io"
DEFAULT_BACKEND = "sqlite"
DEFAULT_DURABILITY = "normal"
DEFAULT_CONCURRENCY = 16  # where the adaptive limit starts, or the fixed number
DEFAULT_MAX_CONCURRENCY = 64  # the adaptive limit's ceiling
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_MAX_BACKOFF = 60.0
DEFAULT_LOG_LEVEL = "info"
DEFAULT_MAX_AGE = 0.0  # never expire
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 1024**3
DEFAULT_WHEN_FULL = "error"
LOG_LEVELS = ("debug", "info", "warning", "error")


def default_spool_path(backend: str = DEFAULT_BACKEND) -> Path:
    """The spool under the user's state directory (XDG), so no root is needed: the file
    ``spool.db`` for SQLite, the directory ``spool.jsonl.d`` for jsonl."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state) / "kmagent" / ("spool.db" if backend == "sqlite" else "spool.jsonl.d")


@dataclass(frozen=True)
class Config:
    """Everything kmagent reads from its configuration, validated."""

    api_key: str | None = field(default=None, repr=False)  # never printed
    # Read only by the shipping side (see shipping_config): app users who record events
    # need not be able to read the key, e.g. a systemd credential.
    api_key_file: Path | None = None
    endpoint: str = DEFAULT_ENDPOINT
    spool_backend: str = DEFAULT_BACKEND
    spool_path: Path = field(default_factory=default_spool_path)
    durability: str = DEFAULT_DURABILITY
    max_bytes: int = DEFAULT_MAX_BYTES
    when_full: str = DEFAULT_WHEN_FULL
    # Free space producers leave on the spool's filesystem: bytes, a share ("10%"), or
    # None: 5 % of the filesystem, at most 64 MiB (spool/space.py).
    keep_free: int | str | None = None
    rotate_bytes: int = DEFAULT_ROTATE_BYTES
    rotate_seconds: float = DEFAULT_ROTATE_SECONDS
    # Requests at once: exactly ``concurrency``, or, when ``adapt_concurrency``, starting
    # there and adapting between 1 and ``max_concurrency`` (adaptive.py).
    concurrency: int = DEFAULT_CONCURRENCY
    adapt_concurrency: bool = True
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_backoff: float = DEFAULT_MAX_BACKOFF
    max_age: float = DEFAULT_MAX_AGE
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    proxy: str | None = None
    ca_file: Path | None = None
    log_level: str = DEFAULT_LOG_LEVEL
    metrics_listen: str | None = None
    metrics_textfile: Path | None = None
    km_log_dirs: tuple[Path, ...] = ()
    source: str = "built-in defaults"


# --- validators: each takes (value, base directory) and returns the clean value or
# raises ValueError with the rule; the loader adds file and key to the message.

def _string(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _path(value: Any, base: Path) -> Path:
    return base / os.path.expanduser(_string(value, base))


def _existing_file(value: Any, base: Path) -> Path:
    path = _path(value, base)
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


def _choice(*allowed: str) -> Callable[[Any, Path], str]:
    def check(value: Any, base: Path) -> str:
        if value not in allowed:
            raise ValueError("must be one of " + ", ".join(f'"{a}"' for a in allowed))
        return value
    return check


def _number(low: float, high: float, *, integer: bool = False) -> Callable[[Any, Path], float]:
    def check(value: Any, base: Path) -> float:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise ValueError(f"must be {kind} from {low:g} to {high:g}")
        return value if integer else float(value)
    return check


def _keep_free(value: Any, base: Path) -> int | str:
    """Bytes (an integer), or a share of the filesystem ("10%")."""
    if isinstance(value, str) and value.endswith("%"):
        try:
            share = float(value[:-1])
        except ValueError:
            share = -1.0
        if 0 <= share <= 50:
            return value
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**50:
        return value
    raise ValueError('must be a number of bytes (e.g. 67108864) or a share of the '
                     'filesystem from "0%" to "50%"')


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(parts: SplitResult) -> None:
    try:
        parts.port  # urllib parses it lazily, and raises here
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None


def _endpoint(value: Any, base: Path) -> str:
    url = _string(value, base).rstrip("/")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        # urlsplit drops tabs and line breaks silently: the URL sent would not be this
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https:// URL, e.g. https://trk.kissmetrics.io")
    _check_port(parts)
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError("http:// is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost); use https://")
    return url


def _listen(value: Any, base: Path) -> str:
    text = _string(value, base)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. 127.0.0.1:9187")
    if not is_loopback(host.strip("[]")):
        raise ValueError("must be a loopback address (127.0.0.0/8, ::1, localhost): "
                         "put a proxy in front to publish it")
    return text


def _proxy(value: Any, base: Path) -> str:
    url = _string(value, base)
    parts = urlsplit(url)
    # requests (urllib3) opens the tunnel with CONNECT, in the clear to an http:// proxy
    # or inside TLS to an https:// one, then TLS to the endpoint runs inside it.
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// proxy URL (HTTPS goes through it "
                         "with CONNECT), such as http://proxy.example:3128")
    _check_port(parts)
    return url


def _concurrency(value: Any, base: Path) -> int | str:
    if value == "auto":
        return value
    try:
        return _number(1, 1024, integer=True)(value, base)
    except ValueError:
        raise ValueError('must be "auto" or an integer from 1 to 1024') from None


def _directories(value: Any, base: Path) -> tuple[Path, ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of directories, e.g. ["/var/log/myapp/km"]')
    return tuple(_path(item, base) for item in value)


# (section, key) -> (Config field, validator). Section "" is the top level.
KEYS: dict[tuple[str, str], tuple[str, Callable[[Any, Path], Any]]] = {
    ("", "api_key"): ("api_key", _string),
    ("", "api_key_file"): ("api_key_file", _path),
    ("", "endpoint"): ("endpoint", _endpoint),
    ("spool", "backend"): ("spool_backend", _choice(*BACKENDS)),
    ("spool", "path"): ("spool_path", _path),
    ("spool", "durability"): ("durability", _choice("normal", "full")),
    ("spool", "max_bytes"): ("max_bytes", _number(64 * 1024, 2**50, integer=True)),
    ("spool", "when_full"): ("when_full", _choice("error", "drop")),
    ("spool", "keep_free"): ("keep_free", _keep_free),
    ("spool", "rotate_bytes"): ("rotate_bytes", _number(4096, 2**40, integer=True)),
    ("spool", "rotate_seconds"): ("rotate_seconds", _number(1, 30 * 86400)),
    ("ship", "concurrency"): ("concurrency", _concurrency),
    ("ship", "max_concurrency"): ("max_concurrency", _number(1, 1024, integer=True)),
    ("ship", "connect_timeout"): ("connect_timeout", _number(0.1, 600)),
    ("ship", "read_timeout"): ("read_timeout", _number(0.1, 600)),
    ("ship", "max_backoff"): ("max_backoff", _number(1, 86400)),
    ("ship", "max_age"): ("max_age", _number(0, 10 * 365 * 86400)),
    ("ship", "shutdown_timeout"): ("shutdown_timeout", _number(0, 3600)),
    ("ship", "proxy"): ("proxy", _proxy),
    ("ship", "ca_file"): ("ca_file", _path),  # checked by shipping_config
    ("log", "level"): ("log_level", _choice(*LOG_LEVELS)),
    ("metrics", "listen"): ("metrics_listen", _listen),
    ("metrics", "textfile"): ("metrics_textfile", _path),
    ("km_log", "dirs"): ("km_log_dirs", _directories),
}
SECTIONS = {section for section, _ in KEYS if section}


def _key_name(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _read_key_file(value: Any, base: Path) -> str:
    path = _path(value, base)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not key:
        raise ValueError(f"{path} is empty")
    return key


def config_from_mapping(data: Mapping[str, Any], *, source: str, base: Path,
                        environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document; refuse unknown keys, wrong types and bad values.
    (``environ`` is no longer read here: the environment's proxy is the Sender's.)"""
    values: dict[str, Any] = {}
    for name, item in data.items():
        if name in SECTIONS:
            if not isinstance(item, dict):
                raise ConfigError(source, f"[{name}]", "must be a table")
            entries = [(name, key, value) for key, value in item.items()]
        else:
            entries = [("", name, item)]
        for section, key, value in entries:
            if (section, key) not in KEYS:
                known = ", ".join(_key_name(s, k) for s, k in KEYS)
                raise ConfigError(source, _key_name(section, key), f"unknown key (known: {known})")
            attr, check = KEYS[(section, key)]
            try:
                values[attr] = check(value, base)
            except ValueError as exc:
                raise ConfigError(source, _key_name(section, key), str(exc)) from None
    if "api_key" in data and "api_key_file" in data:
        raise ConfigError(source, "api_key_file", "give either api_key or api_key_file, not both")
    if values.get("concurrency") == "auto":
        del values["concurrency"]
    elif "concurrency" in values and "max_concurrency" not in values:
        values["adapt_concurrency"] = False  # a number given alone is a fixed number
    ceiling = values.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
    if values.get("adapt_concurrency", True):
        if "concurrency" not in values:
            values["concurrency"] = min(DEFAULT_CONCURRENCY, ceiling)  # start within it
        elif values["concurrency"] > ceiling:
            raise ConfigError(source, "[ship] concurrency",
                              f"must not be above [ship] max_concurrency ({ceiling})")
    if "spool_path" not in values:
        values["spool_path"] = default_spool_path(values.get("spool_backend", DEFAULT_BACKEND))
    return Config(source=source, **values)


def find_config(explicit: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> Path | None:
    """The file to read, by the lookup order; None means built-in defaults."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        return Path(explicit)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    return None


def load_config(explicit: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Find, read and validate the configuration."""
    path = find_config(explicit, environ)
    if path is None:
        return config_from_mapping({}, source="built-in defaults", base=Path.cwd(), environ=environ)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(str(path), None, "is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), None, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), None, f"not valid TOML: {exc}") from None
    config = config_from_mapping(data, source=str(path), base=path.resolve().parent,
                                 environ=environ)
    if "api_key" in data:
        _warn_if_world_readable(path)
    return config


_warned: set[str] = set()


def _warn_if_world_readable(path: Path) -> None:
    try:
        readable_by_all = os.stat(path).st_mode & 0o004
    except OSError:
        return
    if readable_by_all and str(path) not in _warned:
        _warned.add(str(path))
        logging.getLogger("kmagent.config").warning(
            "%s holds api_key and is readable by every user: put the key in a file only "
            "kmagent can read and name it with api_key_file (or chmod o-r %s)", path, path)


def configured_api_key(config: Config) -> str | None:
    """The agent's own key: ``api_key``, or what ``api_key_file`` holds."""
    if config.api_key_file is None:
        return config.api_key
    try:
        return _read_key_file(str(config.api_key_file), Path("/"))
    except ValueError as exc:
        raise ConfigError(config.source, "api_key_file", str(exc)) from None


def shipping_config(config: Config) -> Config:
    """The configuration completed for shipping: the key read from ``api_key_file``,
    ``ca_file`` and the proxy checked. Only the daemon and flush need (and may read) these."""
    from . import logs
    changes: dict[str, Any] = {}
    if config.api_key_file is not None:
        changes["api_key"] = configured_api_key(config)
    if config.ca_file is not None:
        try:
            _existing_file(str(config.ca_file), Path("/"))
        except ValueError as exc:
            raise ConfigError(config.source, "[ship] ca_file", str(exc)) from None
    # Without [ship] proxy, the environment's (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY; NO_PROXY
    # honoured), as requests resolves it for the endpoint: checked here, not at load, so
    # that a proxy meant for other programs does not stop an app from recording.
    from .sender import resolve_proxy
    proxy = config.proxy or resolve_proxy(config.endpoint)
    if proxy is not None:
        try:
            _proxy(proxy, Path("/"))
        except ValueError as exc:
            where = ("[ship] proxy" if config.proxy else
                     "the environment's proxy ($HTTPS_PROXY, $HTTP_PROXY or $ALL_PROXY)")
            raise ConfigError(config.source, where, str(exc)) from None
    complete = replace(config, **changes) if changes else config
    logs.hide(complete.api_key)  # whoever logs what, the key is never written
    return complete
