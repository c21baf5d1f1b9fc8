"""Prompts for the Infill and Chat RPCs, token for token what transformers builds for the same request.

**Infill** builds Code Llama's infilling prompt the way the model was trained on it (Meta's
``encode_infilling``) and transformers 4's CodeLlamaTokenizer built it, which is also what transformers 5's
CodeLlamaTokenizer gives over the checkpoint's own tokenizer.json pipeline (no pre-tokenizer):

* prefix-suffix-middle: ``<s> ▁<PRE> {prefix} ▁<SUF>{suffix} ▁<MID>``
* suffix-prefix-middle: ``<s> ▁<PRE> ▁<SUF>{suffix} ▁<MID> {prefix}``

The spaces: while infilling, the normalizer is ``Replace(" ", "▁")`` alone (no ``Prepend``), so

* the prefix gets exactly one "▁" in front: " " is prepended to it (``" x"`` -> ``▁▁x``, ``"x"`` -> ``▁x``);
* the suffix is encoded as it is, with no implicit leading space: ``"x"`` -> ``x``, ``" x"`` -> ``▁x``,
  ``"\nx"`` -> ``<0x0A>x``. (transformers 5's CodeLlamaTokenizer, which installs a
  ``Metaspace(prepend_scheme="first")`` pre-tokenizer of its own, gives the suffix an extra "▁" unless it
  starts with a space: a departure from the training format, not followed here);
* an empty suffix is no infilling (as in every reference): the prefix encoded as a Generate prompt would be.

The gateway must not load transformers' tokenizer classes (they rebuild the pipeline and change how plain
prompts tokenize, see codestream/demo_model.py), so the infilling pipeline is a copy of the model's
``tokenizers.Tokenizer`` with its normalizer, pre-tokenizer and post-processor swapped, built once per
tokenizer; the layout around the two sequences is assembled here.

**Chat** renders the checkpoint's own chat template the way ``apply_chat_template(messages, tokenize=True,
add_generation_prompt=True)`` does: the same sandboxed Jinja environment (trim_blocks, lstrip_blocks,
``raise_exception``, ``strftime_now``, transformers' ``tojson``, ``dict`` and ``namespace``) and variables
(``messages``, ``add_generation_prompt``, the named special tokens), then tokenizes the text without
adding special tokens: the template writes ``<s>`` itself, which the tokenizer matches as the BOS token.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, normalizers

from gateway.model_card import FIM_TOKEN_DEFAULTS, FimIds, ModelCard

SPACE = "▁"  # SentencePiece's visible space
CHAT_ROLES = ("system", "user", "assistant")
NO_CHAT_TEMPLATE = "this model has no chat template: use Generate or Infill"
NO_INFILLING = "this model has no infilling tokens (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>): use Generate or Chat"


class PromptError(ValueError):
    """A request that cannot be turned into a prompt. ``field`` names the request field at fault as the
    request spells it (``messages[2].role``), empty when the model itself is the reason."""

    def __init__(self, problem: str, field: str = "") -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class UnsupportedByModel(PromptError):
    """The served model cannot do this at all: no chat template, no infilling tokens, a template that does
    not compile. Not the client's request's fault; retrying will not help."""


class ChatTemplateError(PromptError):
    """The chat template refused the messages (``raise_exception`` in the template, e.g. roles that do not
    alternate); the message is the template's own."""


# ------------------------------------------------------------------------------------------------- infill


def infill_token_ids(
    card_or_tokenizer: ModelCard | Tokenizer, prefix: str, suffix: str, suffix_first: bool
) -> list[int]:
    """The prompt for filling in between ``prefix`` and ``suffix``, BOS included: the ids of
    ``CodeLlamaTokenizer(prefix, suffix=suffix, suffix_first=suffix_first)["input_ids"]`` over the
    checkpoint's tokenizer.json pipeline (transformers 4, and Meta's format).

    A bare ``Tokenizer`` is taken to use Code Llama's token names (``<s>``, ``▁<PRE>`` ...). Raises
    ``UnsupportedByModel`` when the tokenizer has no infilling tokens.
    """
    tokenizer, bos_id, fim = _infill_setup(card_or_tokenizer)
    if not suffix:
        # The reference's fallback (CodeLlamaTokenizer._encode_plus: an empty text_pair is no infilling): the
        # prefix as a plain prompt, no infilling tokens, so the model simply continues it.
        return tokenizer.encode(prefix).ids
    pipeline = _infill_pipeline(tokenizer)
    # Encoded one at a time, as the reference's pair is: each sequence normalized on its own.
    prefix_ids = pipeline.encode(" " + prefix, add_special_tokens=False).ids
    suffix_ids = pipeline.encode(suffix, add_special_tokens=False).ids
    # Code Llama's tokenizer_config has add_bos_token=True, add_eos_token=False: BOS first, no EOS.
    if suffix_first:
        return [bos_id, fim.prefix, fim.suffix, *suffix_ids, fim.middle, *prefix_ids]
    return [bos_id, fim.prefix, *prefix_ids, fim.suffix, *suffix_ids, fim.middle]


def infill_stop_token_ids(card: ModelCard) -> list[int]:
    """Token ids that end an infilling generation: ``▁<EOT>``, the model's end of the middle. Like any stop
    token id, it is not part of the returned text, which is then the middle alone."""
    if card.fim_ids is None:
        raise UnsupportedByModel(NO_INFILLING)
    return [card.fim_ids.eot]


