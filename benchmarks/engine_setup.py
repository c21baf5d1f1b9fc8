"""What `benchmarks.engine` measures with: the model, its tokenizer, the workloads' prompts, the card's ceilings.

Kept apart from the benchmark's flow so that each piece reads on its own; nothing here times the engine.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from worker.engine.model_runner import random_weight_model
from worker.engine.tokenizer import load_tokenizer

try:
    import structlog  # noqa: F401
except ImportError:
    # The lent GPU machine's image has no structlog, which codestream.demo_model imports at the top but only
    # uses in ensure_demo_model (not called here): an empty stand-in lets the benchmark run without wheels.
    sys.modules["structlog"] = types.ModuleType("structlog")
from codestream.demo_model import build_tokenizer, tiny_llama_config

# Code Llama 7B's config.json, field for field (codellama/CodeLlama-7b-hf): the random-weight stand-in has
# exactly its shapes, so it runs exactly as fast as the real checkpoint.
CODELLAMA_7B: dict[str, Any] = {
    "vocab_size": 32016,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 16384,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
TINY_VOCAB = 2048  # the demo model's

# Prompt token ids start after <unk>, <s>, </s>, as a tokenized prompt would.
FIRST_PROMPT_ID = 3


@dataclass(frozen=True)
class Workloads:
    """W1, S1 and T1 of DESIGN.md ("Measuring"); QUICK is the CPU smoke-test version."""

    w1_requests: int = 256
    w1_prompt_min: int = 128
    w1_prompt_max: int = 1024
    w1_new_tokens: int = 256
    s1_prompt: int = 128
    s1_new_tokens: int = 256
    t1_prompt: int = 1024
    t1_runs: int = 5


QUICK = Workloads(
    w1_requests=8,
    w1_prompt_min=16,
    w1_prompt_max=64,
    w1_new_tokens=16,
    s1_prompt=16,
    s1_new_tokens=16,
    t1_prompt=64,
    t1_runs=3,
)


class Prompts:
    """Seeded random prompts. W1's come from random.Random(0) (lengths, then ids), as DESIGN.md fixes them.

    Every other prompt is fresh (never seen by the engine before), so a prefix cache cannot turn a timed
    prefill into a cache hit: warm-up, S1 and each T1 run all get prompts of their own.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._fresh = random.Random(1)

    def w1(self, w: Workloads) -> list[list[int]]:
        rng = random.Random(0)
        lengths = [rng.randint(w.w1_prompt_min, w.w1_prompt_max) for _ in range(w.w1_requests)]
        return [self._ids(rng, n) for n in lengths]

    def fresh(self, length: int) -> list[int]:
        return self._ids(self._fresh, length)

    def _ids(self, rng: random.Random, length: int) -> list[int]:
        return [rng.randrange(FIRST_PROMPT_ID, self.vocab_size) for _ in range(length)]


# ------------------------------------------------------------------------------------------------ model


