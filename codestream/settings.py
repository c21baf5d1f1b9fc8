"""Settings from flags and `CODESTREAM_*` environment variables, for the config dataclasses.

Every field of GatewayConfig / WorkerConfig is a flag (`max_num_seqs` -> `--max-num-seqs`) and an
environment variable (`CODESTREAM_MAX_NUM_SEQS`). Precedence: flag, then environment, then default.
The Kubernetes manifests set the environment variables; env_name() is the one place names are made.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TypeVar

T = TypeVar("T")
ENV_PREFIX = "CODESTREAM_"


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field; default None so we can tell 'not given' from a value."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _field_type(f)
        help_text = f"{f.metadata.get('help', '')} (env {env_name(f.name)}, default {f.default!r})"
        if kind is bool:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, type=kind, default=None, help=help_text)


def load(
    cls: type[T], args: argparse.Namespace | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> T:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _field_type(f)
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif args is not None and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
        elif env_name(f.name) in env:
            values[f.name] = _parse(kind, env[env_name(f.name)], env_name(f.name))
    return cls(**values)


def _field_type(f: dataclasses.Field) -> type:
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(f.type if isinstance(f.type, str) else "")
    return kind or (f.type if isinstance(f.type, type) else type(f.default))


def _parse(kind: type, raw: str, name: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected a boolean, got {raw!r}")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: expected {kind.__name__}, got {raw!r}") from exc
