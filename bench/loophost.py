"""A cheap loopback tracking host for benchmarks: asyncio, HTTP/1.1 keep-alive, an empty
200 to every request after ``--delay`` seconds. Cheap so that the client is what a
benchmark measures, not the host (kmagent testhost is a threaded http.server).

    python bench/loophost.py --port PORT [--delay SECONDS] [--log FILE]

Prints ``listening`` on stderr once it accepts connections. With ``--log``, appends
``<arrival unix time> <request target>`` per request (for latency measurements).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Type: image/gif\r\n\r\n"


class Tracking(asyncio.Protocol):
    def __init__(self, delay: float, log) -> None:
        self.delay, self.log = delay, log
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            if self.log is not None:
                target = head.split(b" ", 2)[1].decode("ascii", "replace")
                self.log.write(f"{time.time():.6f} {target}\n")
            if self.delay:
                # Answers keep their order: call_later with one delay is FIFO.
                self.loop.call_later(self.delay, self.answer)
            else:
                self.answer()

    def answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(RESPONSE)


async def serve(port: int, delay: float, log_path: str | None) -> None:
    log = open(log_path, "a", buffering=1) if log_path else None
    server = await asyncio.get_running_loop().create_server(
        lambda: Tracking(delay, log), "127.0.0.1", port, backlog=1024)
    print("listening", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--log")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, args.delay, args.log))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