def build_model(shape: str, model_path: str, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """A real checkpoint (model_path), or a random-weight stand-in of the given shape, on `device`."""
    if model_path:
        # Loaded on the host, then moved: a device_map would need accelerate, which the GPU image lacks.
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        return model.to(device).eval()
    if shape == "codellama-7b":
        config = LlamaConfig(**CODELLAMA_7B)
    elif shape == "tiny":
        config = tiny_llama_config(TINY_VOCAB)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    # Built directly on the device (nothing on the CPU, nothing written to disk), as a worker with
    # --random-weights builds it.
    return random_weight_model(config, device, dtype)


@dataclass
class ModelFacts:
    """The counts the floors need, read off the model itself."""

    num_params: int
    embedding_params: int  # input embedding table: only the rows of a step's tokens are read
    lm_head_params: int  # applied to sampled rows only
    element_bytes: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def matmul_params(self) -> int:
        """Parameters every token multiplies through (all but the embedding table and the LM head)."""
        return self.num_params - self.embedding_params - self.lm_head_params

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.element_bytes

    @property
    def weight_bytes_per_step(self) -> int:
        """Weights one forward pass reads: everything but the input embedding table."""
        return (self.num_params - self.embedding_params) * self.element_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_bytes


def model_facts(model: PreTrainedModel) -> ModelFacts:
    cfg = model.config
    num_heads = cfg.num_attention_heads
    return ModelFacts(
        num_params=sum(p.numel() for p in model.parameters()),
        embedding_params=model.get_input_embeddings().weight.numel(),
        lm_head_params=model.get_output_embeddings().weight.numel(),
        element_bytes=next(model.parameters()).element_size(),
        num_layers=cfg.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
    )


# -------------------------------------------------------------------------------------------- tokenizer


def build_vocab_tokenizer(vocab_size: int, model_path: str) -> tuple[Tokenizer, dict[str, Any]]:
    """The model's tokenizer, or for a stand-in a Code Llama-layout BPE of exactly `vocab_size` tokens.

    Detokenization runs for real in the engine (its CPU cost is part of serving), so every id the model can
    emit must decode. Training on the standard library normally yields the full 32,016 tokens (~8 s on two
    cores); if a Python's standard library is too small for that, the tokenizer is trained as large as it
    goes and padded with unused pieces up to vocab_size.
    """
    start = time.perf_counter()
    if model_path:
        tok = load_tokenizer(model_path)
        return tok, {"source": model_path, "vocab_size": tok.get_vocab_size(), "build_s": time.perf_counter() - start}
    try:
        tok, trained = build_tokenizer(vocab_size), vocab_size
    except RuntimeError as err:
        match = re.search(r"trained (\d+) tokens", str(err))
        if match is None:
            raise
        trained = int(match.group(1))
        tok = pad_vocabulary(build_tokenizer(trained), vocab_size)
    info = {
        "source": "codestream.demo_model.build_tokenizer",
        "vocab_size": tok.get_vocab_size(),
        "trained_tokens": trained,
        "padded_tokens": vocab_size - trained,
        "build_s": time.perf_counter() - start,
    }
    return tok, info


def pad_vocabulary(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    """Append pieces "<unused{i}>" (no merge produces them, so encoding is unchanged) up to vocab_size ids."""
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for token_id in range(len(vocab), vocab_size):
        vocab[f"<unused{token_id}>"] = token_id
    padded = Tokenizer.from_str(json.dumps(spec))
    if padded.get_vocab_size() != vocab_size:
        raise RuntimeError(f"padding gave {padded.get_vocab_size()} tokens, wanted {vocab_size}")
    return padded


# --------------------------------------------------------------------------------------------- ceilings


def _time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, each call timed on its own (CUDA events on a GPU, the host clock on CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """HBM bandwidth (device-to-device copy, bytes read + written) and the dense matrix rate, medians.

    On a GPU both take well under a second at full size (4 GiB, 8192³), so they are never shrunk; on a CPU
    (smoke tests) they are, or they would take minutes.
    """
    gpu = device.type == "cuda"
    copy_bytes = (4096 if gpu else 64) * 2**20
    n = 8192 if gpu else 512
    copy_s = _copy_seconds(copy_bytes, device, repeats=20 if gpu else 10)
    mm_s = _matmul_seconds(n, device, dtype, repeats=20 if gpu else 5)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the buffers are gone; give their memory back before the model loads
    return {
        "copy_bytes": copy_bytes,
        "copy_s_samples": copy_s,
        "bandwidth_bytes_per_s": 2 * copy_bytes / statistics.median(copy_s),  # read + write
        "matmul_n": n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_s_samples": mm_s,
        "matmul_flops_per_s": 2 * n**3 / statistics.median(mm_s),
    }


def _copy_seconds(num_bytes: int, device: torch.device, repeats: int) -> list[float]:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    src.random_(0, 256)  # real data, written once: no page is skipped or left untouched
    dst = torch.empty_like(src)
    return _time_calls(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)


def _matmul_seconds(n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> list[float]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _time_calls(lambda: a @ b, device, warmup=3, repeats=repeats)


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"card": "cpu", "torch_threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {
        "card": torch.cuda.get_device_name(device),
        "memory_bytes": props.total_memory,
        "multiprocessors": props.multi_processor_count,
        "cuda": torch.version.cuda,
    }


def card_slug(card: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', for file names."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def default_results_path(card: str, started: str) -> Path:
    return Path(__file__).parent / "results" / f"engine-{card_slug(card)}-{started}.json"
