"""Token ids as OpenAI's `logprobs` objects show them, for /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import re
from typing import Any

from gateway.model_card import ModelCard
from protos import api

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Pieces:
    """Token ids as OpenAI's logprobs show them: the text each token stands for (SentencePiece's "▁" as a
    space, a byte-fallback token as its character, or `bytes:\\xNN` for a byte that is part of one)."""

    def __init__(self, card: ModelCard) -> None:
        self.tokenizer = card.tokenizer
        self.special = {i for i, t in card.tokenizer.get_added_tokens_decoder().items() if t.special}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def piece(self, token_id: int) -> tuple[str, bytes]:
        if (cached := self._cache.get(token_id)) is not None:
            return cached
        token = self.tokenizer.id_to_token(token_id) or ""
        if token_id in self.special:
            piece = (token, token.encode())
        elif match := BYTE_TOKEN.fullmatch(token):
            raw = bytes([int(match.group(1), 16)])
            piece = (raw.decode() if raw[0] < 0x80 else f"bytes:\\x{raw[0]:02x}", raw)
        else:
            text = token.replace("▁", " ")
            piece = (text, text.encode())
        self._cache[token_id] = piece
        return piece

    def completion_logprobs(
        self, entries: list[tuple[int, api.TokenLogprob | None]], offset: int, prompt_first: bool
    ) -> tuple[dict[str, list[Any]], int]:
        """OpenAI's completion `logprobs` object for these tokens, text offsets from `offset`; returns it and the
        offset after them. `prompt_first`: the entries start with the prompt's (echo)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in entries:
            text = self.piece(token_id)[0]
            special = token_id in self.special
            if prompt_first and not special:
                # Llama's tokenizer writes the prompt's first word with a space that the prompt text lacks.
                text, prompt_first = text.removeprefix(" "), False
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += 0 if special else len(text)  # BOS and EOS are not in the text
            out["token_logprobs"].append(lp.logprob if lp is not None else None)
            top = None
            if lp is not None:
                # OpenAI's: the most likely alternatives, and the chosen token whether or not it is among them.
                top = {self.piece(alt.token_id)[0]: alt.logprob for alt in lp.top}
                top.setdefault(text, lp.logprob)
            out["top_logprobs"].append(top)
        return out, offset

    def chat_logprob(self, lp: api.TokenLogprob) -> dict[str, Any]:
        text, raw = self.piece(lp.token_id)
        top = [(*self.piece(alt.token_id), alt.logprob) for alt in lp.top]
        return {
            "token": text, "logprob": lp.logprob, "bytes": list(raw),
            "top_logprobs": [{"token": t, "logprob": logprob, "bytes": list(b)} for t, b, logprob in top],
        }  # fmt: skip
