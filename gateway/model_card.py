"""What the gateway knows of the served model: its tokenizer, context length and generation defaults.

Read from the model directory's tokenizer and JSON files only: the gateway never loads weights or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from protos.fingerprint import tokenizer_fingerprint

# Hugging Face's GenerationConfig defaults, used where the model's generation_config.json is silent.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclass(frozen=True)
class ModelCard:
    model_id: str
    tokenizer: Tokenizer
    tokenizer_fingerprint: str
    max_model_len: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    default_do_sample: bool
    default_temperature: float
    default_top_k: int
    default_top_p: float

    @classmethod
    def load(cls, model_dir: str | Path, model_id: str | None = None, max_model_len: int = 0) -> ModelCard:
        path = Path(model_dir)
        config = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        generation = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        defaults = {k: generation.get(k, v) for k, v in HF_DEFAULTS.items()}
        context = int(config["max_position_embeddings"])
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        return cls(
            model_id=model_id or path.name,
            tokenizer=_load_tokenizer(path),
            tokenizer_fingerprint=tokenizer_fingerprint(path),
            max_model_len=min(max_model_len, context) if max_model_len > 0 else context,
            vocab_size=int(config["vocab_size"]),
            bos_token_id=int(generation.get("bos_token_id", config.get("bos_token_id", 1))),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            default_do_sample=bool(defaults["do_sample"]),
            default_temperature=float(defaults["temperature"]),
            default_top_k=int(defaults["top_k"]),
            default_top_p=float(defaults["top_p"]),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def _load_tokenizer(path: Path) -> Tokenizer:
    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    # Only a SentencePiece tokenizer.model: transformers converts it (slow, once at start-up).
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
