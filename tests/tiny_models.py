"""Hand-wired Llama checkpoints whose greedy output is known in advance.

A random model's output is arbitrary, which makes it useless for testing what happens to specific
token sequences on their way to the client: a multi-byte character split over byte-fallback tokens
(``<0xE2>`` ``<0x82>`` ``<0xAC>`` = "€") must arrive whole, a stop sequence spanning two tokens must
stop exactly. ``build_bigram_llama`` builds a real ``LlamaForCausalLM`` checkpoint that, under greedy
decoding, always follows token ``t`` with ``successor[t]``, whatever came before.

How: with every attention ``o_proj`` and MLP ``down_proj`` zeroed, each layer adds nothing to the
residual stream, so the final hidden state at a position is just the embedding of the token there.
Each token with a successor gets its own orthonormal embedding direction ``e_t``; after the final RMSNorm
(weight 1) that is ``sqrt(hidden_size) * e_t``, and ``lm_head[successor[t]] += 20 * e_t`` gives the
successor a logit of ``20 * sqrt(hidden_size)`` (~226 for 128) against noise of ~0.1 for every other row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from codestream.demo_model import tiny_llama_config

_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_LOGIT_SCALE = 20.0


def build_bigram_llama(
    base_dir: Path,
    out_dir: Path,
    successor: dict[int, int],
    *,
    default_next: int | None = None,
    hidden_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a checkpoint into ``out_dir`` whose greedy next token after ``t`` is ``successor[t]``.

    ``base_dir`` is a demo model directory: its tokenizer and generation config are copied, its vocabulary
    size reused. With ``default_next``, every token not among ``successor``'s keys is followed by
    ``default_next``; without it, their successors are arbitrary (but fixed by ``seed``).
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    vocab_size = json.loads((base_dir / "config.json").read_text())["vocab_size"]
    # Tokens with a successor get their own direction; all others share one more.
    mapped = sorted(successor)
    ids = [*successor, *successor.values(), *([default_next] if default_next is not None else [])]
    if any(not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    if hidden_size < len(mapped) + 1:
        raise ValueError(f"hidden_size {hidden_size} too small for {len(mapped)} mapped tokens")

    config = tiny_llama_config(vocab_size, num_hidden_layers=1, hidden_size=hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        # Random orthonormal directions: columns of the Q of a Gaussian matrix.
        directions, _ = torch.linalg.qr(torch.randn(hidden_size, len(mapped) + 1))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.norm.weight.fill_(1.0)

            embed = model.model.embed_tokens.weight
            other = directions[:, -1]
            if default_next is None:
                embed.normal_(0.0, 0.02)
            else:
                # Unmapped tokens all point along `other` (plus a little noise): the successor row gets
                # 20 * other, the same trick as for mapped tokens.
                embed.copy_(other + 0.01 * torch.randn(vocab_size, hidden_size))
            for i, t in enumerate(mapped):
                embed[t] = directions[:, i]

            head = model.lm_head.weight
            head.normal_(0.0, 0.01)
            index = {t: i for i, t in enumerate(mapped)}
            for t, nxt in successor.items():
                head[nxt] += _LOGIT_SCALE * directions[:, index[t]]
            if default_next is not None:
                head[default_next] += _LOGIT_SCALE * other

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in _COPIED_FILES:
        shutil.copyfile(base_dir / name, out_dir / name)
    return out_dir
