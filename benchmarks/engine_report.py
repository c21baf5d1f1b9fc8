"""The engine benchmark's record: its JSON (rewritten after every phase), the run's header (card, versions,
commit), and the table printed last."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from transformers import PreTrainedModel

from benchmarks.engine_setup import CODELLAMA_7B, ModelFacts, Workloads

REPO = Path(__file__).resolve().parent.parent
# Issue 3's targets (H100, bf16, Code Llama 7B shape); shown only for that shape.
TARGETS = {"w1_tps": "≥ 3,500", "s1_tpot": "≤ 5.3", "t1_ttft": "≤ 25"}


class Report:
    """The run's JSON, rewritten whole (atomically) after every phase."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def header(
    args: argparse.Namespace,
    started: datetime.datetime,
    hardware: dict[str, Any],
    w: Workloads,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    commit = git("rev-parse", "HEAD")
    return {
        "benchmark": "engine",
        "date_utc": started.isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.engine", *sys.argv[1:]]),
        "args": vars(args),
        **hardware,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
        "workloads": dataclasses.asdict(w),
        "w1_peer_requests": min(args.w1_requests or w.w1_requests, w.w1_requests),
    }


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "triton": triton_version,
    }


def git(*command: str) -> str | None:
    """Output of a git command in the repository; None where there is no git (a copied tree)."""
    try:
        done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def model_record(args: argparse.Namespace, model: PreTrainedModel, facts: ModelFacts, build_s: float) -> dict[str, Any]:
    config = model.config
    fields = [k for k in CODELLAMA_7B if k != "rope_theta"]
    return {
        "shape": "checkpoint" if args.model else args.shape,
        "path": args.model or None,
        "random_weights": not args.model,
        "config": {k: getattr(config, k, None) for k in fields}
        | {"rope_parameters": getattr(config, "rope_parameters", None)},
        "num_params": facts.num_params,
        "weight_bytes": facts.weight_bytes,
        "weight_bytes_per_step": facts.weight_bytes_per_step,
        "kv_bytes_per_token": facts.kv_bytes_per_token,
        "build_s": build_s,
    }


def brief(result: dict[str, Any]) -> str:
    """A progress line's summary of one result (and of the workloads nested in it)."""
    if "error" in result:
        return f"ERROR {result['error']}"
    parts: list[str] = []

    def add(prefix: str, figures: dict[str, Any]) -> None:
        if figures.get("tokens_per_s") is not None:
            parts.append(f"{prefix}{figures['tokens_per_s']:,.1f} tok/s")
        parts.extend(
            f"{prefix}{name[:4].upper()} {figures[name] * 1e3:.2f} ms"
            for name in ("ttft_s", "tpot_s")
            if figures.get(name) is not None
        )

    add("", result)
    for key, value in result.items():
        if isinstance(value, dict):
            add(f"{key} ", value)
    return ", ".join(parts) or "done"


# -------------------------------------------------------------------------------------------- the table

PEERS = {"hf_generate": "HF generate", "hf_generate_static": "HF static+compile", "hf_continuous_batching": "HF CB"}


def table(data: dict[str, Any], show_targets: bool) -> list[dict[str, Any]]:
    """One row per figure: ours, its floor and the percentage of it reached, the issue's target, the peers.

    Percent of floor: measured / floor for throughputs, floor / measured for times (100% = at the floor).
    """
    ours, peers, fl = data.get("ours", {}), data.get("peers", {}), data.get("floors", {})
    w1_requests = data["workloads"]["w1_requests"]
    w1_floor = (fl.get("w1") or {}).get("tokens_per_s")
    generate_peers = {"hf_generate": "s1", "hf_generate_static": "s1"}
    specs: list[tuple[str, str, str, str, float | None, str | None, dict[str, str]]] = [
        # figure, unit, workload, key, floor, target, {peer: its workload}
        ("W1 output throughput", "tok/s", "w1", "tokens_per_s", w1_floor, "w1_tps", {"hf_continuous_batching": ""}),
        ("S1 time per output token", "ms", "s1", "tpot_s", fl.get("s1_tpot_s"), "s1_tpot", generate_peers),
        ("S1 output throughput", "tok/s", "s1", "tokens_per_s", fl.get("s1_tokens_per_s"), None, generate_peers),
        ("S1 time to first token", "ms", "s1", "ttft_s", fl.get("s1_ttft_s"), None, generate_peers),
        ("T1 time to first token", "ms", "t1", "ttft_s", fl.get("t1_ttft_s"), "t1_ttft", {"hf_generate": "t1"}),
    ]
    rows = []
    for figure, unit, workload, key, floor, target, peer_workloads in specs:
        scale = 1e3 if unit == "ms" else 1.0
        value = figure_of(ours.get(workload), key, scale)
        floor_value = floor * scale if floor else None
        pct = None
        if isinstance(value, float) and floor_value:
            pct = 100 * (value / floor_value if unit == "tok/s" else floor_value / value)
        notes = []
        if (ours.get(workload) or {}).get("partial"):
            notes.append("ours: partial run (deadline)")
        cb, static = peers.get("hf_continuous_batching") or {}, peers.get("hf_generate_static") or {}
        if "hf_continuous_batching" in peer_workloads and cb.get("requests", w1_requests) < w1_requests:
            notes.append(f"HF CB ran the first {cb['requests']} of the {w1_requests} requests")
        if "hf_generate_static" in peer_workloads and static.get("compiled") is False:
            notes.append("HF static cache ran without torch.compile (transformers compiles on CUDA only)")
        peer_values = {peer: peer_figure(peers.get(peer), pw, key, scale) for peer, pw in peer_workloads.items()}
        rows.append(
            {
                "figure": figure,
                "unit": unit,
                "ours": value,
                "floor": floor_value,
                "pct_of_floor": pct,
                "target": TARGETS[target] if target and show_targets else None,
                **peer_values,
                "notes": notes,
            }
        )
    return rows