def _infill_setup(card_or_tokenizer: ModelCard | Tokenizer) -> tuple[Tokenizer, int, FimIds]:
    if isinstance(card_or_tokenizer, ModelCard):
        if card_or_tokenizer.fim_ids is None:
            raise UnsupportedByModel(NO_INFILLING)
        return card_or_tokenizer.tokenizer, card_or_tokenizer.bos_token_id, card_or_tokenizer.fim_ids
    tokenizer = card_or_tokenizer
    ids = {role: tokenizer.token_to_id(token) for role, token in FIM_TOKEN_DEFAULTS.items()}
    bos_id = tokenizer.token_to_id("<s>")
    if bos_id is None or None in ids.values():
        raise UnsupportedByModel(NO_INFILLING)
    return tokenizer, bos_id, FimIds(**ids)  # type: ignore[arg-type]  # None excluded just above


# One infilling pipeline per tokenizer, dropped with it (a card reloaded in tests does not pin the old one).
_pipelines: weakref.WeakKeyDictionary[Tokenizer, Tokenizer] = weakref.WeakKeyDictionary()
_pipelines_lock = threading.Lock()


def _infill_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """The model's tokenizer as CodeLlamaTokenizer.set_infilling_processor(False) reconfigures it.

    Same BPE model and added tokens (so ``▁<EOT>`` typed in the text is still matched whole, as by the
    reference); the normalizer keeps only the space replacement; no pre-tokenizer, as in Code Llama's
    tokenizer.json; the layout is assembled by the caller rather than a post-processor.
    """
    with _pipelines_lock:
        pipeline = _pipelines.get(tokenizer)
        if pipeline is None:
            pipeline = Tokenizer.from_str(tokenizer.to_str())
            pipeline.normalizer = normalizers.Replace(" ", SPACE)
            pipeline.pre_tokenizer = None
            pipeline.post_processor = None
            # Whatever the checkpoint's tokenizer.json says about these, a prompt is never cut or padded here.
            pipeline.no_truncation()
            pipeline.no_padding()
            _pipelines[tokenizer] = pipeline
        return pipeline


# --------------------------------------------------------------------------------------------------- chat


def render_chat_text(card: ModelCard, messages: Sequence[tuple[str, str]]) -> str:
    """The chat rendered with the checkpoint's template, as ``apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)`` returns it (special tokens written as text: ``<s>[INST] ... [/INST]``)."""
    if card.chat_template is None:
        raise UnsupportedByModel(NO_CHAT_TEMPLATE)
    if not messages:
        raise PromptError("must not be empty", "messages")
    for i, (role, content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise PromptError(f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}", f"messages[{i}].role")
        if not isinstance(content, str):
            raise PromptError("must be a string", f"messages[{i}].content")
    template = _compile(card.chat_template)
    # The variables apply_chat_template passes: the named special tokens, the conversation (plain dicts),
    # tools and documents (none here), add_generation_prompt. Code Llama's template ignores the last one.
    variables: dict[str, Any] = {
        **card.special_tokens,
        "messages": [{"role": role, "content": content} for role, content in messages],
        "tools": None,
        "documents": None,
        "add_generation_prompt": True,
    }
    try:
        return template.render(**variables)
    except jinja2.TemplateError as e:
        # raise_exception(...) in the template (roles not alternating), or the template failing on these
        # messages (an undefined attribute, a sandbox refusal): the client's conversation does not fit it.
        raise ChatTemplateError(str(e) or type(e).__name__, "messages") from e


def render_chat(card: ModelCard, messages: Sequence[tuple[str, str]]) -> list[int]:
    """The chat's prompt token ids: ``apply_chat_template(messages, tokenize=True, add_generation_prompt=True)``.

    ``messages`` are (role, content) pairs, role one of system/user/assistant. Raises ``UnsupportedByModel``
    for a model without a chat template, ``ChatTemplateError`` (with the template's message) when the template
    refuses the conversation, ``PromptError`` for an unknown role or no messages.
    """
    text = render_chat_text(card, messages)
    # add_special_tokens=False as in apply_chat_template: the template writes the BOS token itself (Code Llama's
    # writes it before every [INST]); the tokenizer matches "<s>" and "</s>" in the text as special tokens.
    return card.tokenizer.encode(text, add_special_tokens=False).ids


# The chat template environment: transformers' (``_cached_compile_jinja_template``, transformers 5.24), copied
# rather than imported, since the gateway does not depend on transformers.


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers replaces Jinja's tojson, which escapes HTML characters: templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    # dict() without the dict type itself, whose attributes would be reachable from the template.
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces refuse underscore attributes, which would reach CPython internals.
    def __init__(*args: Any, **kwargs: Any) -> None:
        # Jinja's signature trick, kept so that `namespace(self=...)` works: `self` may be a key.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


class _GenerationBlock(jinja2.ext.Extension):
    # transformers parses {% generation %}...{% endgeneration %} (it marks the assistant's tokens for training
    # masks); a template using it must compile here too. Rendered, the block is just its body.
    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _jinja_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """The template compiled once (a checkpoint has one), on the first Chat request."""
    # Templates come with the checkpoint: untrusted code. Jinja before 3.1.6 has known sandbox escapes, which
    # is why transformers refuses it too.
    if _jinja_version() < (3, 1, 6):
        raise UnsupportedByModel(f"Chat needs jinja2 >= 3.1.6 on the gateway, found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise UnsupportedByModel(f"this model's chat template does not compile: {e}") from e
