"""sd_notify(3) in pure Python: tell systemd we are ready, alive, reloading, stopping.

Messages go as one datagram to the Unix socket named by ``NOTIFY_SOCKET`` (a leading
``@`` means Linux's abstract namespace). Without ``NOTIFY_SOCKET`` (not under systemd,
or ``Type=simple``) every call does nothing; a failed send is logged once, never raised:
the agent must not stop shipping because its supervisor went away.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("kmagent.notify")


class Notifier:
    """``notify("READY=1")`` etc.; ``watchdog_interval`` is how often to ping (or None)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address
        self._socket: socket.socket | None = None
        self._failed = False
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # systemd's advice: ping at half the timeout.
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> None:
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self._address, exc)
                self._failed = True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
