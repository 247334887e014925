"""The metrics textfile is readable by node_exporter (another user): 0644 whatever the
umask, replaced atomically, and a short write leaves the previous file in place."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kmagent.prometheus import Exporter
from kmagent.report import Status


def figures():
    return Status(delivered_total=7, pending=3)


@pytest.fixture
def umask_077():
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_the_textfile_is_world_readable_whatever_the_umask(tmp_path, umask_077):
    textfile = tmp_path / "kmagent.prom"
    Exporter(None, textfile, figures).tick(force=True)
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    text = textfile.read_text()
    assert "kmagent_events_delivered_total 7.0" in text
    assert "kmagent_events_pending 3.0" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kmagent.prom"]  # no temp left
    textfile.chmod(0o600)  # replaced, not rewritten in place: the mode is set again
    Exporter(None, textfile, figures).tick(force=True)
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644


def test_a_short_write_keeps_the_previous_textfile(tmp_path, monkeypatch, caplog):
    textfile = tmp_path / "kmagent.prom"
    textfile.write_text("# the previous scrape\n")
    real_write = os.write
    monkeypatch.setattr(os, "write",  # writes 10 bytes, then says it wrote nothing
                        lambda fd, data: real_write(fd, bytes(data[:10])) and 0)
    Exporter(None, textfile, figures).tick(force=True)
    monkeypatch.undo()
    assert textfile.read_text() == "# the previous scrape\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kmagent.prom"]
    assert "cannot write metrics" in caplog.text


ROOT = Path(__file__).resolve().parent.parent


def test_the_drop_in_lets_the_service_write_node_exporters_directory():
    drop_in = (ROOT / "systemd" / "kmagent-metrics.conf").read_text()
    assert "[Service]\nReadWritePaths=/var/lib/node_exporter\n" in drop_in
    assert "ProtectSystem=strict" in (ROOT / "systemd" / "kmagent.service").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_the_unit_with_the_drop_in_verifies(tmp_path):
    kmagent = Path(sys.executable).parent / "kmagent"
    unit = tmp_path / "kmagent.service"
    unit.write_text((ROOT / "systemd" / "kmagent.service").read_text()
                    .replace("/usr/local/bin/kmagent", str(kmagent)))
    (tmp_path / "kmagent.service.d").mkdir()
    (tmp_path / "kmagent.service.d" / "metrics.conf").write_text(
        (ROOT / "systemd" / "kmagent-metrics.conf").read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert result.returncode == 0 and "metrics.conf" not in result.stderr, result.stderr
