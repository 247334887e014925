"""Shared fixtures: a real stand-in tracking host on 127.0.0.1, real spool files, a
small real filesystem to fill. What tests call (real ``kmagent`` processes, waits,
spool contents) is in helpers.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from helpers import API_KEY
from kmagent.testhost import StandInHost
from torture import MACHINE_NETWORK_ENV

def pytest_configure(config) -> None:
    """One torture seed for the whole run, drawn once: the workers of ``pytest -n``
    inherit it, so they collect the same tests (the seed is in the test ids)."""
    config.addinivalue_line("markers", "backends(*names): run on these spool backends "
                            "(every one when none is named)")
    import random
    os.environ.setdefault("KMAGENT_TORTURE_SEED",
                          str(random.SystemRandom().randrange(1, 10**6)))


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test ever reads the machine's config or writes the user's state directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("KMAGENT_CONFIG", raising=False)
    for name in MACHINE_NETWORK_ENV:  # read by requests (the Sender, once when made)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("kmagent.config.SYSTEM_CONFIG", tmp_path / "no-system-config.toml")


@pytest.fixture
def host():
    with StandInHost() as server:
        yield server


def pytest_generate_tests(metafunc) -> None:
    """``pytestmark = pytest.mark.backends()`` runs each test of a module that takes
    ``backend`` once per backend (kmagent.spool.BACKENDS), ``backends("jsonl")`` on the
    ones named."""
    from kmagent.spool import BACKENDS
    mark = metafunc.definition.get_closest_marker("backends")
    if mark is not None and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", mark.args or BACKENDS, indirect=True)


@pytest.fixture
def backend(request) -> str:
    """The spool backend: SQLite, or each that the module's ``backends`` mark names."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def spool_path(tmp_path, backend) -> Path:
    return tmp_path / "spool" / ("spool.db" if backend == "sqlite" else "spool.jsonl.d")


@pytest.fixture
def write_config(tmp_path, spool_path, backend) -> Callable[..., Path]:
    """write_config(host=None, extra="", api_key=API_KEY) -> path of a TOML file."""
    def write(host: StandInHost | None = None, extra: str = "", api_key: str | None = API_KEY,
              name: str = "config.toml") -> Path:
        lines = []
        if api_key is not None:
            lines.append(f'api_key = "{api_key}"')
        if host is not None:
            lines.append(f'endpoint = "{host.url}"')
        lines.append(extra)
        lines.append(f'[spool]\nbackend = "{backend}"\npath = "{spool_path}"')
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return path
    return write


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem of its own to fill up (a tmpfs: needs root; CI runs as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 2 MiB tmpfs needs root (CI runs as root)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def km(spool_path):
    """kmagent.KM on this test's spool, with no current person before and after."""
    from kmagent import KM
    saved = KM._client
    KM.init(spool=spool_path)
    KM.clear_identity()
    yield KM
    KM.clear_identity()
    current, KM._client = KM._client, saved
    if current is not None and current is not saved:
        current.close()
