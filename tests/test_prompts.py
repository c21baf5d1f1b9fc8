"""Infill and Chat prompts (gateway/prompts.py) against transformers' own: CodeLlamaTokenizer's infilling
and apply_chat_template, on the demo tokenizer (Code Llama's layout and infilling tokens)."""

from __future__ import annotations

import json
import random
import shutil
import textwrap
from pathlib import Path
from typing import Any

import jinja2
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, CodeLlamaTokenizer

from codestream.demo_model import build_demo_model
from gateway.model_card import FimIds, ModelCard
from gateway.prompts import (
    NO_CHAT_TEMPLATE,
    NO_INFILLING,
    ChatTemplateError,
    PromptError,
    UnsupportedByModel,
    infill_stop_token_ids,
    infill_token_ids,
    render_chat,
    render_chat_text,
)

VOCAB_SIZE = 2048
BOS = 1

# The chat template of Code Llama - Instruct 7B/13B/34B (tokenizer_config.json of the Hugging Face repos
# codellama/CodeLlama-*-Instruct-hf), copied verbatim: the Llama 2 chat format with `| trim`. Taken from a
# public collection of checkpoints' tokenizer configs, where it is listed for codellama/CodeLlama-34b-Instruct-hf;
# several independent projects carry the same string as Code Llama Instruct's template.
CODE_LLAMA_INSTRUCT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def added_token(content: str) -> dict[str, Any]:
    """A special token as Code Llama's tokenizer_config.json spells it (an AddedToken object, not a string)."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def copy_model(src: Path, dst: Path, **tokenizer_config: Any) -> Path:
    """A copy of the model directory with tokenizer_config.json entries replaced."""
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(tokenizer_config)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("prompts") / "demo", with_weights=False)


@pytest.fixture(scope="module")
def card(model_dir: Path) -> ModelCard:
    return ModelCard.load(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> CodeLlamaTokenizer:
    """transformers' CodeLlamaTokenizer over the demo's vocabulary and merges.

    Its default special-token strings are Code Llama's, which the demo uses, so they get the demo's ids.
    ``fill_token=None``: the default "<FILL_ME>" is in no Code Llama vocabulary, so the constructor would add
    it as a new token (id 2048 here, 32016 for Code Llama: past the model's embeddings) and match it in text,
    which the model's own tokenizer.json does not.
    """
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    ref = CodeLlamaTokenizer(vocab=spec["model"]["vocab"], merges=merges, fill_token=None)
    assert len(ref) == VOCAB_SIZE
    # transformers quirk: a fresh CodeLlamaTokenizer has no normalizer, only a Metaspace pre-tokenizer, and
    # encodes " x" as "▁x"; its first infilling call leaves the normalizer Prepend("▁") + Replace(" ", "▁")
    # behind (set_infilling_processor(reset=True)), after which " x" is "▁▁x", like Code Llama's tokenizer.json,
    # SentencePiece and transformers 4. Plain encodings (the empty-suffix fallback) are compared against that
    # settled state, which is what every call after the first one sees.
    ref("x", suffix="y")
    # transformers 5's CodeLlamaTokenizer adds a Metaspace(prepend_scheme="first") pre-tokenizer, which Code
    # Llama's tokenizer.json does not have and which gives the infilling suffix a "▁" the model never saw in
    # training (Meta's encode_infilling and transformers 4 encode the suffix without it). The reference here
    # is that tokenizer over the checkpoint's own pipeline: no pre-tokenizer.
    ref._tokenizer.pre_tokenizer = None
    return ref


@pytest.fixture(scope="module")
def instruct_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model as an Instruct checkpoint: Code Llama Instruct's template and token spelling."""
    return copy_model(
        model_dir,
        tmp_path_factory.mktemp("prompts") / "instruct",
        chat_template=CODE_LLAMA_INSTRUCT_TEMPLATE,
        bos_token=added_token("<s>"),
        eos_token=added_token("</s>"),
        unk_token=added_token("<unk>"),
    )


@pytest.fixture(scope="module")
def instruct_card(instruct_dir: Path) -> ModelCard:
    return ModelCard.load(instruct_dir)


@pytest.fixture(scope="module")
def hf_instruct(instruct_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(instruct_dir)


# ------------------------------------------------------------------------------------------------- infill

LONG_CODE = Path(textwrap.__file__).read_text(encoding="utf-8")[:6000]

INFILL_CASES = {
    "code": ("def add(a, b):\n    ", "\n    return result\n"),
    "prefix_leading_space": (" x = 1", "\n"),
    "both_leading_spaces": ("   indented = True", "   also = False"),
    "suffix_leading_space": ("x =", " 2\n"),
    "suffix_without_leading_space": ("x = ", "2\n"),
    "suffix_only_spaces": ("x", "  "),
    "suffix_starts_with_newline": ("if x:\n", "\n    pass\n"),
    "suffix_starts_with_tab": ("class A:\n", "\tpass"),
    "empty_suffix": ("def f():\n    return ", ""),
    "empty_suffix_leading_space": ("  x = 1", ""),
    "empty_prefix": ("", "return x\n"),
    "empty_both": ("", ""),
    "unicode": ("s = 'héllo € ", "😀'  # é\nprint(s)"),
    "unicode_first": ("€", "😀"),
    "cjk": ("# 日本語の", "コメント\n"),
    "tabs": ("\tdef f():\n\t\t", "\treturn 1\n"),
    "crlf": ("a = 1\r\n", "\r\nb = 2"),
    "visible_space": ("a▁b ", "▁c"),
    "special_token_text": ("x = '<s>' ", "'▁<EOT>' </s>"),
    "fim_token_text_first": ("▁<MID>x", "▁<PRE>y"),
    "trailing_spaces": ("x = 1   ", "   "),
    "long_code": (LONG_CODE[:3000], LONG_CODE[3000:]),
}


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
@pytest.mark.parametrize(("prefix", "suffix"), list(INFILL_CASES.values()), ids=list(INFILL_CASES))
def test_infill_matches_code_llama_tokenizer(
    card: ModelCard, reference: CodeLlamaTokenizer, prefix: str, suffix: str, suffix_first: bool
) -> None:
    expected = reference(prefix, suffix=suffix, suffix_first=suffix_first)["input_ids"]
    assert infill_token_ids(card, prefix, suffix, suffix_first) == expected
    # A bare tokenizer (Code Llama's token names assumed) gives the same.
    assert infill_token_ids(card.tokenizer, prefix, suffix, suffix_first) == expected


def test_infill_fuzz(card: ModelCard, reference: CodeLlamaTokenizer) -> None:
    """Random concatenations of the pieces where spaces, bytes and special tokens interact."""
    pieces = [" ", "  ", "\n", "\t", "\r\n", "a", "def", " x", "return", "(", "):", "é", "€", "😀", "日本"]
    pieces += ["▁", "▁▁", "<s>", "</s>", " <s>", "<unk>", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>", "<FILL_ME>", ""]
    rng = random.Random(5)
    for _ in range(300):
        prefix = "".join(rng.choices(pieces, k=rng.randint(0, 6)))
        suffix = "".join(rng.choices(pieces, k=rng.randint(0, 6)))
        for suffix_first in (False, True):
            expected = reference(prefix, suffix=suffix, suffix_first=suffix_first)["input_ids"]
            assert infill_token_ids(card, prefix, suffix, suffix_first) == expected, (prefix, suffix, suffix_first)


def test_infill_layout(card: ModelCard) -> None:
    """The layout and the spaces spelled out: the prefix gets exactly one "▁" in front; the suffix none (Meta's
    format and transformers 4: "2" and " 2" are different suffixes)."""

    def tokens(prefix: str, suffix: str, suffix_first: bool) -> list[str]:
        return [card.tokenizer.id_to_token(i) for i in infill_token_ids(card, prefix, suffix, suffix_first)]

    assert tokens("x =", "2", False) == ["<s>", "▁<PRE>", "▁", "x▁", "=", "▁<SUF>", "2", "▁<MID>"]
    assert tokens("x =", " 2", False) == ["<s>", "▁<PRE>", "▁", "x▁", "=", "▁<SUF>", "▁", "2", "▁<MID>"]
    assert tokens("x =", "2", True) == ["<s>", "▁<PRE>", "▁<SUF>", "2", "▁<MID>", "▁", "x▁", "="]
    assert tokens("x =", "\n2", False) == ["<s>", "▁<PRE>", "▁", "x▁", "=", "▁<SUF>", "<0x0A>", "2", "▁<MID>"]
    assert tokens(" x", "y", False) == ["<s>", "▁<PRE>", "▁▁", "x", "▁<SUF>", "y", "▁<MID>"]
    # Empty suffix: no infilling at all, the prefix as a plain prompt.
    assert infill_token_ids(card, " x =", "", True) == card.encode(" x =")


def test_fim_ids_and_stop(card: ModelCard, reference: CodeLlamaTokenizer) -> None:
    assert card.fim_ids == FimIds(prefix=2044, suffix=2045, middle=2046, eot=2047)
    assert card.fim_ids == FimIds(reference.prefix_id, reference.suffix_id, reference.middle_id, reference.eot_id)
    assert infill_stop_token_ids(card) == [reference.eot_id]
    # ▁<EOT> is a special token: even if it reached the detokenizer, it would not show in the text.
    middle = card.encode("    return a + b", add_special_tokens=False)
    assert card.tokenizer.decode([*middle, card.fim_ids.eot], skip_special_tokens=True) == "    return a + b"


def test_model_without_infilling_tokens(model_dir: Path, tmp_path: Path) -> None:
    # A checkpoint whose config disables one of the tokens (CodeLlamaTokenizer's prefix_token=None).
    no_fim = ModelCard.load(copy_model(model_dir, tmp_path / "no-fim", prefix_token=None))
    assert no_fim.fim_ids is None
    with pytest.raises(UnsupportedByModel, match="no infilling tokens") as e:
        infill_token_ids(no_fim, "def f():", "\n", False)
    assert str(e.value) == NO_INFILLING and e.value.field == ""
    with pytest.raises(UnsupportedByModel):
        infill_stop_token_ids(no_fim)
    # A tokenizer without them (Code Llama 34B and the Python variants have a 32000-token vocabulary).
    other_names = ModelCard.load(copy_model(model_dir, tmp_path / "renamed", eot_token="<EOT>"))
    assert other_names.fim_ids is None
    bare = Tokenizer.from_str(no_fim.tokenizer.to_str())
    assert infill_token_ids(bare, "a", "b", False)[:2] == [BOS, 2044]  # the names are there: fine
    with pytest.raises(UnsupportedByModel):
        infill_token_ids(Tokenizer.from_str(_without_token(bare, "▁<MID>")), "a", "b", False)


def _without_token(tokenizer: Tokenizer, token: str) -> str:
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != token]
    del spec["model"]["vocab"][token]
    return json.dumps(spec)


# --------------------------------------------------------------------------------------------------- chat

CHATS = {
    "user": [("user", "Write a function that reverses a string.")],
    "system_user": [
        ("system", "You are a helpful coding assistant. Answer in Python."),
        ("user", "How do I read a file line by line?"),
    ],
    "multi_turn": [
        ("system", "Be brief."),
        ("user", "What is a list comprehension?"),
        ("assistant", "  A compact way to build a list: [x * 2 for x in xs]  "),
        ("user", "And a generator expression?"),
        ("assistant", "The same with parentheses: (x * 2 for x in xs)."),
        ("user", "\n  Show me one with a condition.  \n"),
    ],
    "multi_turn_no_system": [
        ("user", "def f(x): return x"),
        ("assistant", "```python\ndef f(x):\n    return x\n```"),
        ("user", "Add type hints."),
    ],
    "unicode": [("system", "Réponds en français 🇫🇷."), ("user", "Écris « bonjour € » en Python 😀\t日本")],
    "special_token_text": [("user", "What do <s> and </s> mean? And ▁<EOT>?")],
    "empty_content": [("user", "")],
    # ... and silently dropped at an odd one (neither user nor assistant: nothing is written). The template's
    # behaviour, kept: rendering is transformers', whatever it does.
    "system_out_of_place": [("user", "a"), ("system", "dropped")],
}


def _ids(output: Any) -> list[int]:
    # apply_chat_template returns a BatchEncoding (return_dict=True is transformers 5's default) or a list.
    return list(output if isinstance(output, list) else output["input_ids"])


@pytest.mark.parametrize("messages", list(CHATS.values()), ids=list(CHATS))
def test_chat_matches_apply_chat_template(
    instruct_card: ModelCard, hf_instruct: Any, messages: list[tuple[str, str]]
) -> None:
    conversation = [{"role": role, "content": content} for role, content in messages]
    expected_text = hf_instruct.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    expected_ids = _ids(hf_instruct.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True))
    assert render_chat_text(instruct_card, messages) == expected_text
    assert render_chat(instruct_card, messages) == expected_ids


def test_chat_layout(instruct_card: ModelCard) -> None:
    """Code Llama Instruct's format, and the BOS: written by the template before every [INST], tokenized as the
    BOS token, never added a second time by the tokenizer."""
    messages = CHATS["multi_turn"]
    text = render_chat_text(instruct_card, messages)
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is a list comprehension? [/INST]")
    assert " A compact way to build a list: [x * 2 for x in xs] </s><s>[INST] And a generator" in text
    assert text.endswith("[INST] Show me one with a condition. [/INST]")
    ids = render_chat(instruct_card, messages)
    assert ids[0] == BOS and ids[1] != BOS
    assert ids.count(BOS) == 3 and ids.count(2) == 2  # one <s> per user turn, one </s> per assistant reply
    assert render_chat(instruct_card, CHATS["system_out_of_place"]) == render_chat(instruct_card, [("user", "a")])


def test_card_loads_what_transformers_loads(instruct_card: ModelCard, hf_instruct: Any) -> None:
    assert instruct_card.chat_template == hf_instruct.chat_template == CODE_LLAMA_INSTRUCT_TEMPLATE
    for name in ("bos_token", "eos_token", "unk_token"):
        assert instruct_card.special_tokens[name] == hf_instruct.special_tokens_map[name]


def test_no_chat_template(card: ModelCard, model_dir: Path) -> None:
    assert card.chat_template is None
    with pytest.raises(UnsupportedByModel) as e:
        render_chat(card, [("user", "hi")])
    assert str(e.value) == NO_CHAT_TEMPLATE == "this model has no chat template: use Generate or Infill"
    with pytest.raises(ValueError):  # transformers refuses too
        AutoTokenizer.from_pretrained(model_dir).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [
        [("user", "a"), ("user", "b")],
        [("assistant", "a")],
        [("system", "s"), ("assistant", "a")],
        [("user", "a"), ("assistant", "b"), ("assistant", "c")],
        # A system message after the first is just another role to the template: refused at an even index...
        [("user", "a"), ("assistant", "b"), ("system", "s")],
    ],
)
def test_template_refusal_carries_its_message(
    instruct_card: ModelCard, hf_instruct: Any, messages: list[tuple[str, str]]
) -> None:
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(jinja2.TemplateError, match=message):
        hf_instruct.apply_chat_template([{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)
    with pytest.raises(ChatTemplateError) as e:
        render_chat(instruct_card, messages)
    assert e.value.field == "messages" and e.value.problem == message
    assert str(e.value) == f"messages: {message}"


def test_roles_and_messages_are_validated(instruct_card: ModelCard) -> None:
    with pytest.raises(PromptError, match=r"^messages\[1\]\.role: must be one of system, user, assistant, got 'tool'$"):
        render_chat(instruct_card, [("user", "a"), ("tool", "b")])
    with pytest.raises(PromptError) as e:
        render_chat(instruct_card, [])
    assert (e.value.field, e.value.problem) == ("messages", "must not be empty")


def test_template_environment_matches_transformers(model_dir: Path, tmp_path: Path) -> None:
    """What other templates use of transformers' environment: tojson (no HTML escaping), namespace, loop
    controls, {% generation %}, trim_blocks/lstrip_blocks, special tokens as variables."""
    template = textwrap.dedent(
        """\
        {{ bos_token }}
        {% set ns = namespace(turns=0) %}
        {% for message in messages %}
            {% if message['role'] == 'system' %}{% continue %}{% endif %}
            {% set ns.turns = ns.turns + 1 %}
            {% if message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] | tojson }}{{ eos_token }}{% endgeneration %}
            {% else %}
        <{{ message['role'] }} n={{ ns.turns }}>{{ message['content'] | tojson(indent=2) }}
            {% endif %}
        {% endfor %}
        {% if add_generation_prompt %}{{ prefix_token }}<assistant>{% endif %}"""
    )
    model = copy_model(model_dir, tmp_path / "templated", chat_template=template)
    hf = AutoTokenizer.from_pretrained(model)
    messages = [("system", "s"), ("user", "<b>x & y</b> 'é'"), ("assistant", "ok\n"), ("user", "again")]
    conversation = [{"role": r, "content": c} for r, c in messages]
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    templated = ModelCard.load(model)
    assert render_chat_text(templated, messages) == expected
    assert render_chat(templated, messages) == _ids(
        hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    )


def test_chat_template_jinja_file_wins(model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(model_dir, tmp_path / "jinja-file", chat_template="from the config")
    (model / "chat_template.jinja").write_text("{{ bos_token }}from the file", encoding="utf-8")
    assert ModelCard.load(model).chat_template == AutoTokenizer.from_pretrained(model).chat_template
    assert ModelCard.load(model).chat_template == "{{ bos_token }}from the file"


def test_broken_template_is_the_models_fault(model_dir: Path, tmp_path: Path) -> None:
    broken = ModelCard.load(copy_model(model_dir, tmp_path / "broken", chat_template="{% for m in messages %}"))
    with pytest.raises(UnsupportedByModel, match="chat template does not compile"):
        render_chat(broken, [("user", "hi")])
