"""Runs the model over a packed batch of tokens with the KV cache in paged blocks.

Weights and module definitions come from transformers (a Llama checkpoint, which Code Llama is); the
forward pass is ours, so that every step sees one flat batch of tokens from many sequences, reads and
writes K/V through block tables, and computes logits only for the tokens that are sampled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from worker.engine.attention_backends import TorchBackend, TritonBackend
from worker.engine.config import EngineConfig
from worker.engine.cuda_graphs import DecodeGraphs
from worker.engine.llama import FusedLlama, TorchLlama
from worker.engine.prefill_graphs import PrefillGraphs
from worker.engine.step_inputs import StepPlan

SUPPORTED_MODEL_TYPES = ("llama",)
# GPU memory kept out of the KV pool for what the profile run does not see: CUDA graphs' pool, the
# sampler's sort buffers, allocator fragmentation.
GPU_RESERVE_BYTES = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, model: PreTrainedModel | None = None) -> None:
        """Load config.model, or use `model` (already built, e.g. the benchmark's random-weight stand-in)."""
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        hf_config = model.config if model is not None else AutoConfig.from_pretrained(config.model)
        if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {hf_config.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        if model is None and config.random_weights:
            model = random_weight_model(hf_config, self.device, self.dtype)
        elif model is None:
            model = AutoModelForCausalLM.from_pretrained(config.model, dtype=self.dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.hf_config = hf_config
        self.vocab_size: int = hf_config.vocab_size
        self.max_model_len: int = min(
            config.max_model_len or hf_config.max_position_embeddings, hf_config.max_position_embeddings
        )
        self.num_layers: int = hf_config.num_hidden_layers
        self.num_heads: int = hf_config.num_attention_heads
        self.num_kv_heads: int = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.cos, self.sin = self._rotary_tables()
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.backend_name = backend
        # Fused kernels go with the Triton backend; the torch path is transformers' own arithmetic.
        fused = backend == "triton" and config.fused_kernels
        self.llama = (FusedLlama if fused else TorchLlama)(self.model, self.cos, self.sin)
        # ms per pass over each weight shape, ours vs cuBLAS (benchmarks and the worker log print them).
        self.product_timings: dict[str, dict[str, float]] = {}
        if fused and self.device.type == "cuda" and (config.triton_gemv or config.triton_skinny):
            from worker.engine.product_table import ProductTable
            from worker.engine.triton_skinny import ROWS

            table, self.product_timings = ProductTable.build(
                self.llama.weights(), with_gemv=config.triton_gemv, skinny_rows=ROWS if config.triton_skinny else ()
            )
            self.llama.use_product_table(table)
            torch.cuda.empty_cache()  # the timing graphs' pools, before free memory sizes the KV cache

        self.num_blocks = config.num_blocks or self._num_blocks_from_memory()
        # One more than the block manager hands out: block 0 is the null block (see block_manager.py).
        cache_shape = (self.num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_caches = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.backend = self._make_backend(self.k_caches, self.v_caches)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        # Per kind of graph: how many, seconds to capture, GiB their memory pool holds (the worker logs it).
        self.graph_stats: dict[str, dict[str, float]] = {}
        if self.backend_name == "triton" and self.device.type == "cuda" and config.cuda_graphs:
            self.graphs = DecodeGraphs(self.backend, self._forward, config.max_num_seqs, self.device)
            self.graph_stats["decode"] = _measure_capture(self.graphs.capture, len(self.graphs.sizes), self.device)
            max_tokens = min(config.prefill_graph_max_tokens, config.max_num_batched_tokens)
            if max_tokens > 0:
                self.prefill_graphs = self.make_prefill_graphs(max_tokens)
                count = len(self.prefill_graphs.sizes)
                self.graph_stats["prefill"] = _measure_capture(self.prefill_graphs.capture, count, self.device)

    # -- set-up ------------------------------------------------------------------------------------------

    def _make_backend(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> TorchBackend | TritonBackend:
        if self.backend_name == "torch":
            return TorchBackend(k_caches, v_caches, self.scale)
        if self.backend_name == "triton":
            return TritonBackend(
                k_caches, v_caches, self.scale, self.config.max_num_seqs, self.max_blocks_per_seq, self.num_heads
            )
        raise ValueError(f"attention_backend must be auto, torch or triton; got {self.backend_name!r}")

    def make_prefill_graphs(self, max_tokens: int) -> PrefillGraphs:
        """Static buffers for prefill steps of up to max_tokens tokens (Triton backend); capture() makes graphs
        of them on CUDA, and without it they run the same padded steps eagerly (tests on CPU)."""
        from worker.engine.triton_prefill import prefill_block_m

        return PrefillGraphs(
            self._forward, max_tokens, self.config.max_num_seqs, self.block_size, self.max_blocks_per_seq,
            prefill_block_m(self.dtype), TritonBackend.NULL_BLOCK * self.block_size, self.num_kv_heads, self.device,
        )  # fmt: skip

    def _rotary_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, from the model's own rotary module (so rope scaling is the model's)."""
        positions = torch.arange(self.max_model_len, device=self.device)[None, :]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = self.model.model.rotary_emb(probe, positions)
        # transformers computes them in float32 and casts to the activations' dtype; so do we.
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    @property
    def kv_bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    def _num_blocks_from_memory(self) -> int:
        if self.device.type != "cuda":
            return max(1, int(self.config.cpu_kv_cache_gib * 2**30 // self.kv_bytes_per_block))
        peak_activations = self._profile_activations()
        free, _total = torch.cuda.mem_get_info(self.device)
        budget = (free - peak_activations - GPU_RESERVE_BYTES) * self.config.kv_cache_memory_fraction
        num_blocks = int(budget // self.kv_bytes_per_block) - 1  # minus the null block
        if num_blocks < self.max_blocks_per_seq:
            raise RuntimeError(
                f"the KV cache fits {max(num_blocks, 0)} blocks, less than one sequence of max_model_len "
                f"({self.max_model_len} tokens) needs; lower --max-model-len or use a larger GPU"
            )
        return num_blocks

    def _profile_activations(self) -> int:
        """Peak memory of the largest step the scheduler can build (a full token budget, logits for every row),
        run once on a scratch KV cache just large enough for it."""
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        blocks = -(-tokens // self.block_size)
        shape = (blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        backend = self._make_backend(k, v)
        plan = StepPlan(
            input_ids=[0] * tokens, positions=list(range(tokens)),
            slots=[self.block_size + i for i in range(tokens)],
            query_starts=[0], query_lens=[tokens], context_lens=[tokens],
            block_tables=[list(range(1, blocks + 1))],
            # Every row: a step may ask for the logits of all its tokens (prompt logprobs).
            sample_indices=list(range(tokens)),
            sampled_seq_indices=[0],
        )  # fmt: skip
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        meta = backend.prepare(plan, self.device)
        self._forward(
            torch.tensor(plan.input_ids, device=self.device), torch.tensor(plan.positions, device=self.device),
            meta, torch.tensor(plan.sample_indices, device=self.device), backend,
        )  # fmt: skip
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del k, v, backend, meta
        torch.cuda.empty_cache()
        return peak

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one KV block (all layers): a sample forked from another gets its own last block."""
        for k, v in zip(self.k_caches, self.v_caches, strict=True):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    # -- one step ----------------------------------------------------------------------------------------

    def run(
        self, plan: StepPlan, extra_rows: Sequence[int] = (), input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute one step; return float32 logits [len(plan.sample_indices) + len(extra_rows), vocab]: the
        sampled rows in plan order, then `extra_rows` (rows of the packed batch, for prompt logprobs).
        input_ids: the step's ids already on the device (a step launched ahead), else plan's."""
        if self.graphs is not None and plan.is_decode and not extra_rows and plan.num_seqs <= self.graphs.max_batch:
            return self.graphs.run(plan, input_ids)
        if self.prefill_graphs is not None and not plan.is_decode and not extra_rows and self.prefill_graphs.fits(plan):
            return self.prefill_graphs.run(plan, input_ids)
        if self.backend_name == "triton" and plan.is_decode:
            # Decode without graphs (CPU interpreter, or graphs disabled): same kernels, static buffers.
            self.backend.load_decode(plan, plan.num_seqs)
            meta = self.backend.decode_metadata(plan.num_seqs)
        else:
            meta = self.backend.prepare(plan, self.device)
        dev = self.device
        ids = input_ids if input_ids is not None else to_device(plan.input_ids, dev)
        positions = to_device(plan.positions, dev)
        rows = plan.sample_indices + list(extra_rows)
        sample = None if plan.is_decode and not extra_rows else to_device(rows, dev)
        return self._forward(ids, positions, meta, sample)

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, sample_indices=None, backend=None):
        """The model over a packed batch; logits (float32) for `sample_indices` rows, or all rows if None."""
        backend = backend or self.backend

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary=None) -> torch.Tensor:
            return backend.attend(layer, q, k, v, meta, rotary)

        return self.llama(input_ids, positions, attend, sample_indices)


def random_weight_model(hf_config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """A model of this configuration with random weights, built on `device` (nothing read or written on disk):
    a benchmark stand-in that runs at the real checkpoint's speed. Initialized explicitly (normal(0, 0.02),
    norms 1) so that the tokens do not depend on how a transformers version initializes."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(1.0)  # RMSNorm scales
    return model.eval()


def _measure_capture(capture: Callable[[], None], count: int, device: torch.device) -> dict[str, float]:
    before = torch.cuda.memory_reserved(device)
    started = time.perf_counter()
    capture()
    seconds = time.perf_counter() - started
    pool_gib = (torch.cuda.memory_reserved(device) - before) / 2**30
    return {"graphs": count, "capture_s": round(seconds, 2), "pool_gib": round(pool_gib, 3)}


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """`values` as a long tensor on `device`; on a GPU the copy is queued from pinned memory, not waited for."""
    host = torch.tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
