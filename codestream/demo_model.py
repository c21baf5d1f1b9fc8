"""The small demo model codestream serves by default and the tests use.

Tests must never need the internet, yet they should exercise exactly the code that loads Code Llama.
So instead of a mock we build a real Hugging Face checkpoint directory, tiny enough to create in a few
seconds on a laptop:

* a tokenizer with the layout and behaviour of Code Llama's ``tokenizer.json`` (SentencePiece-style
  byte-fallback BPE, ``▁`` for spaces, ``<s>`` prepended by the post-processor, the infilling tokens
  ``▁<PRE>``/``▁<SUF>``/``▁<MID>``/``▁<EOT>`` as special tokens), trained on Python's own standard library
  so that it tokenizes code sensibly;
* a 4-layer Llama with Code Llama's architectural choices (GQA, rope_theta 1e6) and random weights.

The gateway only needs the tokenizer and ``config.json``; it must not pay for importing torch, so that
path (``with_weights=False``) imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import string
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import tokenizers
    import transformers

DEMO_MODEL_NAME = "demo"

# Directory name of the demo model inside the cache directory.
_DEMO_DIR_NAME = "demo-model"

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# Code Llama's infilling tokens, in Code Llama's id order (32007..32010 there; the last ids here).
PREFIX_TOKEN, SUFFIX_TOKEN, MIDDLE_TOKEN, EOT_TOKEN = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"
FIM_TOKENS = (PREFIX_TOKEN, SUFFIX_TOKEN, MIDDLE_TOKEN, EOT_TOKEN)
SPACE = "▁"  # U+2581, SentencePiece's visible space

# Ids 0..2 are the specials and 3..258 the byte-fallback tokens, as in every Llama vocabulary.
_NUM_SPECIAL = 3
_NUM_BYTES = 256
_FIRST_LEARNED_ID = _NUM_SPECIAL + _NUM_BYTES

# The initial alphabet: printable ASCII without whitespace, plus ``▁``. Keeping every non-ASCII character
# (and tab/newline, which Llama also byte-encodes as <0x09>/<0x0A>) out of the alphabet forces them through
# the byte-fallback tokens, so tests can rely on e.g. "€" being split over three tokens. Fixing it up front
# rather than letting ``limit_alphabet`` pick the most frequent characters also keeps training
# deterministic: the trainer breaks frequency ties at the cut-off in hash-map order.
_ALPHABET: tuple[str, ...] = (*sorted(set(string.printable) - set(string.whitespace)), SPACE)

# Enough of the standard library to learn a 2k vocabulary (~3 MB trains in ~4 s on 2 cores); a fixed,
# sorted file list keeps the result reproducible for a given Python version.
_CORPUS_BUDGET_CHARS = 3_000_000

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_CONFIG_FILES = ("config.json", "generation_config.json")
_WEIGHTS_FILE = "model.safetensors"

# The tiny Llama: Code Llama's shape choices, scaled down (head_dim 32, 2 KV heads shared by 4 query heads).
_TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "dtype": "float32",
}


def default_cache_dir() -> Path:
    """Where the demo model is built: ``$CODESTREAM_CACHE_DIR``, else ``~/.cache/codestream``."""
    env = os.environ.get("CODESTREAM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "codestream"


# --------------------------------------------------------------------------------------------- tokenizer


def _normalize(text: str) -> str:
    """What the tokenizer's normalizer does: prepend ``▁`` and turn spaces into ``▁``."""
    return SPACE + text.replace(" ", SPACE)


