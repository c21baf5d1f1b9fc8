"""Loads the model's tokenizer as a `tokenizers.Tokenizer` (the fast Rust one), for detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    # Checkpoints with only a SentencePiece tokenizer.model: let transformers convert it.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer
