"""kmagent.compat.kissmetrics against the real py-KISSmetrics 1.1.0, call by call: each
call goes through the real library to one loopback host, and through the compat module,
the spool and ``kmagent flush`` to another; what arrives is compared parameter by
parameter. The only differences allowed are those the README's "What differs" lists.

py-KISSmetrics is a test dependency installed without its own (it pins urllib3 < 2, but
runs on the urllib3 the suite has): ``make`` does it.
"""

from __future__ import annotations

import datetime
import decimal
import time
import uuid

import pytest
from helpers import run_kmagent

from kmagent.compat import kissmetrics as compat
from kmagent.testhost import StandInHost

real = pytest.importorskip("KISSmetrics", reason="py-KISSmetrics 1.1.0 is not installed "
                           "(make installs it: pip install --no-deps py-KISSmetrics==1.1.0)")

KEY = "diff-key"
T = 1700000000
WHEN = datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.timezone.utc)

# (method, args, kwargs) for Client; the same calls are made on both sides.
CLIENT_CALLS = [
    ("record", ("bob", "Signed Up", {"Plan": "Pro", "Amount": 99.95}), {"timestamp": T}),
    ("record", ("bob@example.com", "Viewed Página", {"Ville": "Zürich", "emoji": "🎉"}),
     {"timestamp": T + 1}),
    ("record", ("ann & co", "Checkout & Pay", {"a=b": "c&d", "space key": "x y",
                                               "plus": "1+1", "pct": "100%"}), {"timestamp": T}),
    ("record", (900021, "Paid", {"Amount": decimal.Decimal("19.90"), "Order": uuid.UUID(int=7),
                                 "Day": datetime.date(2026, 12, 1), "At": WHEN, 7: "seven",
                                 "Note": "café".encode()}), {"timestamp": T + 2}),
    ("record", ("bob", "Did", [("Plan", "Pro"), ("Seats", 3)]), {"timestamp": T}),
    ("record", ("bob", "Viewed Homepage"), {}),
    ("record", ("山田", "Clicked ☃", {"Ünï": "çødé"}), {}),
    ("record", ("bob", "Zero", {"n": 0, "f": 0.5, "neg": -3}), {"timestamp": T}),
    ("record", ("bob", "Late"), {"timestamp": 4102444800}),  # 2100
    ("set", ("bob", {"gender": "male", "Age": 30}), {"timestamp": T + 3}),
    ("set", ("bob", {"Plan": b"Pro", "Since": datetime.date(2020, 1, 2)}), {}),
    ("set", (42, {"Score": decimal.Decimal("1E+3")}), {"timestamp": T}),
    ("alias", ("bob", "bob@example.com"), {}),
    ("alias", (42, 43), {}),
    ("alias", ("anon 8f3e", "User 12345"), {}),
]
# (method, args) on ClientCompat (KM), after identify(person).
COMPAT_CALLS = [
    ("identify", ("carol",)),
    ("record", ("Viewed Page", {"Page": "/pricing?x=1&y=2"})),
    ("record", ("Signed Up",)),
    ("set", ({"Plan": "Pro", "Seats": 5},)),
    ("identify", (900022,)),
    ("record", ("Paid", {"Amount": decimal.Decimal("5.00")})),
    ("alias", ("carol", "carol@example.com")),
]


def canonical(path: str, params: dict[str, str]) -> str:
    return path + "?" + "&".join(f"{k}={v}" for k, v in sorted(params.items()))


def test_the_compat_module_sends_what_py_kissmetrics_sent(write_config, tmp_path):
    direct, spooled = StandInHost().start(), StandInHost().start()
    try:
        host_port = direct.url.split("//", 1)[1]
        library = real.Client(KEY, trk_host=host_port, trk_scheme="http")
        config = write_config(spooled, api_key=None)
        ours = compat.Client(KEY, trk_host="trk.kissmetrics.io", trk_scheme="https",
                             config=config)
        library_km = real.KM(KEY, host="trk.kissmetrics.io:80")
        library_km.client.trk_host = host_port  # its host must say port 80 or 443
        ours_km = compat.KM(KEY, host="trk.kissmetrics.io:80", config=config)
        before = time.time()
        for method, args, kwargs in CLIENT_CALLS:
            getattr(library, method)(*args, **kwargs)
            getattr(ours, method)(*args, **kwargs)
        for method, args in COMPAT_CALLS:
            getattr(library_km, method)(*args)
            getattr(ours_km, method)(*args)
        ours.close()
        after = time.time()
        flushed = run_kmagent("flush", "--timeout", "20", "--config", str(config))
        assert flushed.returncode == 0, flushed.stderr
        theirs = [(r.path, dict(r.params)) for r in direct.received]
        mine = [(r.path, dict(r.params)) for r in spooled.delivered()]
    finally:
        direct.stop()
        spooled.stop()
    calls = len(CLIENT_CALLS) + sum(1 for m, _ in COMPAT_CALLS if m != "identify")
    assert len(theirs) == len(mine) == calls
    for _, params in mine:
        # README: every event carries its time and _d=1, the time of the call if it
        # gave none (py-KISSmetrics then sent neither).
        if "_t" in params and before - 1 <= int(params["_t"]) <= after + 1:
            assert params.pop("_d") == "1"
            del params["_t"]
    # Compared as sets of requests: concurrent sending may reorder them.
    assert sorted(canonical(*r) for r in mine) == sorted(canonical(*r) for r in theirs)
