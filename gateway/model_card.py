"""What the gateway knows of the served model: its tokenizer, context length and generation defaults.

Read from the model directory's tokenizer and JSON files only: the gateway never loads weights or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from protos.fingerprint import tokenizer_fingerprint

# Hugging Face's GenerationConfig defaults, used where the model's generation_config.json is silent.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}

# Code Llama's infilling tokens: the names tokenizer_config.json gives them (prefix_token, ...) and the defaults
# transformers' CodeLlamaTokenizer falls back to when the config does not name them.
FIM_TOKEN_DEFAULTS = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "eot": "▁<EOT>"}


@dataclass(frozen=True)
class FimIds:
    """Token ids of Code Llama's infilling format: ``<PRE> {prefix} <SUF>{suffix} <MID>`` ... ``<EOT>``."""

    prefix: int
    suffix: int
    middle: int
    eot: int  # end of the middle: generation stops there


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
    # The checkpoint's chat template (Jinja), None for a model without one (a base Code Llama): see gateway/prompts.py.
    chat_template: str | None = None
    # The named special tokens' strings (bos_token, eos_token, ...), which chat templates see as variables.
    # compare=False: a dict is unhashable, and the card (frozen) is hashed field by field.
    special_tokens: dict[str, str] = field(default_factory=dict, compare=False)
    # None when the tokenizer lacks any of the four infilling tokens (Code Llama 34B, the Python variants, Llama).
    fim_ids: FimIds | None = None

    @classmethod
    def load(cls, model_dir: str | Path, model_id: str | None = None, max_model_len: int = 0) -> ModelCard:
        path = Path(model_dir)
        config = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        generation = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        defaults = {k: generation.get(k, v) for k, v in HF_DEFAULTS.items()}
        context = int(config["max_position_embeddings"])
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        tokenizer = _load_tokenizer(path)
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        return cls(
            model_id=model_id or path.name,
            tokenizer=tokenizer,
            tokenizer_fingerprint=tokenizer_fingerprint(path),
            max_model_len=min(max_model_len, context) if max_model_len > 0 else context,
            vocab_size=int(config["vocab_size"]),
            bos_token_id=int(generation.get("bos_token_id", config.get("bos_token_id", 1))),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            default_do_sample=bool(defaults["do_sample"]),
            default_temperature=float(defaults["temperature"]),
            default_top_k=int(defaults["top_k"]),
            default_top_p=float(defaults["top_p"]),
            chat_template=_load_chat_template(path, tokenizer_config),
            special_tokens=_special_tokens(path, tokenizer_config),
            fim_ids=_fim_ids(tokenizer, tokenizer_config, int(config["vocab_size"])),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def _load_tokenizer(path: Path) -> Tokenizer:
    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    # Only a SentencePiece tokenizer.model: transformers converts it (slow, once at start-up).
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict (older checkpoints,
    Code Llama's among them: ``{"__type": "AddedToken", "content": "<s>", ...}``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _load_chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The default chat template, found where transformers 5 looks for it.

    A ``chat_template.jinja`` file (how transformers saves templates since 4.43) wins over the
    ``chat_template`` key of tokenizer_config.json (how Code Llama Instruct ships it), as in
    ``PreTrainedTokenizerBase.from_pretrained``. The key may hold one template or a list of named ones, of
    which the one named "default" is what ``apply_chat_template`` uses when given no name.
    """
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _special_tokens(path: Path, tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """Every ``*_token`` tokenizer_config.json names (special_tokens_map.json filling gaps): what transformers
    passes to a chat template as variables (``bos_token``, ``eos_token``, ``prefix_token``, ...)."""
    tokens: dict[str, str] = {}
    for source in (_read_json(path / "special_tokens_map.json"), tokenizer_config):
        for key, value in source.items():
            if key.endswith("_token") and (text := _token_string(value)) is not None:
                tokens[key] = text
    return tokens


def _fim_ids(tokenizer: Tokenizer, tokenizer_config: dict[str, Any], vocab_size: int) -> FimIds | None:
    ids: dict[str, int] = {}
    for role, default in FIM_TOKEN_DEFAULTS.items():
        key = f"{role}_token"
        # A key present but null (a checkpoint saying "no infilling") disables it, as in CodeLlamaTokenizer.
        text = _token_string(tokenizer_config[key]) if key in tokenizer_config else default
        token_id = tokenizer.token_to_id(text) if text is not None else None
        # An id past the model's embedding rows would be a token the model was never trained with.
        if token_id is None or token_id >= vocab_size:
            return None
        ids[role] = token_id
    return FimIds(**ids)
