"""Incremental detokenization against full decodes, byte-fallback characters and stop sequences."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from worker.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "    print('héllo € 😀 日本語')  # mixed\n",
    "a\tb\r\nc  d   e",
    "ñ" * 5 + "€€" + " 😀😀 ",
]


@pytest.fixture(scope="module")
def tok(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))


def run(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], str | None]:
    deltas, matched = [], None
    for t in ids:
        matched = detok.push(t)
        deltas.append(detok.take(final=matched is not None))
        if matched:
            break
    if matched is None:
        deltas.append(detok.take(final=True))
    return deltas, matched


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode_and_never_split_a_character(tok: Tokenizer, text: str):
    prompt = tok.encode("# prompt\n").ids
    generated = tok.encode(text, add_special_tokens=False).ids
    deltas, _ = run(IncrementalDetokenizer(tok, prompt), generated)
    full = tok.decode(prompt + generated)
    assert "".join(deltas) == full[len(tok.decode(prompt)) :]
    assert all("\ufffd" not in d for d in deltas)


def test_first_generated_word_keeps_its_leading_space(tok: Tokenizer):
    prompt = tok.encode("x =").ids
    generated = tok.encode("1", add_special_tokens=False).ids  # the normalizer makes it "▁1": a leading space
    assert tok.id_to_token(generated[0]).startswith("▁")
    deltas, _ = run(IncrementalDetokenizer(tok, prompt), generated)
    assert "".join(deltas) == tok.decode(prompt + generated)[len("x =") :]
    assert "".join(deltas).startswith(" ")
    assert not tok.decode(generated).startswith(" "), "decoding the generated tokens alone would lose it"


def test_bytes_that_never_form_a_character_come_out_as_replacement_characters(tok: Tokenizer):
    lone_continuation = 3 + 0x82
    deltas, _ = run(IncrementalDetokenizer(tok, [1]), [lone_continuation] * 9)
    assert "".join(deltas) == tok.decode([lone_continuation] * 9)
    assert len([d for d in deltas if d]) >= 2, "emitted as it goes, not only at the end"


def test_stop_sequence_found_across_tokens_and_text_cut_before_it(tok: Tokenizer):
    ids = tok.encode("result = compute(value)\nreturn result", add_special_tokens=False).ids
    deltas, matched = run(IncrementalDetokenizer(tok, [1], stop=("(val", "\nret")), ids)
    assert matched == "(val"
    assert "".join(deltas) == "result = compute"


def test_the_earliest_of_several_stop_sequences_wins(tok: Tokenizer):
    ids = tok.encode("abc def ghi", add_special_tokens=False).ids
    deltas, matched = run(IncrementalDetokenizer(tok, [1], stop=("ghi", "c d")), ids)
    assert matched == "c d" and "".join(deltas) == "ab"


def test_random_token_streams_match_full_decodes(tok: Tokenizer):
    rng = random.Random(0)
    vocab = tok.get_vocab_size()
    for _ in range(50):
        ids = [rng.randrange(3, vocab - 4) for _ in range(rng.randint(1, 30))]
        deltas, _ = run(IncrementalDetokenizer(tok, [1]), ids)
        text = "".join(deltas)
        # Whole characters only ever come out; valid text equals the full decode exactly.
        if "\ufffd" not in tok.decode(ids):
            assert text == tok.decode([1, *ids], skip_special_tokens=True)


def test_include_stop_sequence_keeps_the_match_and_nothing_after_it(tok: Tokenizer):
    ids = tok.encode("result = compute(value)\nreturn result", add_special_tokens=False).ids
    deltas, matched = run(IncrementalDetokenizer(tok, [1], stop=("(val", "\nret"), include_stop=True), ids)
    assert matched == "(val"
    assert "".join(deltas) == "result = compute(val"  # the token "value" goes on, but its "ue" does not
    # Text that may begin the stop string is still held back until the match is known.
    assert all(not d.endswith("(") for d in deltas[:-1])


def test_include_stop_sequence_with_several_candidates(tok: Tokenizer):
    ids = tok.encode("abc def ghi", add_special_tokens=False).ids
    deltas, matched = run(IncrementalDetokenizer(tok, [1], stop=("ghi", "c d"), include_stop=True), ids)
    assert matched == "c d" and "".join(deltas) == "abc d"
    # Two stop strings starting at the same place: the shorter one completes first.
    deltas, matched = run(IncrementalDetokenizer(tok, [1], stop=("c def", "c d"), include_stop=True), ids)
    assert matched == "c d" and "".join(deltas) == "abc d"


def test_include_stop_sequence_on_a_continuation(tok: Tokenizer):
    ids = tok.encode("x = 1\ny = 2\n", add_special_tokens=False).ids
    full, _ = run(IncrementalDetokenizer(tok, [1], stop=("y =",), include_stop=True), ids)
    text = "".join(full)
    assert text == "x = 1\ny ="
    resumed = IncrementalDetokenizer(tok, [1], stop=("y =",), include_stop=True)
    resumed.replay(ids[:2], "".join(full[:2]))
    rest, matched = run(resumed, ids[2:])
    assert matched == "y =" and "".join(full[:2]) + "".join(rest) == text


def test_text_after_a_special_token_keeps_its_leading_space(tok: Tokenizer):
    """An infilling prompt ends with ▁<MID>: the middle's first word keeps its space (as Meta's decoding)."""
    mid = tok.token_to_id("▁<MID>")
    prompt = [*tok.encode("def f(x):", add_special_tokens=False).ids, mid]
    generated = tok.encode("return x", add_special_tokens=False).ids  # "▁return▁x"-ish: a leading space
    deltas, _ = run(IncrementalDetokenizer(tok, prompt), generated)
    assert "".join(deltas) == " return x"
