"""The TTFT hop diagnostic (benchmarks/ttft_hops.py) still fits the sources it instruments."""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

from benchmarks import ttft_hops


def test_every_hop_anchor_matches_the_current_sources_and_the_copies_compile(tmp_path: Path) -> None:
    ttft_hops.instrument(tmp_path)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py"))
    assert written == sorted({path for path, _, _ in ttft_hops.EDITS} | {"codestream/_hops.py"})
    for path in written:
        py_compile.compile(str(tmp_path / path), doraise=True)
    # adding, added, step back; each step's start and end, on the engine thread or on the loop
    assert (tmp_path / "worker/service.py").read_text().count("_hops.hop(") == 7
    assert (tmp_path / "worker/intake.py").read_text().count("_hops.hop(") == 2  # read, screened
    assert (tmp_path / "codestream/bench.py").read_text().count("_hops.hop(") == 2  # sent, first token


def test_report_gives_each_hop_its_median(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines, client = [], []
    for r in range(5):  # request r: 14 hops, 1 ms apart but the engine step (w_sched -> w_token), 10 ms
        at = 1000.0 + r
        for name in ttft_hops.ORDER:
            at += 0.010 if name == "w_token" else 0.001
            stamped = f"{name}@{at:.6f}" if name in ("g_recv", "g_resolved") else name
            lines.append(f"HOP req-{r} {stamped} {at + 5:.6f}" if "@" in stamped else f"HOP req-{r} {name} {at:.6f}")
        # The client's side, in its own log: sent 0.5 ms before the handler starts, the token 0.25 ms after.
        client.append(f"HOP client-{r} c_send {1000.0 + r + 0.001 - 0.0005:.6f}")
        client.append(f"HOP client-{r} c_first {at + 0.00025:.6f}")
    (tmp_path / "g.log").write_text("\n".join(lines) + "\nnot a hop line\n")
    (tmp_path / "c.log").write_text("\n".join(client) + "\n")
    ttft_hops.report([tmp_path / "g.log", tmp_path / "c.log"], skip=1)
    out = capsys.readouterr().out
    assert out.startswith("4 requests")
    assert "w_sched -> w_token      median  10.000 ms" in out
    assert "g_recv -> g_resolved   median   1.000 ms" in out
    assert "less the engine's step: median 13.000 ms" in out
    assert "c_send -> g_recv       median   0.500 ms" in out
    assert "g_yield -> c_first      median   0.250 ms" in out
    assert "first token received, less the engine's step: median 13.750 ms (4 requests)" in out


def test_stalls_blames_the_hop_where_a_step_was_held_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Four streams, a 10 ms step; each step's tokens go through the worker's loop, the publish and the gateway
    1 ms apart. At step 20 the publish is held up for 9 ms, with a probe asleep meanwhile: every stream's gap
    there is long, the share that grew is the publish's, and the probe's hiccup is listed next to it."""
    lines = []
    for step in range(40):
        done = 1000.0 + step * 0.010
        held = 0.009 if step == 20 else 0.0
        lines += [f"HOP steps w_step_start {done - 0.009:.6f}", f"HOP steps w_step_done {done:.6f}"]
        for r in range(4):
            hops = {"w_step_back": done + 0.0005, "w_emit_call": done + 0.001}
            hops |= {"g_dispatch": done + 0.002 + held, "g_yield": done + 0.003 + held + r * 0.0001}
            lines += [f"HOP req-{r} {name} {at:.6f}" for name, at in hops.items()]
    stall_at = 1000.0 + 20 * 0.010
    lines += [f"HOP probe-7 hiccup_start {stall_at + 0.002:.6f}", f"HOP probe-7 hiccup_end {stall_at + 0.010:.6f}"]
    (tmp_path / "all.log").write_text("\n".join(lines) + "\n")
    ttft_hops.stalls([tmp_path / "all.log"])
    out = capsys.readouterr().out
    assert "156 token pairs, 4 with a gap at the gateway over 18.00 ms" in out
    publish = next(line for line in out.splitlines() if line.startswith("publish -> gateway routed"))
    assert publish.split() == ["publish", "->", "gateway", "routed", "0.00ms", "9.00ms", "9.00ms", "4"]
    assert "1 stall events" in out
    event = next(line for line in out.splitlines() if "streams, gap up to" in line)
    assert "4 streams, gap up to 19.0 ms" in event
    assert "publish -> gateway routed +9.0" in event and "engine +0.0" in event
    assert "meanwhile: probe-7 8.0 ms at -10.0" in event
