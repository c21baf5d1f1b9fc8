"""The inference engine: continuous batching over a paged KV cache. No Redis, no gRPC."""

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.outputs import EngineStats, RequestOutput
from worker.engine.sampler import TokenLogprobs
from worker.engine.sampling_params import SamplingParams
from worker.engine.sequence import FinishReason

__all__ = [
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprobs",
]
