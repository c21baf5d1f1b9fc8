"""Resolve what `--model` names to a local Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from codestream.demo_model import DEMO_MODEL_NAME, ensure_demo_model


def resolve_model(name: str, *, with_weights: bool = True) -> str:
    """'demo' -> the demo model (built on first use); a directory -> itself; else a Hugging Face hub id,
    fetched into the local hub cache (or found there when HF_HUB_OFFLINE=1)."""
    if name == DEMO_MODEL_NAME:
        return str(ensure_demo_model(with_weights=with_weights))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory {name!r} not found")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer.model"] + (["*.safetensors"] if with_weights else [])
    return snapshot_download(repo_id=name, allow_patterns=patterns)
