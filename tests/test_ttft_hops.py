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
    assert (tmp_path / "worker/service.py").read_text().count("_hops.hop(") == 3  # adding, added, step back
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