def _training_corpus(budget_chars: int = _CORPUS_BUDGET_CHARS) -> list[str]:
    """Normalized lines of the top-level standard-library modules, in sorted file order.

    Each line is one training "word" (the tokenizer has no pre-tokenizer, like Code Llama's, so training
    sees exactly the sequences inference will merge). Lines with characters outside the alphabet are
    dropped: the trainer would silently skip those characters and learn merges across the gap.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    alphabet = frozenset(_ALPHABET)
    lines: list[str] = []
    seen = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_bytes().decode("utf-8", errors="replace")
        lines.extend(norm for line in text.splitlines() if alphabet.issuperset(norm := _normalize(line)))
        seen += len(text)
        if seen >= budget_chars:
            break
    if seen < budget_chars // 10:
        raise RuntimeError(f"too little Python source under {stdlib} to train the demo tokenizer")
    return lines


def build_tokenizer(vocab_size: int = 2048) -> tokenizers.Tokenizer:
    """Train a Code Llama-layout tokenizer of ``vocab_size`` tokens in all (infilling tokens included).

    We train a plain BPE, then rebuild the model from its vocab and merges, renumbered into Llama's
    layout: ``<unk>`` ``<s>`` ``</s>``, the 256 byte tokens as ordinary vocabulary entries, the learned
    pieces, and finally the four infilling tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

    num_learned = vocab_size - _FIRST_LEARNED_ID - len(FIM_TOKENS)
    if num_learned < len(_ALPHABET):
        raise ValueError(f"vocab_size must be at least {_FIRST_LEARNED_ID + len(FIM_TOKENS) + len(_ALPHABET)}")

    trainer = trainers.BpeTrainer(
        vocab_size=num_learned + _NUM_SPECIAL,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=list(_ALPHABET),
        limit_alphabet=len(_ALPHABET),
        show_progress=False,
    )
    trained = Tokenizer(models.BPE(unk_token=UNK))
    trained.train_from_iterator(_training_corpus(), trainer=trainer)
    trained_model = json.loads(trained.to_str())["model"]
    # ``vocab`` is serialized in id order; specials come first and are re-added below.
    pieces = [piece for piece, _ in sorted(trained_model["vocab"].items(), key=lambda kv: kv[1])]
    pieces = pieces[_NUM_SPECIAL:]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained_model["merges"]]

    byte_tokens = [f"<0x{b:02X}>" for b in range(_NUM_BYTES)]
    ordered = [UNK, BOS, EOS, *byte_tokens, *pieces, *FIM_TOKENS]
    if len(set(ordered)) != len(ordered):  # e.g. a learned piece spelled "<0x41>": ids would shift
        raise RuntimeError("learned pieces collide with the special or byte tokens")
    if len(ordered) != vocab_size:  # the corpus ran out of merges
        raise RuntimeError(f"trained {len(ordered)} tokens, wanted {vocab_size}")
    vocab = {piece: i for i, piece in enumerate(ordered)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, vocab[BOS])],
    )
    # Already in the vocabulary, so they keep their ids; registering them makes them match whole and be
    # skipped by ``decode(skip_special_tokens=True)``. Not normalized, as in Code Llama: the text "▁<PRE>"
    # matches, the text " <PRE>" does not.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS, *FIM_TOKENS)])
    return tok


def _tokenizer_config() -> dict[str, Any]:
    """``tokenizer_config.json``: how transformers' ``AutoTokenizer`` should load ``tokenizer.json``."""
    return {
        # "TokenizersBackend" (v5's name for PreTrainedTokenizerFast) loads tokenizer.json as it is.
        # "LlamaTokenizer"/"CodeLlamaTokenizer" would rebuild the pipeline from vocab and merges with a
        # Metaspace pre-tokenizer instead of our normalizer, which drops the extra "▁" in front of text
        # that starts with a space (" x" -> "▁x" instead of "▁▁x"), so ids would differ from
        # ``tokenizers``.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _TINY_LLAMA["max_position_embeddings"],
        "prefix_token": PREFIX_TOKEN,
        "suffix_token": SUFFIX_TOKEN,
        "middle_token": MIDDLE_TOKEN,
        "eot_token": EOT_TOKEN,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer: tokenizers.Tokenizer, out_dir: Path) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "additional_special_tokens": list(FIM_TOKENS)},
    )


# ----------------------------------------------------------------------------------------------- model


