"""Running as a system service: sd_notify over a real Unix datagram socket standing in
for systemd, the watchdog, SIGHUP reloads, and the figures ``status`` reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from helpers import (figures, free_port, record_many, run_in_process, run_kmagent,
                     start_daemon, start_kmagent, stop, wait_for)

from kmagent import Client
from kmagent.notify import Notifier


class FakeSystemd:
    """A datagram socket like systemd's NOTIFY_SOCKET, collecting what it is told."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def collect(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                break
            for field in data.decode().split("\n"):
                self.messages.append((time.monotonic(), field))
        return [field for _, field in self.messages]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def systemd(request, tmp_path, monkeypatch):
    address = str(tmp_path / "notify") if request.param == "path" else f"@kmagent-test-{os.getpid()}"
    fake = FakeSystemd(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    yield fake
    fake.close()


def test_run_tells_systemd_ready_watchdog_status_and_stopping(systemd, host, write_config):
    config = write_config(host)
    Client(config=config).record("bob", "Under Systemd")
    daemon = start_kmagent("run", "--config", str(config))
    try:
        wait_for(lambda: "READY=1" in systemd.collect())
        wait_for(lambda: len(host.delivered()) == 1)
        time.sleep(1.5)
        systemd.collect()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    pings = [at for at, field in systemd.messages if field == "WATCHDOG=1"]
    assert len(pings) >= 5  # every ~0.2 s while the loop turns
    assert max(b - a for a, b in zip(pings, pings[1:])) < 0.9  # timer-driven, not the 1 s rescan
    fields = systemd.collect()
    assert fields.index("READY=1") < fields.index("STOPPING=1")
    assert any(field.startswith("MAINPID=") for field in fields)


def test_status_line_reports_the_backlog(systemd, host, write_config, monkeypatch):
    monkeypatch.setattr("kmagent.daemon.STATUS_EVERY_S", 0.2)  # in-process daemon below
    from kmagent.config import load_config
    from kmagent.daemon import Daemon
    import threading
    config = load_config(write_config(host))
    daemon = Daemon(config)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: any(f.startswith("STATUS=") and "pending" in f
                             for f in systemd.collect()))
    finally:
        daemon.stop()
        runner.join(20)


def test_sighup_reloads_without_losing_anything(systemd, host, write_config, tmp_path):
    config = write_config(host, extra="[ship]\nconcurrency = 2\n")
    daemon = start_kmagent("run", "--config", str(config))
    try:
        wait_for(lambda: "READY=1" in systemd.collect())
        Client(config=config).record("bob", "Before Reload")
        wait_for(lambda: len(host.delivered()) == 1)
        write_config(host, extra="[ship]\nconcurrency = 3\nconnect_timeout = 3\n")
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "RELOADING=1" in systemd.collect())
        wait_for(lambda: systemd.collect().count("READY=1") >= 2)
        Client(config=config).record("bob", "After Reload")
        wait_for(lambda: len(host.delivered()) == 2)
        config.write_text(config.read_text() + "no_such_key = 1\n")  # a broken edit...
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: systemd.collect().count("READY=1") >= 3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, log = daemon.communicate(timeout=20)
    assert daemon.returncode == 0  # ...is refused, and the agent kept running
    assert "configuration reloaded" in log and "reload refused" in log
    assert "(concurrency 2)" in log


def test_reload_waits_for_the_daemon_and_fails_when_the_config_is_refused(
        host, write_config):
    """``kmagent reload`` (the unit's ExecReload) returns once the daemon has reloaded,
    and fails when it refused the new configuration, so that ``systemctl reload``
    does; it needs nothing but Python (no procps)."""
    config = write_config(host, extra="[ship]\nconcurrency = 2\n")
    daemon = start_daemon(config)
    try:
        write_config(host, extra="[ship]\nconcurrency = 3\n")
        # The reload command's own code, in this process (it signals the daemon and
        # waits on its figures file: nothing that needs a process of its own).
        applied = run_in_process("reload", "--config", str(config))
        assert applied.returncode == 0, applied.stderr
        assert f"pid {daemon.pid}: configuration reloaded" in applied.stderr
        assert shipper_figures(config)["concurrency"] == 3  # done by the time it returned
        # A file that does not parse is refused before the daemon is asked...
        config.write_text(config.read_text() + "[ship]\n")
        broken = run_in_process("reload", "--pid", str(daemon.pid), "--config", str(config))
        assert broken.returncode == 78 and "not valid TOML" in broken.stderr
        # ...one that only the daemon can judge (it reads the CA file), by the daemon.
        write_config(host, extra='[ship]\nca_file = "/nonexistent/ca.pem"\n')
        refused = run_in_process("reload", "--pid", str(daemon.pid), "--config", str(config))
        assert refused.returncode == 78, refused.stderr
        assert "reload refused" in refused.stderr and "ca_file" in refused.stderr
        assert daemon.poll() is None  # the daemon keeps its running configuration
        Client(config=config).record("bob", "After A Refused Reload")
        wait_for(lambda: len(host.delivered()) == 1)
    finally:
        assert stop(daemon) == 0, daemon.log
    gone = run_in_process("reload", "--config", str(config))
    assert gone.returncode == 1 and "no daemon ships" in gone.stderr


def shipper_figures(config) -> dict:
    from kmagent.config import load_config
    from kmagent.spool import open_configured
    with open_configured(load_config(config)) as spool:
        return json.loads(spool.figures_path.read_text())


def test_notifier_does_nothing_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.notify("READY=1")  # no error


