"""The system service files: the unit verifies and is hardened (systemd-analyze), the
sysusers and tmpfiles snippets are in place, and `make install` puts everything there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kmagent.config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "kmagent.service"
KMAGENT = Path(sys.executable).parent / "kmagent"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # verify needs the Exec binaries to exist: point a copy at this installation's.
    unit = tmp_path / "kmagent.service"
    unit.write_text(re.sub(r"(Exec(?:Start|Reload))=/usr/local/bin/kmagent", rf"\1={KMAGENT}",
                           unit_text))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)


@needs_analyze
def test_the_unit_verifies(tmp_path):
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr


@needs_analyze
def test_the_unit_is_hardened_to_an_exposure_of_at_most_1_5():
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for kmagent.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5


def test_the_unit_says_what_the_service_needs():
    unit = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure",
                 "RestartPreventExitStatus=78", "LoadCredential=api_key:",
                 "ExecStart=/usr/local/bin/kmagent run"):
        assert line in unit
    stop = int(re.search(r"TimeoutStopSec=(\d+)", unit).group(1))
    assert stop > 10  # above the default [ship] shutdown_timeout


def test_sysusers_and_tmpfiles_snippets():
    sysusers = (ROOT / "systemd" / "kmagent.sysusers.conf").read_text()
    assert re.search(r"^u\s+kmagent\s", sysusers, re.M)
    tmpfiles = (ROOT / "systemd" / "kmagent.tmpfiles.conf").read_text()
    # setgid and group-writable, never aged out
    assert re.search(r"^d\s+/var/lib/kmagent\s+2770\s+kmagent\s+kmagent\s+-\s*$", tmpfiles, re.M)


@needs_analyze
def test_make_install_puts_everything_in_place(tmp_path):
    dest = tmp_path / "root"
    result = subprocess.run(["make", "install", f"DESTDIR={dest}", "PREFIX=/usr/local",
                             f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (dest / "usr/local/bin/kmagent").is_symlink()
    assert subprocess.run([dest / "opt/kmagent/bin/kmagent", "--version"],
                          capture_output=True, text=True).stdout.startswith("kmagent")
    for path in ("usr/lib/sysusers.d/kmagent.conf", "usr/lib/tmpfiles.d/kmagent.conf"):
        assert (dest / path).is_file()
    installed_unit = (dest / "etc/systemd/system/kmagent.service").read_text()
    assert verify(installed_unit, tmp_path).returncode == 0
    config = load_config(dest / "etc/kmagent/config.toml")
    assert config.api_key is None and str(config.api_key_file).startswith("/run/credentials/")