def _llama_kwargs(vocab_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    return {**_TINY_LLAMA, "vocab_size": vocab_size, **overrides}


def tiny_llama_config(vocab_size: int, **overrides: Any) -> transformers.LlamaConfig:
    """The demo model's ``LlamaConfig``; ``overrides`` replace any field (e.g. ``num_hidden_layers=1``)."""
    from transformers import LlamaConfig

    return LlamaConfig(**_llama_kwargs(vocab_size, overrides))


def _config_json(vocab_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for ``tiny_llama_config(vocab_size, **overrides)``, written without transformers.

    Importing transformers' ``LlamaConfig`` imports torch (seconds, hundreds of MB), which the gateway
    must not pay; so the file is spelled out here, in the form ``LlamaConfig.save_pretrained`` uses
    (transformers 5: ``rope_parameters`` instead of ``rope_theta``). A test checks the two agree.
    """
    params = _llama_kwargs(vocab_size, overrides)
    rope_theta = params.pop("rope_theta")
    params.setdefault("rope_parameters", {"rope_theta": rope_theta, "rope_type": "default"})
    params.setdefault("head_dim", params["hidden_size"] // params["num_attention_heads"])
    defaults = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "use_cache": True,
    }
    return dict(sorted({**defaults, **params}.items()))


def _write_weights(model_dir: Path, seed: int) -> None:
    """Add random ``model.safetensors`` for the ``config.json`` already in ``model_dir``.

    The weights are saved into a scratch directory first and moved in with ``os.replace``, so the
    directory never holds a partial weights file.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig.from_pretrained(model_dir)
    # fork_rng: seed the initialization without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # from_config with the config's dtype, so a bf16 config is initialized in bf16, not float32.
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    scratch = Path(tempfile.mkdtemp(prefix=".weights-", dir=model_dir))
    try:
        # transformers 5 always writes safetensors (its ``safe_serialization`` argument is gone).
        model.save_pretrained(scratch)
        files = sorted(p.name for p in scratch.glob("*.safetensors"))
        if not files:
            raise RuntimeError(f"save_pretrained wrote no safetensors into {scratch}")
        # A sharded checkpoint's index goes last: it is what makes the shards visible to loaders.
        for name in [*files, *(p.name for p in scratch.glob("*.safetensors.index.json"))]:
            os.replace(scratch / name, model_dir / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_model_dir(
    out_dir: Path, *, with_weights: bool, seed: int, vocab_size: int, config_overrides: dict[str, Any]
) -> None:
    save_tokenizer(build_tokenizer(vocab_size), out_dir)
    _write_json(out_dir / "config.json", _config_json(vocab_size, config_overrides))
    generation = {"bos_token_id": _TINY_LLAMA["bos_token_id"], "eos_token_id": _TINY_LLAMA["eos_token_id"]}
    generation |= {k: config_overrides[k] for k in ("bos_token_id", "eos_token_id") if k in config_overrides}
    _write_json(out_dir / "generation_config.json", generation)
    if with_weights:
        _write_weights(out_dir, seed)


def build_demo_model(
    out_dir: Path,
    *,
    with_weights: bool = True,
    seed: int = 0,
    vocab_size: int = 2048,
    **config_overrides: Any,
) -> Path:
    """Build the demo model into ``out_dir`` (replacing it if present) and return ``out_dir``.

    Always writes the tokenizer files, ``config.json`` and ``generation_config.json``; with
    ``with_weights`` also ``model.safetensors``, random but reproducible for ``seed``. Without weights
    neither torch nor transformers is imported.

    Everything is written into a temporary sibling directory that is renamed into place at the end, so
    a crashed build never leaves a directory that looks like a complete model.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_model_dir(
            tmp,
            with_weights=with_weights,
            seed=seed,
            vocab_size=vocab_size,
            config_overrides=config_overrides,
        )
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first. out_dir is
            # briefly absent (which reads as "not built"), never half-written.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: the gateway and a worker starting together build only once.

    The kernel drops the lock when the process dies, so a crashed builder never blocks the next one.
    """
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _has_weights(model_dir: Path) -> bool:
    return (model_dir / _WEIGHTS_FILE).is_file() or any(model_dir.glob("*.safetensors.index.json"))


def ensure_demo_model(cache_dir: Path | None = None, *, with_weights: bool = True) -> Path:
    """Return ``cache_dir/demo-model``, building it on first use.

    A directory built without weights gets them added when ``with_weights`` is asked for later; its
    tokenizer and config are kept as they are, so token ids a running gateway already handed out stay
    valid.
    """
    # A logger per call, not per module: the app configures structlog with cache_logger_on_first_use, which
    # would pin a module-level logger to whatever configuration was current at its first use.
    log = structlog.get_logger()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / _DEMO_DIR_NAME
    with _file_lock(cache_dir / f"{_DEMO_DIR_NAME}.lock"):
        # Holding the lock, any temporary directory left next to the target is from a builder that died.
        for stale in [*cache_dir.glob(f".{_DEMO_DIR_NAME}.*-*"), *target.glob(".weights-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        complete = target.is_dir() and all((target / f).is_file() for f in _TOKENIZER_FILES + _CONFIG_FILES)
        if complete and (_has_weights(target) or not with_weights):
            log.info("demo_model_cached", path=str(target), weights=_has_weights(target))
            return target
        start = time.monotonic()
        if complete:
            _write_weights(target, seed=0)
            log.info(
                "demo_model_built",
                path=str(target),
                weights=True,
                reused_tokenizer=True,
                seconds=round(time.monotonic() - start, 2),
            )
        else:
            build_demo_model(target, with_weights=with_weights)
            log.info(
                "demo_model_built",
                path=str(target),
                weights=with_weights,
                seconds=round(time.monotonic() - start, 2),
            )
    return target
