"""`codestream bench`'s figures: per-request outcomes summed up the way the common LLM serving benchmarks
do (vLLM's benchmark_serving), and the table printed at the end.

TTFT   request sent -> first token chunk received
TPOT   (end-to-end - TTFT) / (output tokens - 1), per request with more than one token
ITL    time between consecutive token messages of a request (a message may hold several tokens when the
       gateway merged chunks for a reader that fell behind)
E2E    request sent -> stream ended
Output / total throughput: output (prompt + output) tokens over the run's duration, first send -> last end.
Goodput: requests per second of those that completed and met every --slo limit.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from protos import api

LATENCIES = ("ttft", "tpot", "itl", "e2e")


@dataclass
class Outcome:
    """One request, as its client saw it. Times are time.perf_counter() seconds."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    sent: float = 0.0
    first_token: float = 0.0
    ended: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    messages: int = 0  # token messages received
    # From the Finished event's timings, measured from when the gateway accepted the request: until the
    # engine first scheduled it, and until the engine sampled its first token.
    server_queue_s: float | None = None
    server_first_token_s: float | None = None
    status: str = "OK"  # the gRPC status the stream ended with
    error: str = ""
    _last: float = 0.0  # the last token message's arrival

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def observe(self, event: api.GenerateEvent, now: float) -> None:
        """Note one event of the stream, received at `now`."""
        if event.HasField("tokens"):
            self.messages += 1
            if self.first_token:
                self.itl_s.append(now - self._last)
            else:
                self.first_token = now
            self._last = now
        elif event.HasField("queued"):
            self.prompt_tokens = event.queued.prompt_tokens
        elif event.HasField("finished"):
            self.output_tokens = event.finished.generated_tokens
            timings = event.finished.timings
            if timings.first_token_ms:
                self.server_queue_s = timings.queue_ms / 1000
                self.server_first_token_s = timings.first_token_ms / 1000

    @property
    def ttft_s(self) -> float | None:
        return self.first_token - self.sent if self.first_token else None

    @property
    def tpot_s(self) -> float | None:
        if not self.first_token or self.output_tokens < 2:
            return None
        return (self.ended - self.first_token) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.ended - self.sent


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, median, p90, p99 and max (linear interpolation between ranks, as numpy's default), in ms."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        pos = (len(ordered) - 1) * q
        low, high = math.floor(pos), math.ceil(pos)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    out = {"mean": sum(ordered) / len(ordered), "median": rank(0.5), "p90": rank(0.9), "p99": rank(0.99)}
    out["max"] = ordered[-1]
    return {k: round(v * scale, 3) for k, v in out.items()}


def parse_slos(specs: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (seconds); names from LATENCIES less itl."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"--slo {spec!r}: expected ttft:MS, tpot:MS or e2e:MS")
        try:
            slos[name] = float(value) / 1000
        except ValueError:
            raise ValueError(f"--slo {spec!r}: {value!r} is not a number of milliseconds") from None
    return slos


def meets(outcome: Outcome, slos: dict[str, float]) -> bool:
    if not outcome.ok:
        return False
    for name, limit in slos.items():
        value = getattr(outcome, f"{name}_s")
        if value is not None and value > limit:
            return False
    return True


def summarize(outcomes: list[Outcome], slos: dict[str, float]) -> dict[str, Any]:
    done = [o for o in outcomes if o.ok]
    start = min((o.sent for o in outcomes), default=0.0)
    duration = max((o.ended for o in outcomes), default=0.0) - start
    prompt_tokens = sum(o.prompt_tokens for o in done)
    output_tokens = sum(o.output_tokens for o in done)
    messages = sum(o.messages for o in done)
    statuses = Counter(o.status for o in outcomes if not o.ok)
    rate = (lambda n: round(n / duration, 3)) if duration > 0 else (lambda n: 0.0)
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "errors": sum(statuses.values()),
        "errors_by_status": dict(statuses),
        "error_samples": sorted({f"{o.status}: {o.error}" for o in outcomes if not o.ok})[:5],
        "duration_s": round(duration, 3),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": rate(len(done)),
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(prompt_tokens + output_tokens),
        "tokens_per_message": round(output_tokens / messages, 3) if messages else 0.0,
        "ttft_ms": percentiles([o.ttft_s for o in done if o.ttft_s is not None]),
        "tpot_ms": percentiles([o.tpot_s for o in done if o.tpot_s is not None]),
        "itl_ms": percentiles([gap for o in done for gap in o.itl_s]),
        "e2e_ms": percentiles([o.e2e_s for o in done]),
        # Where TTFT goes: gateway accepted -> engine scheduled; accepted -> engine's first token; and the
        # rest (client -> gateway before acceptance, engine -> Redis -> gateway -> client after the token).
        "server_queue_ms": percentiles([o.server_queue_s for o in done if o.server_queue_s is not None]),
        "server_ttft_ms": percentiles([o.server_first_token_s for o in done if o.server_first_token_s is not None]),
        "ttft_outside_engine_ms": percentiles(
            [o.ttft_s - o.server_first_token_s for o in done if o.ttft_s is not None and o.server_first_token_s]
        ),
        "slo_ms": {k: v * 1000 for k, v in slos.items()},
        "goodput": rate(sum(meets(o, slos) for o in done)) if slos else None,
    }


def print_table(result: dict[str, Any]) -> None:
    """The summary as a short text table."""
    s = result["summary"]
    c = result["config"]
    load = f"rate {c['rate']}/s" if c["rate"] else "all at once"
    load += f", concurrency {c['concurrency']}" if c["concurrency"] else ""
    print(f"\ncodestream bench: {result['model']['model_id']} at {c['target']}, {s['requests']} requests, {load}")
    print(f"{'completed':<24}{s['completed']:>12,}")
    print(f"{'errors':<24}{s['errors']:>12,}  {s['errors_by_status'] or ''}")
    print(f"{'duration (s)':<24}{s['duration_s']:>12,.2f}")
    print(f"{'prompt / output tokens':<24}{s['prompt_tokens']:>12,} / {s['output_tokens']:,}")
    print(f"{'requests/s':<24}{s['request_throughput']:>12,.2f}")
    print(f"{'output tokens/s':<24}{s['output_throughput']:>12,.1f}")
    print(f"{'total tokens/s':<24}{s['total_token_throughput']:>12,.1f}")
    if s["goodput"] is not None:
        limits = ", ".join(f"{k} <= {v:g} ms" for k, v in s["slo_ms"].items())
        print(f"{'goodput (requests/s)':<24}{s['goodput']:>12,.2f}  ({limits})")
    print(f"{'tokens per message':<24}{s['tokens_per_message']:>12,.2f}")
    print(f"\n{'ms':<8}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for name in LATENCIES:
        p = s[f"{name}_ms"]
        if p:
            print(f"{name.upper():<8}" + "".join(f"{p[k]:>10,.2f}" for k in ("mean", "median", "p90", "p99", "max")))
    for sample in s["error_samples"]:
        print(f"error: {sample}")
