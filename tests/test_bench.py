"""`codestream bench` against a real stack (gateway + worker on the tiny model, real Redis), and the
random-weight stand-in that the GPU serving benchmark runs the worker on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from codestream.bench import Options, bench, load_prompts
from codestream.bench_report import Outcome, parse_slos, percentiles, summarize
from codestream.cli import main
from tests.conftest import running_stack


def test_percentiles_and_summary_follow_the_serving_benchmark_definitions():
    assert percentiles([0.001, 0.002, 0.003, 0.004, 0.010]) == {
        "mean": 4.0, "median": 3.0, "p90": 7.6, "p99": 9.76, "max": 10.0,
    }  # fmt: skip
    # Sent at 0, first token at 0.1, 5 tokens, ended at 0.5: TPOT (0.5 - 0.1) / 4.
    fast = Outcome(10, 5, sent=0.0, first_token=0.1, ended=0.5, itl_s=[0.1] * 4, messages=5)
    slow = Outcome(10, 5, sent=1.0, first_token=1.9, ended=2.0, itl_s=[0.05] * 2, messages=3)
    failed = Outcome(sent=0.5, ended=0.6, status="RESOURCE_EXHAUSTED", error="queue full")
    s = summarize([fast, slow, failed], parse_slos(["ttft:500"]))
    assert (s["requests"], s["completed"], s["errors"]) == (3, 2, 1)
    assert s["errors_by_status"] == {"RESOURCE_EXHAUSTED": 1}
    assert s["duration_s"] == 2.0 and s["output_throughput"] == 5.0 and s["total_token_throughput"] == 15.0
    assert s["tpot_ms"]["max"] == 100.0 and s["tpot_ms"]["median"] == 62.5
    assert s["ttft_ms"]["median"] == 500.0
    assert s["goodput"] == 0.5  # only `fast` met ttft <= 500 ms
    assert s["tokens_per_message"] == 1.25
    with pytest.raises(ValueError, match="itl"):
        parse_slos(["itl:5"])


def test_random_prompts_are_seeded_and_match_the_engine_benchmarks_w1():
    from benchmarks.engine_setup import Prompts, Workloads

    options = Options(input_len="128:1024")
    prompts = load_prompts(options, vocab_size=32016, count=256, seed=0)
    w1 = Prompts(32016).w1(Workloads())
    assert [list(p.token_ids) for p in prompts] == w1
    assert load_prompts(options, 32016, 4, seed=1)[0] != prompts[0]
    code = load_prompts(replace(options, prompts="code"), 32016, 4, 0)
    assert len(code) >= 40 and all(p.text.startswith("def ") for p in code)


async def test_closed_loop_open_loop_and_errors_against_a_real_stack(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        target = f"127.0.0.1:{stack.gateway.port}"
        base = Options(target=target, input_len="8:48", output_len=12, progress=False)
        closed = await bench(replace(base, num_prompts=12, concurrency=4, warmup=1, slo=("ttft:60000",)))
        s = closed["summary"]
        assert (s["completed"], s["errors"], s["output_tokens"]) == (12, 0, 12 * 12)
        assert 12 * 8 <= s["prompt_tokens"] <= 12 * 48
        assert s["ttft_ms"]["median"] > 0 and s["itl_ms"]["p99"] >= s["itl_ms"]["median"] > 0
        assert s["e2e_ms"]["median"] > s["ttft_ms"]["median"]
        assert s["goodput"] == s["request_throughput"]  # a 60 s TTFT limit: every request met it
        assert closed["model"]["vocab_size"] == stack.gateway.generations.card.vocab_size
        # At most 4 in flight: the worker never held more.
        assert stack.worker.counts["taken"] == 13

        opened = await bench(replace(base, num_prompts=6, rate=20.0, prompts="code", temperature=0.8))
        assert opened["summary"]["completed"] == 6 and opened["summary"]["errors"] == 0

        # Over the gateway's max_new_tokens limit: every request fails with INVALID_ARGUMENT, counted, not raised.
        refused = await bench(replace(base, num_prompts=3, output_len=100_000))
        assert refused["summary"]["errors_by_status"] == {"INVALID_ARGUMENT": 3}
        assert "max_new_tokens" in refused["summary"]["error_samples"][0]


async def test_the_blocking_client_measures_what_the_asyncio_one_does(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        target = f"127.0.0.1:{stack.gateway.port}"
        base = Options(target=target, num_prompts=4, input_len="8:48", output_len=12, progress=False)
        aio, sync = await bench(base), await bench(replace(base, client="sync"))
        for result in (aio, sync):
            s = result["summary"]
            assert (s["completed"], s["errors"], s["output_tokens"]) == (4, 0, 4 * 12)
            assert 0 < s["ttft_ms"]["median"] < s["e2e_ms"]["median"] and s["itl_ms"]["median"] > 0
        # Same seed, same prompts.
        assert aio["summary"]["prompt_tokens"] == sync["summary"]["prompt_tokens"]
        assert sync["config"]["client"] == "sync"
        refused = await bench(replace(base, client="sync", num_prompts=2, output_len=100_000))
        assert refused["summary"]["errors_by_status"] == {"INVALID_ARGUMENT": 2}
        with pytest.raises(ValueError, match="one request at a time"):
            await bench(replace(base, client="sync", concurrency=4))


def test_cli_writes_json(redis_url: str, demo_model_dir: Path, tmp_path: Path, capsys):
    import asyncio

    async def run() -> int:
        async with running_stack(redis_url, demo_model_dir) as stack:
            argv = ["bench", "--target", f"127.0.0.1:{stack.gateway.port}", "--num-prompts", "3"]
            argv += ["--input-len", "16", "--output-len", "4", "--json", str(tmp_path / "r.json"), "--no-progress"]
            return await asyncio.to_thread(main, argv)

    assert asyncio.run(run()) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["summary"]["completed"] == 3 and result["config"]["input_len"] == "16"
    assert "output tokens/s" in capsys.readouterr().out


def test_random_weights_need_no_weight_files(tmp_path: Path):
    from codestream.demo_model import build_demo_model
    from worker.engine import EngineConfig, LLMEngine, SamplingParams

    model_dir = build_demo_model(tmp_path / "standin", with_weights=False)
    assert not list(model_dir.glob("*.safetensors"))
    with pytest.raises(OSError):
        LLMEngine(EngineConfig(model=str(model_dir), device="cpu", num_blocks=64))
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", num_blocks=64, random_weights=True))
    engine.add_request("a", [1, 5, 9], SamplingParams(max_new_tokens=4, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert sum(len(o.new_token_ids) for o in outputs) == 4
