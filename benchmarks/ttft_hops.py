"""Where a request's time to first token goes between the client and the engine: hop timestamps.

A diagnostic, not part of the service. `instrument DEST` writes copies of the gateway and worker modules
with a timestamp at each hop of a request's way to its first token (gateway: handler start, request
resolved, Generation opened, job enqueued, first token routed and yielded; worker: job read, screened,
added to the engine, first scheduled, first token sampled, step back on the loop, emit sent and answered)
plus the module that writes them (`HOP <request id> <name> <unix time>` on stderr, with CODESTREAM_HOPS=1);
and in the benchmark's client (codestream/bench.py), the request sent and its first token received.
Copy DEST over a checkout, run the serving benchmark's TTFT phase with CODESTREAM_HOPS=1, then
`report GATEWAY_LOG WORKER_LOG` prints the median and p90 of each hop over the measured requests.

    python -m benchmarks.ttft_hops instrument /tmp/hops && cp -r /tmp/hops/* .
    CODESTREAM_HOPS=1 python -m benchmarks.serving --phases ttft --out /tmp/out
    python -m benchmarks.ttft_hops report /tmp/out/serving-gateway.log /tmp/out/serving-worker.log CLIENT_LOG

The copies are made by text substitution on the current sources; an anchor that no longer matches fails
loudly. benchmarks/serving_ab.sh runs this on the GPU machine next to the uninstrumented figures.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import itertools
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HOPS_MODULE = '''"""Hop timestamps (benchmarks/ttft_hops.py): `HOP <request id> <name> <unix time>` on stderr."""

import os
import sys
import time

ON = os.environ.get("CODESTREAM_HOPS") == "1"
LAST = None  # (handler start, request resolved) of the request being opened
_CLIENT = [0]


def client_id():
    """The next client request's name: the client does not know the gateway's request ids."""
    _CLIENT[0] += 1
    return f"client-{_CLIENT[0]}"


def hop(request_id, name):
    if ON:
        sys.stderr.write(f"HOP {request_id} {name} {time.time():.6f}\\n")


def _collection(phase, info):
    hop(f"gc-{os.getpid()}", f"gc{info['generation']}_{phase}")


if ON:  # (imported at a process's first hop) its garbage collections too: `stalls` lists those near a stall
    import gc

    gc.callbacks.append(_collection)
'''

IMPORT = "from codestream import _hops"

# (file, anchor, replacement): each anchor must occur in the file; its first occurrence is replaced.
EDITS = [
    ("gateway/servicer.py", "        try:\n            resolved = resolve_request()\n",
     f"        {IMPORT}\n        started = _hops.time.time()\n"
     "        try:\n            resolved = resolve_request()\n"),
    ("gateway/servicer.py",
     "        remaining = context.time_remaining()\n        if remaining is not None and remaining <= 0:\n",
     "        _hops.LAST = (started, _hops.time.time())\n        remaining = context.time_remaining()\n"
     "        if remaining is not None and remaining <= 0:\n"),
    ("gateway/generations.py", "        if request_id in self.active:\n",
     f"        {IMPORT}\n        if _hops.LAST:\n"
     "            _hops.hop(request_id, f'g_recv@{_hops.LAST[0]:.6f}')\n"
     "            _hops.hop(request_id, f'g_resolved@{_hops.LAST[1]:.6f}')\n"
     "            _hops.hop(request_id, 'g_open')\n        if request_id in self.active:\n"),
    ("gateway/generations.py", "        if not verdict.admitted:\n",
     "        _hops.hop(request_id, 'g_enqueued')\n        if not verdict.admitted:\n"),
    ("gateway/router.py", "            inbox = self.inboxes.get(event.request_id)\n",
     f"            inbox = self.inboxes.get(event.request_id)\n            {IMPORT}\n"
     "            _hops.hop(event.request_id, 'g_dispatch')\n"),
    ("gateway/generation.py", "                if out.HasField(\"tokens\"):\n",
     f"                if out.HasField(\"tokens\"):\n                    {IMPORT}\n"
     "                    _hops.hop(self.request_id, 'g_yield')\n"),
    ("codestream/bench.py",
     "    outcome = Outcome(sent=time.perf_counter())\n    try:\n        async for event in stub.GenerateStream("
     "request, metadata=metadata, timeout=options.timeout_s):\n"
     "            outcome.observe(event, time.perf_counter())\n",
     f"    {IMPORT}\n    hop_id = _hops.client_id()\n    _hops.hop(hop_id, 'c_send')\n"
     "    outcome = Outcome(sent=time.perf_counter())\n    try:\n        async for event in stub.GenerateStream("
     "request, metadata=metadata, timeout=options.timeout_s):\n            had_token = outcome.first_token\n"
     "            outcome.observe(event, time.perf_counter())\n"
     "            if outcome.first_token and not had_token:\n                _hops.hop(hop_id, 'c_first')\n"),
    ("worker/intake.py", "                    req = await self._parse(entry_id, fields)\n",
     f"                    req = await self._parse(entry_id, fields)\n                    {IMPORT}\n"
     "                    _hops.hop(req.request_id, 'w_read')\n"),
    ("worker/intake.py", "            else:\n                self._start(req)\n",
     f"            else:\n                {IMPORT}\n"
     "                _hops.hop(req.request_id, 'w_screened')\n                self._start(req)\n"),
    ("worker/service.py",
     "                continue  # cancelled while queued\n            try:\n                self._add_to_engine(req)\n",
     f"                continue  # cancelled while queued\n            try:\n                {IMPORT}\n"
     "                _hops.hop(req.request_id, 'w_adding')\n                self._add_to_engine(req)\n"
     "                _hops.hop(req.request_id, 'w_added')\n"),
    ("worker/service.py", "                for out in outputs:\n                    self.book.collect(out, outbox)\n",
     f"                {IMPORT}\n                for out in outputs:\n"
     "                    _hops.hop(out.request_id, 'w_step_back')\n"
     "                    self.book.collect(out, outbox)\n"),
    ("worker/emitter.py", "        fenced = await self._emit(keys=keys, args=args)\n",
     f"        {IMPORT}\n        for e in emissions:\n            _hops.hop(e.request_id, 'w_emit_call')\n"
     "        fenced = await self._emit(keys=keys, args=args)\n"
     "        for e in emissions:\n            _hops.hop(e.request_id, 'w_emit_done')\n"),
    # Per engine step (a pseudo request "steps"): the step's call returned, on the engine thread or the loop.
    ("worker/service.py",
     "            return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn)\n",
     f"            {IMPORT}\n\n            def timed():\n                _hops.hop('steps', 'w_step_start')\n"
     "                result = fn()\n"
     "                _hops.hop('steps', 'w_step_done')\n                return result\n\n"
     "            return await asyncio.get_running_loop().run_in_executor(self._engine_thread, timed)\n"),
    ("worker/service.py", "                        outputs = self.engine.step()\n",
     f"                        {IMPORT}\n                        _hops.hop('steps', 'w_step_start')\n"
     "                        outputs = self.engine.step()\n"
     "                        _hops.hop('steps', 'w_step_done')\n"),
    ("worker/engine/engine.py", "                seq.first_scheduled_time = now\n",
     f"                seq.first_scheduled_time = now\n                {IMPORT}\n"
     "                _hops.hop(seq.request_id, 'w_sched')\n"),
    ("worker/engine/engine.py", "                seq.first_token_time = now\n",
     f"                seq.first_token_time = now\n                {IMPORT}\n"
     "                _hops.hop(seq.request_id, 'w_token')\n"),
]  # fmt: skip

ORDER = [
    "g_recv", "g_resolved", "g_open", "g_enqueued", "w_read", "w_screened", "w_adding", "w_added", "w_sched",
    "w_token", "w_step_back", "w_emit_call", "w_emit_done", "g_dispatch", "g_yield",
]  # fmt: skip


def instrument(dest: Path) -> None:
    texts: dict[str, str] = {}
    for path, anchor, replacement in EDITS:
        text = texts.get(path) or (ROOT / path).read_text()
        if anchor not in text:
            raise SystemExit(f"{path}: anchor not found (the source changed): {anchor!r}")
        texts[path] = text.replace(anchor, replacement, 1)
    texts["codestream/_hops.py"] = HOPS_MODULE
    for path, text in texts.items():
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_text(text)
    print(f"instrumented copies of {len(texts) - 1} modules under {dest}")


def report(logs: list[Path], skip: int = 3) -> None:
    """Median and p90 of each hop, over the requests that passed every hop (the first `skip`: warm-up)."""
    seen: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("HOP "):
                continue
            _, request_id, name, at = line.split()
            name, _, stamped = name.partition("@")  # g_recv@<time>: taken earlier, written at g_open
            seen[request_id].setdefault(name, float(stamped or at))
    rows = [hops for hops in seen.values() if all(name in hops for name in ORDER)][skip:]
    print(f"{len(rows)} requests")
    for a, b in itertools.pairwise(ORDER):
        gaps = sorted((row[b] - row[a]) * 1000 for row in rows)
        print(f"{a:>12} -> {b:<12} median {statistics.median(gaps):7.3f} ms  p90 {gaps[int(0.9 * len(gaps))]:7.3f}")
    outside = [(row["g_yield"] - row["g_recv"] - (row["w_token"] - row["w_sched"])) * 1000 for row in rows]
    print(f"handler start -> first token yielded, less the engine's step: median {statistics.median(outside):.3f} ms")
    # The client's side, matched by time: the request sent last before the handler started.
    clients = sorted((h["c_send"], h["c_first"]) for h in seen.values() if "c_send" in h and "c_first" in h)
    matched = []
    for row in rows:
        before = [c for c in clients if c[0] <= row["g_recv"] and c[1] >= row["g_yield"]]
        if before:
            matched.append((before[-1], row))
    if matched:
        to_handler = sorted((row["g_recv"] - sent) * 1000 for (sent, _), row in matched)
        to_client = sorted((first - row["g_yield"]) * 1000 for (_, first), row in matched)
        total = [(first - sent - (row["w_token"] - row["w_sched"])) * 1000 for (sent, first), row in matched]
        print(f"{'c_send':>12} -> {'g_recv':<12} median {statistics.median(to_handler):7.3f} ms  "
              f"p90 {to_handler[int(0.9 * len(to_handler))]:7.3f}")  # fmt: skip
        print(f"{'g_yield':>12} -> {'c_first':<12} median {statistics.median(to_client):7.3f} ms  "
              f"p90 {to_client[int(0.9 * len(to_client))]:7.3f}")  # fmt: skip
        print(f"client send -> first token received, less the engine's step: median {statistics.median(total):.3f} ms"
              f" ({len(matched)} requests)")  # fmt: skip


# Hops every token passes, in order (the others are a request's first token's only).
TOKEN_HOPS = ["w_step_back", "w_emit_call", "w_emit_done", "g_dispatch", "g_yield"]


def read_hops(logs: list[Path]) -> dict[str, dict[str, list[float]]]:
    """Each request's times at each hop, in the order written (a stamped name, `g_recv@<time>`, counts at the
    time it was written: `report` is what reads the stamp)."""
    times: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("HOP "):
                _, request_id, name, at = line.split()
                times[request_id][name.partition("@")[0]].append(float(at))
    return times


def tails(logs: list[Path], client_itl: tuple[float, float] | None = None) -> None:
    """Where the gaps between a stream's tokens grow (a sweep run with CODESTREAM_HOPS=1): for each hop every
    token passes, the gaps between consecutive tokens of a stream there, their median, p99 and the ratio. The
    hop where the ratio first jumps is where the tail comes from; `client_itl` (median, p99 ms, from the
    bench's summary) is the last hop's."""
    times = read_hops(logs)
    print(f"{len(times)} requests; gaps between a stream's consecutive tokens at each hop:")
    for name in TOKEN_HOPS:
        gaps = sorted((b - a) * 1000 for hops in times.values() for a, b in itertools.pairwise(hops.get(name, [])))
        if len(gaps) < 100:
            print(f"{name:>12}: {len(gaps)} gaps, too few")
            continue
        median, p99 = statistics.median(gaps), gaps[int(0.99 * (len(gaps) - 1))]
        long = sum(g > 1.8 * median for g in gaps)
        print(f"{name:>12}: {len(gaps):6d} gaps, median {median:6.2f} ms, p99 {p99:6.2f} ms ({p99 / median:.2f}), "
              f"{long} over 1.8x the median")  # fmt: skip
    if client_itl:
        print(f"{'client':>12}: ITL median {client_itl[0]:6.2f} ms, p99 {client_itl[1]:6.2f} ms "
              f"({client_itl[1] / client_itl[0]:.2f})")  # fmt: skip


# A token's way back from the engine, each hop's time taken as the last one at or before the next hop's (every
# event passes every hop once and in order); and what the gap between two tokens grows by from one to the next.
# (Not w_emit_done: the gateway often routes an event before the worker has read the publish's reply.)
CHAIN = ["g_yield", "g_dispatch", "w_emit_call", "w_step_back", "w_step_done"]
SHARES = [
    "gateway: routed -> to gRPC", "publish -> gateway routed", "loop: back -> publish",
    "step done -> back on the loop", "engine: step to step",
]  # fmt: skip


def token_chains(hops: dict[str, list[float]], steps: list[float]) -> list[list[float]]:
    """One request's tokens, each as its times at the hops of CHAIN. From each token's step back on the worker's
    loop forward: at each later hop, the request's next event not before the hop before (events pass every hop
    in order; a hop held up past the next step's earlier hops still gets its own event). The step's call
    returned at the last w_step_done before its step back."""
    chains = [[at] for at in sorted(hops.get("w_step_back", []))]
    for name in reversed(CHAIN[:-2]):  # w_emit_call, g_dispatch, g_yield
        events, j, kept = sorted(hops.get(name, [])), 0, []
        for chain in chains:
            while j < len(events) and events[j] < chain[-1]:
                j += 1  # (an event of the request's own that no token made: its start, its end)
            if j == len(events):
                break
            kept.append([*chain, events[j]])
            j += 1
        chains = kept
    tokens = []
    for chain in chains:
        i = bisect.bisect_right(steps, chain[0]) - 1
        if i >= 0:
            tokens.append([*reversed(chain), steps[i]])
    return tokens


def stalls(logs: list[Path], window: tuple[float, float] | None = None) -> None:
    """Which hop makes the long gaps between a stream's tokens (a sweep run with CODESTREAM_HOPS=1). For each
    pair of consecutive tokens of a stream, the gap at each hop of CHAIN; what a hop's gap adds over the gap
    at the hop before it is that hop's share. Printed: each share's median over all pairs and over the long
    ones (gateway gap over 1.8x its median), and how often each share was the one most over its median."""
    times = read_hops(logs)
    step_hops = times.pop("steps", {})
    steps, starts = sorted(step_hops.get("w_step_done", [])), sorted(step_hops.get("w_step_start", []))
    pairs = []  # per pair of consecutive tokens of a stream: the gap at each hop of CHAIN, ms
    ends, yields = [], []  # and when the later token's step call returned, and when it went to gRPC
    for request_id, hops in times.items():
        if request_id.startswith("client-") or not hops.get("g_yield"):
            continue
        tokens = [t for t in token_chains(hops, steps) if window is None or window[0] <= t[0] <= window[1]]
        pairs += [[(b - a) * 1000 for a, b in zip(t0, t1, strict=True)] for t0, t1 in itertools.pairwise(tokens)]
        ends += [t1[-1] for _, t1 in itertools.pairwise(tokens)]
        yields += [t1[0] for _, t1 in itertools.pairwise(tokens)]
    if len(pairs) < 100:
        print(f"{len(pairs)} token pairs: too few (run a sweep with CODESTREAM_HOPS=1)")
        return
    # The call that returned the later token's step: how long it took on the engine thread (GPU wait included).
    calls = {done: (done - starts[i - 1]) * 1000 for done in steps if (i := bisect.bisect_right(starts, done)) > 0}
    shares = [[gap[k] - gap[k + 1] for k in range(len(gap) - 1)] + [gap[-1]] for gap in pairs]
    typical = [statistics.median(s[k] for s in shares) for k in range(len(SHARES))]
    limit = 1.8 * statistics.median(gap[0] for gap in pairs)
    long = [s for gap, s in zip(pairs, shares, strict=True) if gap[0] > limit]
    long_at = [(at, gap[0], s) for at, gap, s in zip(yields, pairs, shares, strict=True) if gap[0] > limit]
    if calls:
        every = [calls[e] for e in ends if e in calls]
        slow = [calls[e] for gap, e in zip(pairs, ends, strict=True) if gap[0] > limit and e in calls] or [0.0]
        print(
            f"the step call that returned the later token: median {statistics.median(every):.2f} ms over all pairs, "
            f"{statistics.median(slow):.2f} ms over the long ones (max {max(slow):.2f})"
        )
    print(f"{len(pairs)} token pairs, {len(long)} with a gap at the gateway over {limit:.2f} ms (1.8x the median)")
    print(f"{'share of the gap':<32}{'median, all':>13}{'median, long':>14}{'mean, long':>12}{'most over':>11}")
    most = collections.Counter(max(range(len(s)), key=lambda k: s[k] - typical[k]) for s in long)
    for k, what in enumerate(SHARES):
        tail = [s[k] for s in long] or [0.0]
        print(f"{what:<32}{typical[k]:>11.2f}ms{statistics.median(tail):>12.2f}ms{statistics.mean(tail):>10.2f}ms"
              f"{most[k]:>11d}")  # fmt: skip
    stall_events(long_at, typical, times)


def stall_events(long_at: list[tuple[float, float, list[float]]], typical: list[float], times: dict) -> None:
    """The long gaps grouped into events (gaps ending within 5 ms of each other: one stall hits every stream
    of a step), each with its shares over their medians, and what else happened in its window: garbage
    collections (gc-<pid>) and the hiccup probe's late wake-ups (probe-<pid>; benchmarks/hiccups.py)."""
    others = []  # (start, end, what)
    for who, hops in times.items():
        if who.startswith(("gc-", "probe-")):
            starts = sorted(t for name, ts in hops.items() if name.endswith("start") for t in ts)
            ends = sorted(t for name, ts in hops.items() if name.endswith("stop") or name.endswith("end") for t in ts)
            others += [(a, b, who) for a, b in zip(starts, ends, strict=False)]
    events: list[list[tuple[float, float, list[float]]]] = []
    for item in sorted(long_at):
        if events and item[0] - events[-1][-1][0] < 0.005:
            events[-1].append(item)
        else:
            events.append([item])
    print(f"{len(events)} stall events (long gaps within 5 ms of each other); shares over their medians, ms:")
    for event in events:
        at, gap = event[0][0], max(g for _, g, _ in event)
        over = [statistics.median(s[k] for _, _, s in event) - typical[k] for k in range(len(typical))]
        near = [f"{who} {(b - a) * 1000:.1f} ms at {(a - at) * 1000:+.1f}" for a, b, who in others
                if at - gap / 1000 <= b and a <= at]  # fmt: skip
        print(f"  {at:.3f}: {len(event):3d} streams, gap up to {gap:.1f} ms; "
              + ", ".join(f"{w.split(':')[0]} {o:+.1f}" for w, o in zip(SHARES, over, strict=True))
              + (f"; meanwhile: {'; '.join(near)}" if near else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("instrument").add_argument("dest", type=Path)
    rep = sub.add_parser("report")
    rep.add_argument("logs", type=Path, nargs="+")
    tail = sub.add_parser("tails", help="per-token gaps at each hop (a sweep run with CODESTREAM_HOPS=1)")
    tail.add_argument("logs", type=Path, nargs="+")
    tail.add_argument("--client-itl", type=float, nargs=2, metavar=("MEDIAN", "P99"))
    stall = sub.add_parser("stalls", help="which hop makes the long gaps (a sweep run with CODESTREAM_HOPS=1)")
    stall.add_argument("logs", type=Path, nargs="+")
    stall.add_argument("--load", default="", help="REPORT.json:LOAD (a sweep's concurrency, e.g. 32#2, or w1)")
    args = parser.parse_args(argv)
    if args.command == "stalls":
        window = None
        if args.load:  # only the tokens of one load of a serving benchmark's report
            path, _, key = args.load.partition(":")
            service = json.loads(Path(path).read_text())["service"]
            window = tuple((service["sweep"].get(key) or service[key])["window_unix"])
            print(f"load {key}: {window[1] - window[0]:.1f} s")
        stalls(args.logs, window)
    elif args.command == "instrument":
        instrument(args.dest)
    elif args.command == "tails":
        tails(args.logs, tuple(args.client_itl) if args.client_itl else None)
    else:
        report(args.logs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
