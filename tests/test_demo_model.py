"""The demo model: Code Llama's tokenizer layout and behaviour, a loadable tiny Llama, the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from structlog.testing import capture_logs
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import codestream
from codestream import demo_model
from codestream.demo_model import (
    build_demo_model,
    default_cache_dir,
    ensure_demo_model,
    tiny_llama_config,
)
from tests.tiny_models import build_bigram_llama

VOCAB_SIZE = 2048
FIM = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
SAMPLES = [
    "def f():",
    "import os\n\nclass Foo(Bar):\n    def __init__(self, x: int = 3) -> None:\n        self.x = x\n",
    "    return x  # two leading spaces, trailing space ",
    " leading space",
    "\tindent\twith\ttabs\r\n",
    "héllo € 😀",
    "日本語のコメント",
    "",
    " ",
    "\n",
]
TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
CONFIG_FILES = ["config.json", "generation_config.json"]


def byte_id(b: int) -> int:
    return 3 + b


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


@pytest.fixture(scope="module")
def tok(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_dir / "tokenizer.json"))


# ------------------------------------------------------------------------------------------- tokenizer


def test_vocabulary_layout(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [tok.id_to_token(byte_id(b)) for b in range(256)] == [f"<0x{b:02X}>" for b in range(256)]
    assert [tok.id_to_token(i) for i in range(VOCAB_SIZE - 4, VOCAB_SIZE)] == FIM
    # Like Code Llama: the byte tokens are ordinary vocabulary entries; specials and FIM tokens are
    # special added tokens.
    added = tok.get_added_tokens_decoder()
    assert sorted(added) == [0, 1, 2, *range(VOCAB_SIZE - 4, VOCAB_SIZE)]
    assert all(t.special and not t.normalized for t in added.values())


def test_pipeline_matches_code_llama(demo_dir: Path) -> None:
    spec = json.loads((demo_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    assert (model["type"], model["byte_fallback"], model["fuse_unk"], model["unk_token"]) == (
        "BPE",
        True,
        True,
        "<unk>",
    )
    assert spec["normalizer"] == {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    assert spec["pre_tokenizer"] is None
    assert spec["decoder"] == {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    post = spec["post_processor"]
    assert post["type"] == "TemplateProcessing"
    assert post["single"] == [
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ]
    assert [next(iter(p.values()))["id"] for p in post["pair"]] == ["<s>", "A", "<s>", "B"]


def test_non_ascii_goes_through_byte_fallback(tok: Tokenizer) -> None:
    for char in ["é", "€", "😀"]:
        assert tok.token_to_id(char) is None
    enc = tok.encode("€", add_special_tokens=False)
    euro = [byte_id(0xE2), byte_id(0x82), byte_id(0xAC)]
    assert enc.ids[-3:] == euro
    assert enc.tokens[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]
    # The byte tokens alone decode back to the character (ByteFallback + Fuse in the decoder).
    assert tok.decode(euro) == "€"
    assert tok.encode("\n", add_special_tokens=False).tokens[-1] == "<0x0A>"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


def test_bos_added_by_post_processor(tok: Tokenizer) -> None:
    with_bos = tok.encode("def f():").ids
    without = tok.encode("def f():", add_special_tokens=False).ids
    assert with_bos == [1, *without]
    assert 1 not in without and 2 not in with_bos  # no EOS appended


def test_code_is_compressed(tok: Tokenizer) -> None:
    # Trained on code: common keywords and indentation are single pieces.
    text = SAMPLES[1]
    assert len(tok.encode(text, add_special_tokens=False).ids) < len(text) / 2


def test_fim_tokens_are_matched_whole(tok: Tokenizer) -> None:
    ids = tok.encode("▁<PRE>def f():▁<SUF>\n▁<MID>", add_special_tokens=False).ids
    pre, suf, mid = (tok.token_to_id(t) for t in FIM[:3])
    assert [i for i in ids if i >= VOCAB_SIZE - 4] == [pre, suf, mid]
    assert "<PRE>" not in tok.decode(ids, skip_special_tokens=True)


def test_build_is_deterministic_and_needs_no_torch(demo_dir: Path, tmp_path: Path) -> None:
    """A second build, in a fresh interpreter with another hash seed, without weights.

    It must write byte-identical tokenizer and config files, no weights, and import neither torch nor
    transformers (the gateway builds this way).
    """
    out = tmp_path / "no-weights"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from codestream.demo_model import build_demo_model\n"
        f"build_demo_model(Path({str(out)!r}), with_weights=False)\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    root = Path(codestream.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)

    assert sorted(p.name for p in out.iterdir()) == sorted(TOKENIZER_FILES + CONFIG_FILES)
    for name in TOKENIZER_FILES + CONFIG_FILES:
        assert (out / name).read_bytes() == (demo_dir / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_auto_tokenizer_agrees_with_tokenizers(demo_dir: Path, tok: Tokenizer) -> None:
    hf = AutoTokenizer.from_pretrained(demo_dir)
    assert hf.is_fast
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert len(hf) == VOCAB_SIZE
    for text in [*SAMPLES, "▁<PRE>x = ▁<SUF>\n▁<MID>", "a <s> b </s>"]:
        ids = tok.encode(text).ids
        assert hf.encode(text) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert hf.convert_tokens_to_ids(FIM) == list(range(VOCAB_SIZE - 4, VOCAB_SIZE))


# ------------------------------------------------------------------------------------------------ model


def test_config_json_equals_llama_config(demo_dir: Path) -> None:
    loaded = LlamaConfig.from_pretrained(demo_dir)
    expected = tiny_llama_config(VOCAB_SIZE)
    volatile = {"architectures", "transformers_version", "_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in volatile} == {
        k: v for k, v in expected.to_dict().items() if k not in volatile
    }
    assert loaded.architectures == ["LlamaForCausalLM"]
    assert (loaded.num_key_value_heads, loaded.num_attention_heads, loaded.head_dim) == (2, 4, 32)
    assert loaded.rope_parameters["rope_theta"] == 1e6
    assert tiny_llama_config(VOCAB_SIZE, num_hidden_layers=1).num_hidden_layers == 1
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_model_loads_and_runs(demo_dir: Path, tok: Tokenizer) -> None:
    model = LlamaForCausalLM.from_pretrained(demo_dir).eval()
    assert model.dtype == torch.float32
    ids = torch.tensor([tok.encode("def f():\n    return 1").ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_weights_are_reproducible_for_a_seed(demo_dir: Path, tmp_path: Path) -> None:
    expected = load_file(demo_dir / "model.safetensors")
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        out.mkdir()
        (out / "config.json").write_bytes((demo_dir / "config.json").read_bytes())
        demo_model._write_weights(out, seed=seed)
        weights = load_file(out / "model.safetensors")
        assert weights.keys() == expected.keys()
        same = all(torch.equal(weights[k], expected[k]) for k in expected)
        assert same == (seed == 0)


# ------------------------------------------------------------------------------------------------ cache


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CODESTREAM_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CODESTREAM_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "codestream"


def test_ensure_demo_model_builds_once_and_reuses(tmp_path: Path) -> None:
    target = tmp_path / "demo-model"
    results: list[Path] = []
    with capture_logs() as logs:
        # Two at once (the gateway and a worker starting together): the lock makes one build, one reuse.
        threads = [
            threading.Thread(target=lambda: results.append(ensure_demo_model(tmp_path, with_weights=False)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [target, target]
    assert [e["event"] for e in logs] == ["demo_model_built", "demo_model_cached"]
    assert logs[0]["path"] == str(target)
    assert not (target / "model.safetensors").exists()
    before = {name: (target / name).read_bytes() for name in TOKENIZER_FILES + CONFIG_FILES}

    # Asking for weights later adds them and keeps the tokenizer and config byte for byte.
    (tmp_path / ".demo-model.tmp-crashed").mkdir()  # left over by a builder that died
    with capture_logs() as logs:
        assert ensure_demo_model(tmp_path) == target
    assert [e["event"] for e in logs] == ["demo_model_built"]
    assert (target / "model.safetensors").is_file()
    assert {name: (target / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-model", "demo-model.lock"]

    with capture_logs() as logs:
        assert ensure_demo_model(tmp_path) == target
        assert ensure_demo_model(tmp_path, with_weights=False) == target
    assert [e["event"] for e in logs] == ["demo_model_cached", "demo_model_cached"]


# ------------------------------------------------------------------------------------- bigram models


def greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(prompt) :].tolist()


def test_bigram_llama_follows_its_chain(demo_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    a, b, c = (tok.token_to_id(char) for char in "xyz")
    out = build_bigram_llama(demo_dir, tmp_path / "abc", {a: b, b: c, c: a})
    assert (out / "tokenizer.json").read_bytes() == (demo_dir / "tokenizer.json").read_bytes()
    assert greedy(out, [1, a], 7) == [b, c, a, b, c, a, b]
    # Whatever came before: the last token alone decides.
    assert greedy(out, [1, c, c, b, a, a, c], 4) == [a, b, c, a]


def test_bigram_llama_spells_a_multibyte_character_then_stops(demo_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    start = tok.token_to_id("x")
    e2, x82, xac = byte_id(0xE2), byte_id(0x82), byte_id(0xAC)
    out = build_bigram_llama(demo_dir, tmp_path / "euro", {start: e2, e2: x82, x82: xac, xac: 2}, default_next=start)
    generated = greedy(out, [1, start], 10)
    assert generated == [e2, x82, xac, 2]  # stops at EOS (generation_config.json)
    assert tok.decode(generated, skip_special_tokens=True) == "€"
    # default_next: any other token, here "y", leads back into the chain.
    assert greedy(out, [1, tok.token_to_id("y")], 3) == [start, e2, x82]
