"""Configuration: where it is found, its documented defaults, and what it refuses.

Everything is read from real TOML files in the test's own directory; the system file
(/etc/kmagent/config.toml) is replaced by a path under tmp_path (see ``isolated_env``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import kmagent
from kmagent.config import Config, load_config, shipping_config


def toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_for_shipping(path: Path, **kwargs) -> Config:
    """What the daemon and flush load: the key file read, the CA file checked."""
    return shipping_config(load_config(path, **kwargs))


def refused(path: Path, loader=load_config, **kwargs) -> kmagent.ConfigError:
    """Load ``path`` expecting a ConfigError; return it after checking its shape."""
    with pytest.raises(kmagent.ConfigError) as info:
        loader(path, **kwargs)
    error = info.value
    assert isinstance(error, kmagent.KmagentError)
    message = str(error)
    assert "\n" not in message, f"not one line: {message!r}"
    assert str(path) in message, f"file not named: {message!r}"
    return error


# --- lookup order ----------------------------------------------------------------------

@pytest.fixture
def four_places(tmp_path, monkeypatch):
    """An explicit file, a $KMAGENT_CONFIG file and a system file, each recognisable by
    its concurrency."""
    explicit = toml(tmp_path / "explicit.toml", "[ship]\nconcurrency = 1\n")
    env = toml(tmp_path / "env.toml", "[ship]\nconcurrency = 2\n")
    system = toml(tmp_path / "etc" / "kmagent" / "config.toml", "[ship]\nconcurrency = 3\n")
    monkeypatch.setattr("kmagent.config.SYSTEM_CONFIG", system)
    monkeypatch.setenv("KMAGENT_CONFIG", str(env))
    return explicit, env, system


def test_explicit_path_wins_over_environment_and_system_file(four_places):
    explicit, _, _ = four_places
    config = load_config(explicit)
    assert config.concurrency == 1
    assert config.source == str(explicit)


def test_environment_variable_wins_over_system_file(four_places):
    _, env, _ = four_places
    config = load_config()
    assert config.concurrency == 2
    assert config.source == str(env)


def test_system_file_used_when_nothing_else_is_given(four_places, monkeypatch):
    _, _, system = four_places
    monkeypatch.delenv("KMAGENT_CONFIG")
    config = load_config()
    assert config.concurrency == 3
    assert config.source == str(system)


def test_built_in_defaults_when_no_file_exists(four_places, monkeypatch, tmp_path):
    monkeypatch.delenv("KMAGENT_CONFIG")
    monkeypatch.setattr("kmagent.config.SYSTEM_CONFIG", tmp_path / "absent" / "config.toml")
    config = load_config()
    assert config.concurrency == 16
    assert config == Config(source=config.source)


def test_kmagent_config_naming_a_missing_file_is_refused_not_ignored(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv("KMAGENT_CONFIG", str(missing))
    refused(missing)


# --- defaults --------------------------------------------------------------------------

def test_documented_defaults(tmp_path):
    config = load_config()
    assert config.api_key is None
    assert config.endpoint == "https://trk.kissmetrics.io"
    assert config.concurrency == 16
    assert config.connect_timeout == 5
    assert config.read_timeout == 10
    assert config.max_backoff == 60
    assert config.spool_path == tmp_path / "state" / "kmagent" / "spool.db"
    assert config.durability == "normal"
    assert config.spool_backend == "sqlite"
    assert config.log_level == "info"
    assert config.proxy is None
    assert config.ca_file is None


def test_default_spool_without_xdg_state_home_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config()
    assert config.spool_path == tmp_path / "home" / ".local" / "state" / "kmagent" / "spool.db"


def test_an_empty_file_gives_the_defaults(tmp_path):
    path = toml(tmp_path / "empty.toml", "")
    config = load_config(path)
    assert config == Config(source=str(path))


# --- every key accepted ----------------------------------------------------------------

def test_every_key_accepted_with_a_good_value(tmp_path):
    ca = toml(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    path = toml(tmp_path / "config.toml", f"""
api_key = "abc123"
endpoint = "https://trk.example.test/"

[spool]
backend = "sqlite"
path = "{tmp_path / 'elsewhere' / 'spool.db'}"
durability = "full"

[ship]
concurrency = 4
connect_timeout = 1.5
read_timeout = 7
max_backoff = 30
proxy = "http://proxy.example:3128"
ca_file = "{ca}"