def test_watchdog_for_another_pid_is_not_ours():
    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval is None


def test_status_reports_the_daemons_figures(host, write_config, spool_path):
    config = write_config(host)
    record_many(config, 20)
    daemon = start_kmagent("run", "--config", str(config))
    try:
        wait_for(lambda: len(host.delivered()) == 20)
        # Polled in-process (what `status --json` prints, without a Python start per
        # look); then the real command, once, is what is checked.
        wait_for(lambda: figures(config)["delivered_total"] == 20)
        shown = json.loads(run_kmagent("status", "--json", "--config", str(config)).stdout)
        assert shown["delivered_total"] == 20
        assert shown["daemon_pid"] == daemon.pid and shown["rate_1m"] > 0
        assert shown["last_success_at"] > time.time() - 60 and shown["last_error"] is None
        assert set(shown) >= {"pending", "dead", "oldest_pending_age_s", "in_flight",
                              "delivered_total", "retried_total", "last_success_at",
                              "last_error_at", "last_error", "rate_1m", "daemon_pid",
                              "dropped_total"}
    finally:
        stop(daemon)
    after = json.loads(run_kmagent("status", "--json", "--config", str(config)).stdout)
    assert after["delivered_total"] == 20 and after["daemon_pid"] is None
    assert after["rate_1m"] == 0.0


def test_prometheus_metrics_on_loopback_and_in_a_textfile(host, write_config, tmp_path):
    import urllib.request
    port = free_port()
    textfile = tmp_path / "kmagent.prom"
    config = write_config(host, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
                                      f'textfile = "{textfile}"\n')
    record_many(config, 5)
    daemon = start_kmagent("run", "--config", str(config))
    try:
        wait_for(lambda: len(host.delivered()) == 5)

        def scraped():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                return None
            # pending is read from the spool at most every few seconds
            return text if ("kmagent_events_delivered_total 5.0" in text
                            and "kmagent_events_pending 0.0" in text) else None
        text = wait_for(scraped)
        assert "kmagent_events_in_flight" in text and "kmagent_delivery_rate" in text
    finally:
        stop(daemon)
    assert "kmagent_events_delivered_total 5.0" in textfile.read_text()


def test_metrics_listen_must_be_loopback(write_config, tmp_path):
    config = write_config(extra='[metrics]\nlisten = "0.0.0.0:9187"\n')
    result = run_in_process("status", "--config", str(config))  # a configuration error
    assert result.returncode == 78 and "loopback" in result.stderr


def test_check_makes_one_harmless_request(host, write_config, tmp_path):
    config = write_config(host)
    # The command's own code, in this process: a probe needs no process of its own.
    result = run_in_process("check", "--config", str(config))
    assert result.returncode == 0 and "HTTP 200" in result.stdout
    assert [r.target for r in host.received] == ["/"]  # no event, no key
    unreachable = tmp_path / "down.toml"
    unreachable.write_text(f'endpoint = "http://127.0.0.1:{free_port()}"\n')
    result = run_in_process("check", "--config", str(unreachable))
    assert result.returncode == 1 and "unreachable" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("concurrency = 0\n")
    assert run_in_process("check", "--config", str(bad)).returncode == 78


def test_check_as_an_app_user_who_cannot_read_the_key(host, tmp_path):
    """After install the README has app users run ``kmagent check``: the key is the
    service's credential, which they cannot read, and the probe sends no key."""
    import shutil
    import subprocess
    import sys
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("reading as a user who may not needs root and setpriv (CI has both)")
    key = tmp_path / "api_key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    os.chown(key, 65534, 65534)  # another user's, 0600
    config = tmp_path / "config.toml"
    config.write_text(f'api_key_file = "{key}"\nendpoint = "{host.url}"\n[spool]\n'
                      f'path = "{tmp_path / "spool.db"}"\n')
    # Root without the capabilities that let it read any file: an app user, for the key.
    without_dac = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all",
                   "--bounding-set=-dac_override,-dac_read_search", "--"]
    result = subprocess.run([*without_dac, sys.executable, "-m", "kmagent", "check",
                             "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cannot read" in result.stdout and "HTTP 200" in result.stdout
    assert [r.target for r in host.received] == ["/"]


def test_a_stuck_loop_stops_the_watchdog_pings(systemd, host, write_config, monkeypatch):
    import threading

    from kmagent.config import load_config
    from kmagent.daemon import Daemon
    from kmagent.shipper import Shipper
    stall = threading.Event()
    real_step = Shipper.step

    def step(self):
        if stall.is_set():
            stall.clear()
            time.sleep(1.5)  # the loop hangs (a wedged disk, a deadlock...)
        return real_step(self)

    monkeypatch.setattr(Shipper, "step", step)
    daemon = Daemon(load_config(write_config(host)))
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: systemd.collect().count("WATCHDOG=1") >= 3)
        stall.set()
        time.sleep(2.5)
        systemd.collect()
    finally:
        daemon.stop()
        runner.join(20)
    pings = [at for at, field in systemd.messages if field == "WATCHDOG=1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) >= 1.4  # no ping while the loop was stuck
    assert sorted(gaps)[len(gaps) // 2] < 0.4  # and regular pings otherwise


def test_a_taken_metrics_port_does_not_stop_shipping(host, write_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(host, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        Client(config=config).record("bob", "Still Shipped")
        daemon = start_kmagent("run", "--config", str(config))
        try:
            wait_for(lambda: len(host.delivered()) == 1)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, log = daemon.communicate(timeout=20)
    assert daemon.returncode == 0 and "cannot serve metrics" in log
