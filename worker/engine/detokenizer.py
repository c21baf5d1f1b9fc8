"""Incremental, byte-safe detokenization with stop sequences matched on text.

Llama's byte-fallback tokens can split one UTF-8 character over several tokens (`€` is <0xE2><0x82><0xAC>),
so a token's text cannot be decoded on its own. Each step decodes a short window of tokens twice, with and
without the new ones, and hands out the difference once it no longer ends in an incomplete character
(U+FFFD). Both decodes start at the same token, so the Llama decoder's stripping of one leading space
cancels out; the window starts in the prompt, so the first generated word keeps its leading space.

`tokenizers.decoders.DecodeStream` does the same, but holds bytes that never form a character forever (and
re-decodes an ever longer window meanwhile); here a UTF-8 character has at most 4 bytes, so after 4 tokens
without a whole character the replacement character goes out, as a full decode would show it.

Stop sequences are matched on the generated text, not on tokens: a stop string can span tokens or start in
the middle of one. Text that could still turn out to be the beginning of a stop sequence is held back, so a
client never receives part of a stop sequence. The text ends just before the earliest match (the shorter
stop string if two start at the same place); with `include_stop` it ends just after it, the matched stop
string included, and nothing that followed it in the same token.
"""

from __future__ import annotations

import weakref

from tokenizers import Tokenizer

MAX_UTF8_BYTES = 4


_special_cache: weakref.WeakKeyDictionary[Tokenizer, frozenset[int]] = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    ids = _special_cache.get(tokenizer)
    if ids is None:
        ids = frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
        _special_cache[tokenizer] = ids
    return ids


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        context: int = 8,
        include_stop: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-context:])
        # ids[prefix_offset:read_offset] is decoded context; ids[read_offset:] are tokens not yet turned to text.
        # The context starts at the last token that decodes to text: after a special token (an infilling
        # prompt ends with ▁<MID>, skipped when decoding), the first generated word would otherwise be decoded
        # at the start of a string and lose its leading space.
        special = _special_ids(tokenizer)
        last_text = next((i for i in range(len(self.ids) - 1, -1, -1) if self.ids[i] not in special), None)
        self.prefix_offset = last_text if last_text is not None else max(0, len(self.ids) - 1)
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""  # all generated text so far (cut at a matched stop sequence)
        self.num_sent = 0  # characters of self.text already handed out
        self.stopped = False  # a stop sequence matched: the text is final

    def push(self, token_id: int) -> str | None:
        """Add a generated token; return the stop sequence it completed, if any."""
        self.ids.append(token_id)
        chunk = self._advance(force=False)
        if not chunk:
            return None
        start = max(self.num_sent, len(self.text) - self.max_stop_len + 1) if self.stop else 0
        self.text += chunk
        if not self.stop:
            return None
        # Earliest match among the stop strings that begin in the unsent window.
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, start)
            if at >= 0 and (best is None or (at, len(s)) < (best[0], len(best[1]))):
                best = (at, s)
        if best is None:
            return None
        self.text = self.text[: best[0] + len(best[1]) if self.include_stop else best[0]]
        self.stopped = True
        return best[1]

    def replay(self, token_ids: list[int], sent_text: str) -> None:
        """Rebuild the state after `token_ids` were generated and `sent_text` handed out (by an engine that
        is gone): what the client has not received yet (a held-back tail) is handed out next."""
        for token_id in token_ids:
            self.push(token_id)
        if not self.text.startswith(sent_text):
            raise ValueError("the text already sent does not match the generated tokens")
        self.num_sent = len(sent_text)

    def _advance(self, force: bool) -> str:
        """Text of the tokens not yet read; empty while they end inside a character (unless forced)."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        pending = len(self.ids) - self.read_offset
        incomplete = new_text.endswith("\ufffd") and pending < MAX_UTF8_BYTES
        if not force and (len(new_text) <= len(prefix_text) or incomplete):
            return ""  # nothing yet, or an incomplete character: wait for its next byte
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # Keep the window short: decoding cost must not grow with the sequence.
        if self.prefix_offset > 64:
            del self.ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return new_text[len(prefix_text) :]

    def take(self, final: bool = False) -> str:
        """Text not yet handed out; unless final, without a tail that may begin a stop sequence.
        With final, bytes still waiting for the rest of a character come out as they decode (U+FFFD)."""
        if final and not self.stopped and self.read_offset < len(self.ids):
            self.text += self._advance(force=True)
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.num_sent : end]
        self.num_sent = max(self.num_sent, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop sequence."""
        unsent = len(self.text) - self.num_sent
        for n in range(min(self.max_stop_len - 1, unsent), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