[log]
level = "debug"
""")
    config = load_config(path)
    assert config.api_key == "abc123"
    assert config.endpoint.rstrip("/") == "https://trk.example.test"
    assert config.spool_backend == "sqlite"
    assert config.spool_path == tmp_path / "elsewhere" / "spool.db"
    assert config.durability == "full"
    assert config.concurrency == 4
    assert config.connect_timeout == 1.5
    assert config.read_timeout == 7
    assert config.max_backoff == 30
    assert config.proxy == "http://proxy.example:3128"
    assert config.ca_file == ca
    assert config.log_level == "debug"


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_every_log_level_accepted(tmp_path, level):
    path = toml(tmp_path / "c.toml", f'[log]\nlevel = "{level}"\n')
    assert load_config(path).log_level == level


@pytest.mark.parametrize("concurrency", [1, 1024])
def test_concurrency_bounds_accepted(tmp_path, concurrency):
    path = toml(tmp_path / "c.toml", f"[ship]\nconcurrency = {concurrency}\n")
    assert load_config(path).concurrency == concurrency


# --- refusals: file, key and rule in one line -------------------------------------------

REFUSALS = [
    # (TOML text, text naming the key, any of these words in the rule)
    ("bogus = 1\n", "bogus", ["unknown"]),
    ("[ship]\nbogus = 1\n", "bogus", ["unknown"]),
    ("[log]\nlevl = \"info\"\n", "levl", ["unknown"]),
    ("[nosuchsection]\nx = 1\n", "nosuchsection", ["unknown"]),
    ("ship = 3\n", "ship", ["table"]),
    ("log = \"debug\"\n", "log", ["table"]),
    ("[ship]\nconcurrency = \"8\"\n", "concurrency", ["integer"]),
    ("[ship]\nconcurrency = true\n", "concurrency", ["integer"]),
    ("[ship]\nconcurrency = 2.5\n", "concurrency", ["integer"]),
    ("[ship]\nconcurrency = 0\n", "concurrency", ["1"]),
    ("[ship]\nconcurrency = 2000\n", "concurrency", ["1024"]),
    ("[ship]\nconnect_timeout = \"5\"\n", "connect_timeout", ["number"]),
    ("[ship]\nread_timeout = -1\n", "read_timeout", ["number"]),
    ("[ship]\nread_timeout = true\n", "read_timeout", ["number"]),
    ("[spool]\ndurability = \"fast\"\n", "durability", ["normal", "full"]),
    ("[spool]\nbackend = \"postgres\"\n", "backend", ["sqlite"]),
    ("[log]\nlevel = \"verbose\"\n", "level", ["debug", "info"]),
    ("[log]\nlevel = \"INFO\"\n", "level", ["debug", "info"]),
    ("api_key = 123\n", "api_key", ["string"]),
    ("api_key = \"\"\n", "api_key", ["empty"]),
    ("endpoint = \"http://trk.kissmetrics.io\"\n", "endpoint", ["loopback", "https"]),
    ("endpoint = \"http://10.0.0.1:8080\"\n", "endpoint", ["loopback", "https"]),
    ("endpoint = \"http://127.0.0.1.example.com\"\n", "endpoint", ["loopback", "https"]),
    ("endpoint = \"http://localhost.example.com\"\n", "endpoint", ["loopback", "https"]),
    ("endpoint = \"https://trk.kissmetrics.io/?x=1\"\n", "endpoint", ["query"]),
    ("endpoint = \"https://trk.kissmetrics.io/e?_k=abc\"\n", "endpoint", ["query"]),
    ("endpoint = \"ftp://trk.kissmetrics.io\"\n", "endpoint", ["https"]),
    ("endpoint = \"trk.kissmetrics.io\"\n", "endpoint", ["https"]),
    ("[ship]\nproxy = \"not a url\"\n", "proxy", ["proxy", "url"]),
    ("[ship]\nproxy = \"http://u:p@proxy.example:99999\"\n", "proxy", ["port", "65535"]),
]


@pytest.mark.parametrize("text, key, rule_words", REFUSALS,
                         ids=[text.strip().replace("\n", " ") for text, _, _ in REFUSALS])
def test_refused_with_file_key_and_rule(tmp_path, text, key, rule_words):
    path = toml(tmp_path / "config.toml", text)
    error = refused(path)
    message = str(error)
    assert key in message, f"key {key!r} not named: {message!r}"
    assert error.key and key in error.key
    after_file = message.split(str(path), 1)[1]
    rule = after_file.split(key, 1)[1].lower()  # what follows the key is the rule
    assert any(word.lower() in rule for word in rule_words), \
        f"rule ({' or '.join(rule_words)}) not stated: {message!r}"


@pytest.mark.parametrize("endpoint", [
    "http://127.0.0.1:8080",
    "http://localhost",
    "http://[::1]:9",
    "http://127.1.2.3:80",
    "https://trk.kissmetrics.io",
    "https://trk.example.test:8443/prefix",
])
def test_endpoints_accepted(tmp_path, endpoint):
    path = toml(tmp_path / "config.toml", f'endpoint = "{endpoint}"\n')
    assert load_config(path).endpoint.rstrip("/") == endpoint


def test_missing_ca_file_refused(tmp_path):
    path = toml(tmp_path / "config.toml", '[ship]\nca_file = "no-such-ca.pem"\n')
    load_config(path)  # producers never open it
    error = refused(path, load_for_shipping)
    assert "ca_file" in str(error)


# --- api_key and api_key_file ------------------------------------------------------------

def test_api_key_and_api_key_file_together_refused(tmp_path):
    toml(tmp_path / "key.txt", "from-file\n")
    path = toml(tmp_path / "config.toml", 'api_key = "inline"\napi_key_file = "key.txt"\n')
    message = str(refused(path))
    assert "api_key_file" in message
    assert "api_key" in message.replace("api_key_file", "")  # the other one is named too


def test_api_key_file_is_read_and_stripped(tmp_path):
    toml(tmp_path / "key.txt", "  the-secret-key \n\n")
    path = toml(tmp_path / "config.toml", f'api_key_file = "{tmp_path / "key.txt"}"\n')
    assert load_config(path).api_key is None  # producers need not read it
    assert load_for_shipping(path).api_key == "the-secret-key"


def test_api_key_file_missing_refused(tmp_path):
    path = toml(tmp_path / "config.toml", 'api_key_file = "absent-key.txt"\n')
    error = refused(path, load_for_shipping)
    assert "api_key_file" in str(error)
    assert "absent-key.txt" in str(error)


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_api_key_file_empty_refused(tmp_path, content):
    toml(tmp_path / "key.txt", content)
    path = toml(tmp_path / "config.toml", 'api_key_file = "key.txt"\n')
    error = refused(path, load_for_shipping)
    assert "api_key_file" in str(error)
    assert "empty" in str(error).lower()


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    toml(conf_dir / "secrets" / "key", "k-relative\n")
    toml(conf_dir / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    toml(conf_dir / "config.toml", """