def peer_figure(result: dict[str, Any] | None, workload: str, key: str, scale: float) -> float | str | None:
    if result and "error" in result:
        return "error"
    return figure_of(result.get(workload) if result and workload else result, key, scale)


def figure_of(result: dict[str, Any] | None, key: str, scale: float) -> float | str | None:
    if not result:
        return None
    if "error" in result:
        return "error"
    value = result.get(key)
    return value * scale if isinstance(value, (int, float)) else None


def fmt(value: float | str | None, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "tok/s":
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return f"{value:.2f}"


def print_summary(data: dict[str, Any]) -> None:
    """Context lines (ceilings, engine, W1 anatomy, peer notes, errors), then the table, last."""
    c, engine, ours, peers = data["ceilings"], data.get("engine", {}), data.get("ours", {}), data.get("peers", {})
    print()
    print(f"card: {data['card']}  torch {data['versions']['torch']}  transformers {data['versions']['transformers']}")
    print(
        f"ceilings: HBM copy {c['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s (read + write), "
        f"matmul {c['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({c['matmul_n']}³ {c['matmul_dtype']})"
    )
    if "startup_s" in engine:
        warmup = ours.get("warmup", {})
        print(
            f"engine: start-up {engine['startup_s']:.2f} s, KV pool {engine['kv_capacity_tokens']:,} tokens "
            f"({engine['num_blocks']:,} blocks of {engine['config']['block_size']})"
            + (f", warm-up {warmup['elapsed_s']:.2f} s" if "elapsed_s" in warmup else "")
        )
    w1 = ours.get("w1", {})
    if "steps" in w1:
        print(
            f"ours W1: {w1['output_tokens']:,}/{w1['expected_tokens']:,} tokens in {w1['wall_s']:.2f} s, "
            f"{w1['steps']} steps, mean batch {w1['mean_batch']:.1f} (max {w1['max_batch']}), "
            f"{100 * w1['in_step_s'] / w1['wall_s']:.1f}% of the time inside engine.step(), "
            f"{w1['preemptions']} preemptions" + (" — PARTIAL: stopped at the deadline" if w1["partial"] else "")
        )
    fw1 = (data.get("floors") or {}).get("w1")
    if fw1:
        print(
            f"W1 floor: prefill {fw1['prefill_s']:.2f} s + decode {fw1['decode_s']:.2f} s "
            f"(batch {fw1['batch']}, {fw1['decode_steps']} steps, KV read {fw1['kv_read_bytes'] / 1e12:.2f} TB)"
        )
    static = peers.get("hf_generate_static", {})
    if "compiled" in static:
        print(f"HF static cache: compiled={static['compiled']}, warm-up (compile) {static.get('warmup_s', 0):.1f} s")
    cb = peers.get("hf_continuous_batching", {})
    if "tokens_per_s" in cb:
        print(
            f"HF CB: {cb['requests']} requests, {cb['generated_tokens']:,}/{cb['expected_tokens']:,} tokens, "
            f"attention {cb['attn_implementation']}, window: {cb['window']} {cb['window_s']:.2f} s "
            f"(whole call {cb['call_s']:.2f} s)" + (f", errors: {cb['errors']}" if cb["errors"] else "")
        )
    for scope, results in (("ours", ours), ("peer", peers)):
        for name, result in results.items():
            if "error" in result:
                print(f"{scope} {name} failed: {result['error']}")

    headers = ["figure", "unit", "ours", "% of floor", "floor", "target", *PEERS.values()]
    lines = [
        [
            row["figure"] + (" *" if row["notes"] else ""),
            row["unit"],
            fmt(row["ours"], row["unit"]),
            fmt(row["pct_of_floor"], "%"),
            fmt(row["floor"], row["unit"]),
            row["target"] or "—",
            *(fmt(row.get(peer), row["unit"]) if peer in row else "" for peer in PEERS),
        ]
        for row in data["table"]
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *lines, strict=True)]
    print()
    for i, line in enumerate([headers, *lines]):
        print(
            "  ".join(
                cell.ljust(width) if j < 2 else cell.rjust(width)
                for j, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * width for width in widths))
    for note in dict.fromkeys(note for row in data["table"] for note in row["notes"]):
        print(f"* {note}")
