"""Producer cost of kmagent's peers, run in their own virtualenv (py-KISSmetrics needs
urllib3 < 2, kmagent 2.x). Prints one JSON object: {peer: {shape: µs per event}}.

    bench/.venv-peers/bin/python bench/peers_producer.py ROUNDS EVENTS HOST_URL
"""

from __future__ import annotations

import json
import sys
import tempfile

from workload import SHAPES, micros_per_event

PROPS = lambda n: {"Plan": "Pro", "Amount": n}  # noqa: E731


def segment():
    # track() enqueues into the client's in-memory queue; the consumer is paused so the
    # message really stays queued (send=False would drop it before the queue).
    from segment.analytics.client import Client
    client = Client("bench-key", max_queue_size=10**7, thread=1)
    for consumer in client.consumers:
        consumer.pause()
    return client


def main() -> None:
    rounds, events, host = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    tmp = tempfile.mkdtemp()
    results: dict[str, dict[str, float]] = {"segment_track_enqueue": {},
                                            "persist_queue_put": {}}
    for shape, kwargs in SHAPES.items():
        workers = kwargs.get("threads", 1) * kwargs.get("processes", 1)
        n = events // workers
        results["segment_track_enqueue"][shape] = micros_per_event(
            segment, lambda client: lambda i: client.track("bob@example.com", "Signed Up", PROPS(i)),
            events=n, rounds=rounds, **kwargs)

        def queue(path=f"{tmp}/{shape.replace(' ', '-')}"):
            from persistqueue import SQLiteAckQueue
            return SQLiteAckQueue(path, auto_commit=True, multithreading=True)
        results["persist_queue_put"][shape] = micros_per_event(
            queue, lambda q: lambda i: q.put({"p": "bob@example.com", "n": "Signed Up", **PROPS(i)}),
            events=n, rounds=rounds, **kwargs)

    # py-KISSmetrics: what "no agent" costs an app, a blocking request per call (to a
    # loopback host, never the real one). One thread: its cost is the network's.
    from KISSmetrics import Client as KISSmetrics
    scheme, _, hostport = host.partition("://")
    km = KISSmetrics("bench-key", trk_host=hostport, trk_scheme=scheme)
    results["py_kissmetrics_record"] = {"1 thread": micros_per_event(
        lambda: km, lambda c: lambda i: c.record("bob@example.com", "Signed Up", PROPS(i)),
        events=max(events // 10, 50), rounds=rounds)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
