"""Log lines under systemd: when standard error is the journal's stream (JOURNAL_STREAM
names its device and inode), every line carries its sd-daemon priority prefix, so that
``journalctl -p err`` finds errors; otherwise the output is as it always was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging
from kmagent import logs
logs.setup("debug")
log = logging.getLogger("kmagent.test")
log.debug("a debug line")
log.info("an info line")
log.warning("a warning line")
log.error("an error line")
log.critical("a critical line")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("it failed")
"""


def run_logging(tmp_path: Path, journal_stream: "str | None") -> list[str]:
    out = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(out, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        if journal_stream == "match":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream == "other inode":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", SCRIPT], stderr=stderr, env=env,
                       check=True, timeout=60)
    return out.read_text().splitlines()


def test_every_line_carries_its_priority_when_stderr_is_the_journal(tmp_path):
    lines = run_logging(tmp_path, "match")
    assert lines[:5] == [
        "<7>DEBUG kmagent.test: a debug line",
        "<6>INFO kmagent.test: an info line",
        "<4>WARNING kmagent.test: a warning line",
        "<3>ERROR kmagent.test: an error line",
        "<2>CRITICAL kmagent.test: a critical line",
    ]
    traceback = lines[5:]
    assert traceback[0] == "<3>ERROR kmagent.test: it failed"
    assert "<3>Traceback (most recent call last):" in traceback
    assert traceback[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in traceback), traceback  # each line an entry


def test_no_prefix_when_journal_stream_names_another_file(tmp_path):
    # Inherited from a unit but writing elsewhere (a redirect): journald does not read it.
    for value in ("other inode", "0:0", "garbage", ""):
        lines = run_logging(tmp_path, value)
        assert not any(line.startswith("<") for line in lines), (value, lines)
        assert len(lines) > 5
        if value:  # as before: JOURNAL_STREAM set means no timestamps
            assert lines[0] == "DEBUG kmagent.test: a debug line"


def test_outside_systemd_lines_are_as_before(tmp_path):
    lines = run_logging(tmp_path, None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG kmagent.test: a debug line",
                        lines[0]), lines[0]
    assert not any(line.startswith("<") for line in lines)
    assert "Traceback (most recent call last):" in lines


def test_a_refused_configuration_is_an_error_in_the_journal(tmp_path):
    """`kmagent run` with a bad configuration exits 78; under systemd its message must
    carry the error priority, or `journalctl -p err -u kmagent` shows nothing."""
    config = tmp_path / "bad.toml"
    config.write_text('[ship]\nconcurrency = "many"\n')
    out = tmp_path / "stderr.txt"
    for journal in (True, False):
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        with open(out, "wb") as stderr:
            if journal:
                st = os.fstat(stderr.fileno())
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            code = subprocess.run([sys.executable, "-m", "kmagent", "run", "--config",
                                   str(config)], stderr=stderr, env=env, timeout=60).returncode
        lines = out.read_text().splitlines()
        assert code == 78
        error = [line for line in lines if "configuration error" in line]
        assert error and error[0].startswith("<3>kmagent: configuration error") == journal, lines
