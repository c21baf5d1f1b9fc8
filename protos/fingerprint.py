"""Tokenizer fingerprint: part of the contract between gateway and worker.

The gateway tokenizes and the worker detokenizes, each with its own copy of the model's tokenizer. A job
carries the gateway's fingerprint and a worker whose tokenizer differs refuses it, rather than answering
with text decoded by the wrong vocabulary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.exists():
            return f"{name}:sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    return ""
