"""Targeted fidelity probe: one publisher bus, one subscriber bus (other connections);
each body published alone (a committed notice) and compared with read()."""
from __future__ import annotations
import sys, trio, chatbus
from common import open_pair

BODIES = [
    "nul \u0000 inside", {"a\u0000b": 1}, "\u2028\u2029", 1e308, -0.0, 2**63, -(2**63) - 1,
    10**4000, 1.5e-320, {"x": "\\u0041 literal backslash-u"}, "😀" * 1000, "a" * 4094,
    "a" * 4093, "é" * 2046, {"dup": [1, 2], "nested": {"deep": [[[[{}]]]]}}, [], {}, "", None,
    True, 0, "\x1e", "</script>", "\ufeffbom",
]
KEYS = [None, "k/1", 'k"2', "ключ3", "k\\4", "😀5", "k\u00006" ]

async def main(backend):
    async with open_pair(backend) as (s1, n1), open_pair(backend) as (s2, n2):
        async with chatbus.open_bus(store=s1, notifier=n1) as pub_bus, chatbus.open_bus(store=s2, notifier=n2) as sub_bus:
            for stream in ['fid"el\\ity{}', "fidélité😀" * 25, "f" * 256]:
                await pub_bus.delete_stream(stream)
                sent = []
                async with sub_bus.open_subscriber(stream) as sub:
                    for i, body in enumerate(BODIES):
                        key = KEYS[i % len(KEYS)]
                        try:
                            m = await pub_bus.publish(stream, body, key=None if key is None else f"{key}-{i}")
                        except Exception as e:
                            print("publish refused", repr(body)[:40], type(e).__name__, str(e)[:80])
                            continue
                        sent.append(m)
                        got = await sub.__anext__()
                        if (got.id, got.body, got.key, got.created_at) != (m.id, m.body, m.key, m.created_at) or type(got.body) is not type(m.body):
                            print("MISMATCH live vs publish", stream[:20], m.id, repr(m.body)[:60], repr(got.body)[:60])
                rows = await sub_bus.read(stream, limit=1000)
                for a, b in zip(rows, sent):
                    if (a.id, a.body, a.key, a.created_at) != (b.id, b.body, b.key, b.created_at):
                        print("MISMATCH read vs publish", a.id, repr(a.body)[:60], repr(b.body)[:60])
                print(stream[:20], "checked", len(sent))

trio.run(main, sys.argv[1])