api_key_file = "secrets/key"
[spool]
path = "data/spool.db"
[ship]
ca_file = "ca.pem"
""")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (conf_dir / "config.toml", Path("../conf/config.toml")):
        config = load_for_shipping(given)
        assert config.api_key == "k-relative"
        assert Path(config.spool_path).resolve() == (conf_dir / "data" / "spool.db").resolve()
        assert Path(config.ca_file).resolve() == (conf_dir / "ca.pem").resolve()


# --- the file itself ---------------------------------------------------------------------

def test_missing_config_file_refused(tmp_path):
    refused(tmp_path / "does-not-exist.toml")


def test_invalid_toml_refused(tmp_path):
    path = toml(tmp_path / "config.toml", 'api_key = "unterminated\n[ship\n')
    error = refused(path)
    assert "toml" in str(error).lower()


def test_a_directory_as_config_file_refused(tmp_path):
    (tmp_path / "adir").mkdir()
    refused(tmp_path / "adir")


# --- proxy from the environment ----------------------------------------------------------

def test_https_proxy_is_left_to_the_sender_not_copied_into_the_config(tmp_path, monkeypatch):
    """The environment's proxy (and NO_PROXY) is resolved by requests for the endpoint,
    when the Sender is made: the config keeps only what [ship] proxy says."""
    from kmagent.config import shipping_config
    from kmagent.sender import Sender
    monkeypatch.setenv("HTTPS_PROXY", "http://envproxy.example:3128")
    path = toml(tmp_path / "config.toml", "[ship]\nconcurrency = 2\n")
    assert load_config(path).proxy is None
    config = shipping_config(load_config())  # built-in defaults too: checked, accepted
    sender = Sender(config.endpoint, connect_timeout=1, read_timeout=1, proxy=config.proxy)
    assert sender.proxy == "http://envproxy.example:3128"
    monkeypatch.setenv("NO_PROXY", "trk.kissmetrics.io")
    assert Sender(config.endpoint, connect_timeout=1, read_timeout=1).proxy is None


def test_ship_proxy_wins_over_https_proxy(tmp_path, monkeypatch):
    from kmagent.shipping import make_sender
    monkeypatch.setenv("HTTPS_PROXY", "http://envproxy.example:3128")
    path = toml(tmp_path / "config.toml", '[ship]\nproxy = "http://fileproxy.example:8080"\n')
    assert load_config(path).proxy == "http://fileproxy.example:8080"
    assert make_sender(load_config(path)).proxy == "http://fileproxy.example:8080"


def test_an_https_proxy_url_is_accepted(tmp_path):
    path = toml(tmp_path / "config.toml", '[ship]\nproxy = "https://proxy.example:3129"\n')
    assert load_config(path).proxy == "https://proxy.example:3129"


def test_an_unusable_https_proxy_stops_shipping_not_recording(tmp_path, monkeypatch):
    from kmagent import Client
    from kmagent.config import shipping_config
    from kmagent.errors import ConfigError
    monkeypatch.setenv("HTTPS_PROXY", "socks5h://proxy.example:1080")  # meant for others
    path = toml(tmp_path / "config.toml", f'[spool]\npath = "{tmp_path / "s.db"}"\n')
    Client(config=path).record("bob", "Still Recorded")
    with pytest.raises(ConfigError, match="HTTPS_PROXY.*http://"):
        shipping_config(load_config(path))


def test_no_proxy_without_https_proxy(tmp_path):
    path = toml(tmp_path / "config.toml", "[ship]\nconcurrency = 2\n")
    assert load_config(path).proxy is None


# --- the key is never shown --------------------------------------------------------------

def test_repr_never_shows_the_api_key(tmp_path):
    path = toml(tmp_path / "config.toml", 'api_key = "SeCrEt-Key-4242"\n')
    config = load_config(path)
    assert config.api_key == "SeCrEt-Key-4242"
    assert "SeCrEt-Key-4242" not in repr(config)
    assert "SeCrEt-Key-4242" not in str(config)


def test_repr_never_shows_a_key_read_from_api_key_file(tmp_path):
    toml(tmp_path / "key.txt", "File-Secret-777\n")
    path = toml(tmp_path / "config.toml", 'api_key_file = "key.txt"\n')
    config = load_for_shipping(path)
    assert config.api_key == "File-Secret-777"
    assert "File-Secret-777" not in repr(config)
    assert "File-Secret-777" not in f"{config}"


def test_the_example_config_is_valid():
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    config = load_config(example)
    assert config.spool_backend == "sqlite" and config.concurrency == 16


def test_producers_need_not_read_the_key_file(tmp_path, spool_path):
    """An app user records events although the key file is not there for it (e.g. a
    systemd credential, visible only inside the service)."""
    key = "/run/credentials/kmagent.service/api_key-not-here"
    path = toml(tmp_path / "config.toml", f'api_key_file = "{key}"\n[spool]\npath = "{spool_path}"\n')
    kmagent.Client(config=path).record("bob", "Did")
    assert kmagent.status(config=path)["pending"] == 1
    assert "api_key_file" in str(refused(path, load_for_shipping))


def test_non_utf8_config_is_a_config_error(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b'api_key = "\xff"\n')
    assert "UTF-8" in str(refused(path))


def test_a_directory_is_not_a_config_file(tmp_path):
    assert "directory" in str(refused(tmp_path))


def test_endpoint_port_must_be_a_port(tmp_path):
    path = toml(tmp_path / "config.toml", 'endpoint = "http://127.0.0.1:99999"\n')
    assert "port" in str(refused(path))


@pytest.mark.parametrize("endpoint", ["https://trk.kiss\\tmetrics.io",
                                      "https://trk.kissmetrics.io/a b", "https://trk\\n.io"])
def test_endpoint_with_whitespace_or_control_characters_refused(tmp_path, endpoint):
    # urlsplit drops tabs and line breaks: the host the requests went to would differ
    path = toml(tmp_path / "config.toml", f'endpoint = "{endpoint}"\n')
    assert "control characters" in str(refused(path))
