"""Producer cost of kmagent's peers, run in their own virtualenv (py-KISSmetrics needs
urllib3 < 2, kmagent 2.x). Prints one JSON object: µs per call, median of rounds.

    bench/.venv-peers/bin/python bench/peers_producer.py ROUNDS EVENTS HOST_URL
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time


def per_call(fn, events: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for n in range(events):
            fn(n)
        times.append((time.perf_counter() - start) / events * 1e6)
    return statistics.median(times)


def main() -> None:
    rounds, events, host = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    results = {}

    # Segment: track() enqueues into its in-memory queue; the consumer is stopped so the
    # message really stays queued (send=False would drop it before the queue).
    from segment.analytics.client import Client as Segment
    segment = Segment("bench-key", max_queue_size=10**7, thread=1)
    for consumer in segment.consumers:
        consumer.pause()
    results["segment_track_enqueue"] = per_call(
        lambda n: segment.track("bob@example.com", "Signed Up",
                                {"Plan": "Pro", "Amount": n}), events, rounds)

    # persist-queue's SQLite ack queue: a durable local queue, like a spool.
    from persistqueue import SQLiteAckQueue
    with tempfile.TemporaryDirectory() as tmp:
        queue = SQLiteAckQueue(tmp, auto_commit=True, multithreading=True)
        results["persist_queue_put"] = per_call(
            lambda n: queue.put({"p": "bob@example.com", "n": "Signed Up", "Amount": n}),
            events, rounds)

    # py-KISSmetrics: what "no agent" costs an app, a blocking request per call (to a
    # loopback stand-in host, never the real one).
    from KISSmetrics import Client as KISSmetrics
    scheme, _, hostport = host.partition("://")
    km = KISSmetrics("bench-key", trk_host=hostport, trk_scheme=scheme)
    results["py_kissmetrics_record"] = per_call(
        lambda n: km.record("bob@example.com", "Signed Up", {"Plan": "Pro", "Amount": n}),
        max(events // 10, 50), rounds)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
