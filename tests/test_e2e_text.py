"""Text on the way out: byte-safe deltas and stop sequences, end to end, on hand-wired Llamas whose greedy
output is known in advance (see tests/tiny_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from protos import api
from tests.conftest import running_stack
from tests.tiny_models import build_bigram_llama


def byte_token(b: int) -> int:
    return 3 + b  # the demo tokenizer's <0x00>..<0xFF> are ids 3..258, as in Llama


@pytest.fixture(scope="module")
def tok(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))


async def stream(stack, prompt_ids: list[int], max_new_tokens: int, stop: list[str] | None = None):
    request = api.GenerateRequest(
        prompt_token_ids=api.TokenIds(ids=prompt_ids),
        stopping=api.StoppingCriteria(max_new_tokens=max_new_tokens, stop=stop or []),
        response=api.ResponseOptions(return_token_ids=True),
    )
    return [e async for e in stack.stub.GenerateStream(request)]


async def test_a_character_split_over_byte_tokens_arrives_whole(
    redis_url: str, demo_model_dir: Path, tok: Tokenizer, tmp_path: Path
):
    # "€" is three byte-fallback tokens; the model is wired to loop  x -> E2 -> 82 -> AC -> x ...
    x = tok.token_to_id("x")
    e2, b82, bac = byte_token(0xE2), byte_token(0x82), byte_token(0xAC)
    model = build_bigram_llama(demo_model_dir, tmp_path / "euro", {x: e2, e2: b82, b82: bac, bac: x})
    async with running_stack(redis_url, model) as stack:
        events = await stream(stack, [1, x], max_new_tokens=11)
    chunks = [e.tokens for e in events if e.HasField("tokens")]
    assert [t for c in chunks for t in c.token_ids] == [e2, b82, bac, x] * 2 + [e2, b82, bac]
    # Each character arrives whole, with the token that completes it. (A gateway may merge the chunks that
    # wait for a slow reader into one: the text then goes with the last token of the merged chunk.)
    completes = {e2: "", b82: "", bac: "€", x: "x"}
    assert [c.text for c in chunks] == ["".join(completes[t] for t in c.token_ids) for c in chunks]
    assert events[-1].finished.stop_reason == api.STOP_REASON_LENGTH


async def test_a_stop_sequence_spanning_two_tokens_stops_exactly_before_it(
    redis_url: str, demo_model_dir: Path, tok: Tokenizer, tmp_path: Path
):
    # The model loops  None -> self -> return -> value -> self ...; generated text "selfreturnvalueself..."
    none, self_, ret, value = (tok.token_to_id(w) for w in ("None", "self", "return", "value"))
    model = build_bigram_llama(demo_model_dir, tmp_path / "words", {none: self_, self_: ret, ret: value, value: self_})
    async with running_stack(redis_url, model) as stack:
        plain = await stream(stack, [1, none], max_new_tokens=4)
        assert "".join(e.tokens.text for e in plain if e.HasField("tokens")) == "selfreturnvalueself"
        # "urnva" starts inside "return" and ends inside "value".
        events = await stream(stack, [1, none], max_new_tokens=20, stop=["zzz", "urnva"])
        # A stop that never matches does not hold text back at the end.
        unmatched = await stream(stack, [1, none], max_new_tokens=3, stop=["fre!"])
    chunks = [e.tokens for e in events if e.HasField("tokens")]
    assert [t for c in chunks for t in c.token_ids] == [self_, ret, value]
    assert "".join(c.text for c in chunks) == "selfret"
    # Text that might begin the stop sequence was held back, never sent and then retracted: "return" sends
    # only "ret", and "value" (which completes the stop) nothing. (Chunks merged for a slow reader carry the
    # text of all their tokens.)
    sends = {self_: "self", ret: "ret", value: ""}
    assert [c.text for c in chunks] == ["".join(sends[t] for t in c.token_ids) for c in chunks]
    finished = events[-1].finished
    assert finished.stop_reason == api.STOP_REASON_STOP_SEQUENCE and finished.stop_sequence == "urnva"
    assert finished.generated_tokens == 3
    assert "".join(e.tokens.text for e in unmatched if e.HasField("tokens")) == "selfreturnvalue"
