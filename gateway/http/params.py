"""Reading JSON request bodies into the gRPC request messages.

Fields are read one at a time with their JSON type checked; whatever is left unread is refused, so that
a misspelt parameter is an error rather than a silently ignored one. Errors are `InvalidRequest`s naming
the field as the client spelt it (`input_data.parameters.tempreature: unknown parameter`), and the errors
that `gateway.validation` raises with the message's field paths (`sampling.top_p`) are renamed the same
way before they reach the client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from gateway.config import GatewayConfig
from gateway.model_card import ModelCard
from gateway.validation import InvalidRequest, ResolvedRequest

Kind = Literal["bool", "number", "uint32", "uint64", "string", "strings", "uint32s", "bias", "object", "list"]
KIND_RULES: dict[str, str] = {
    "bool": "must be true or false",
    "number": "must be a number",
    "uint32": "must be an integer in [0, 4294967295]",
    "uint64": "must be an integer in [0, 18446744073709551615]",
    "string": "must be a string",
    "strings": "must be a string or a list of strings",
    "uint32s": "must be a list of integers >= 0",
    "bias": "must be an object of token id (a string of digits) to number",
    "object": "must be a JSON object",
    "list": "must be a list",
}


def _uint(value: Any, bits: int) -> bool:
    # bool is an int in Python; JSON's true is not a number.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**bits


def check(kind: Kind, value: Any, field: str) -> Any:
    """`value` as the kind says (a lone string for `strings` becomes a list), or InvalidRequest."""
    ok: bool
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "uint32" or kind == "uint64":
        ok = _uint(value, 32 if kind == "uint32" else 64)
    elif kind == "string":
        ok = isinstance(value, str)
    elif kind == "strings":
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(s, str) for s in value)
    elif kind == "uint32s":
        ok = isinstance(value, list) and all(_uint(t, 32) for t in value)
    elif kind == "bias":
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and k.isdigit() and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in value.items()
        )
        ok = ok and all(int(k) < 2**32 for k in value)
        value = {int(k): float(v) for k, v in value.items()} if ok else value
    elif kind == "object":
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, list)
    if not ok:
        raise InvalidRequest(field, KIND_RULES[kind])
    return value


class Params:
    """The fields of one JSON object, read with their types checked."""

    def __init__(self, value: Any, path: str = "") -> None:
        if not isinstance(value, dict):
            raise InvalidRequest(path or "body", "must be a JSON object")
        self.values: dict[str, Any] = value
        self.path = path
        self.read: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: Kind, default: Any = None) -> Any:
        """The field's value, or `default` when it is absent or null (JSON clients send null for 'unset')."""
        self.read.add(key)
        value = self.values.get(key)
        return default if value is None else check(kind, value, self.name(key))

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def ignore(self, *keys: str) -> None:
        self.read.update(keys)

    def refuse_unknown(self, hints: Mapping[str, str] | None = None) -> None:
        for key in self.values:
            if key not in self.read:
                raise InvalidRequest(self.name(key), (hints or {}).get(key, "unknown parameter"))


def apply(message: Any, params: Params, fields: Mapping[str, tuple[str, Kind]]) -> None:
    """Copy the fields present in `params` into `message` (a GenerateRequest, InfillRequest or ChatRequest),
    each to its path there: {"temperature": ("sampling.temperature", "number")}."""
    for key, (path, kind) in fields.items():
        value = params.get(key, kind)
        if value is None:
            continue
        *groups, name = path.split(".")
        target = message
        for group in groups:
            target = getattr(target, group)
        if kind in ("strings", "uint32s"):
            getattr(target, name).extend(value)
        elif kind == "bias":
            getattr(target, name).update(value)
        else:
            setattr(target, name, value)


def renamed(exc: InvalidRequest, names: Mapping[str, str]) -> InvalidRequest:
    """`exc` with its field path (as gateway.validation spells it) replaced by the client's name for it; the
    longest matching path wins, and an index or key after it is kept (`stopping.stop[1]` -> `stop[1]`)."""
    field = exc.field
    problem = str(exc)[len(field) + 2 :]
    for path in sorted(names, key=len, reverse=True):
        if field == path or field.startswith((path + "[", path + ".")):
            return InvalidRequest(names[path] + field[len(path) :], problem)
    return exc


def resolver(
    resolve: Callable[[Any, ModelCard, GatewayConfig], ResolvedRequest],
    request: Any,
    card: ModelCard,
    config: GatewayConfig,
    names: Mapping[str, str],
) -> Callable[[], ResolvedRequest]:
    """`resolve(request, card, config)`, later, with its InvalidRequest renamed for the client."""

    def run() -> ResolvedRequest:
        try:
            return resolve(request, card, config)
        except InvalidRequest as exc:
            raise renamed(exc, names) from None

    return run
