"""Who may call the gateway: API keys in call metadata, and TLS / mTLS on the gRPC port.

API keys come from a file of `tenant:key` lines (what a Kubernetes Secret mounts). The gateway keeps
only SHA-256 digests of the keys, compares digests in constant time, and re-reads the file when it
changes, so a revoked key stops working without a restart. The check is a server interceptor: the
servicer never sees an unauthenticated call, and learns the caller's tenant from `current_tenant()`.

Health and reflection stay open: Kubernetes probes and grpcurl's discovery carry no key.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from gateway.config import GatewayConfig
from gateway.handlers import PerMethod, wrap_handler

log = structlog.get_logger("gateway.auth")

# Services a caller without a key may use. Everything else (codestream.v1 and whatever is added later)
# needs a key: an allowlist of open services fails closed.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
MISSING_KEY = "missing API key"
# One message for unknown and revoked keys alike: a caller learns nothing about which keys exist or existed.
INVALID_KEY = "invalid API key"

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("codestream_tenant", default="")


def current_tenant() -> str:
    """The tenant whose key authenticated the call being handled; "" when authentication is off."""
    return _tenant.get()


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyFileError(ValueError):
    """The keys file cannot be used. Messages name the file and line, never the key."""


def parse_keys(text: str, source: str) -> dict[bytes, str]:
    """`tenant:key` lines -> {sha256(key): tenant}. Blank lines and lines starting with `#` are skipped; the
    key is everything after the first colon (so it may contain colons itself)."""
    keys: dict[bytes, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, key = line.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not tenant or not key:
            raise KeyFileError(f"{source}:{lineno}: expected 'tenant:key'")
        digest = key_digest(key)
        if keys.get(digest, tenant) != tenant:
            # One key, two tenants: which one a call belongs to would be a guess.
            raise KeyFileError(f"{source}:{lineno}: the same key is listed for tenants {keys[digest]!r} and {tenant!r}")
        keys[digest] = tenant
    return keys


@dataclass(frozen=True)
class _FileState:
    """What identifies one version of the keys file. A Kubernetes Secret update swaps a symlink, which
    changes the inode even when size and mtime happen to match."""

    device: int
    inode: int
    size: int
    mtime_ns: int


class ApiKeys:
    """The keys of one file, re-read when the file changes (checked at most once per `check_interval_s`)."""

    def __init__(self, path: str, check_interval_s: float = 1.0) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._entries: tuple[tuple[bytes, str], ...] = ()
        self._state: _FileState | None = None
        self._next_check = 0.0
        self._unreadable = False
        # At start-up a bad or missing file is fatal: better not to start than to start locked or open.
        self._entries, self._state = self._read()
        self._next_check = time.monotonic() + check_interval_s

    @property
    def tenants(self) -> set[str]:
        return {tenant for _, tenant in self._entries}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> str | None:
        """The tenant of `key`, or None. Every stored digest is compared (constant time, no early exit), so
        the time taken says nothing about which digest, or how much of one, matched."""
        self._maybe_reload()
        digest = key_digest(key)
        tenant = None
        for known, owner in self._entries:
            if hmac.compare_digest(known, digest):
                tenant = owner
        return tenant

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval_s
        try:
            state = self._stat()
        except OSError as exc:
            # Keep the last good keys: a file briefly missing (a Secret being re-mounted) must not lock every
            # client out. Revoking a key means removing its line, not the file.
            if not self._unreadable:
                log.error("api_keys_file_unreadable", file=self.path, error=exc.strerror, keeping=len(self._entries))
            self._unreadable, self._state = True, None
            return
        self._unreadable = False
        if state == self._state:
            return
        try:
            entries, state = self._read()
        except (OSError, KeyFileError) as exc:
            log.error("api_keys_file_invalid", file=self.path, error=str(exc), keeping=len(self._entries))
            self._state = _settled(state)  # report a broken version once, not every second
            return
        if set(entries) != set(self._entries):
            log.info("api_keys_reloaded", file=self.path, keys=len(entries), tenants=len({t for _, t in entries}))
        self._entries, self._state = entries, state

    def _stat(self) -> _FileState:
        st = os.stat(self.path)
        return _FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[tuple[tuple[bytes, str], ...], _FileState | None]:
        state = self._stat()
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise KeyFileError(f"{self.path}: not UTF-8 text (byte {exc.start})") from None
        return tuple(parse_keys(text, self.path).items()), _settled(state)


def _settled(state: _FileState) -> _FileState | None:
    """`state`, or None while the file is so fresh that a write in the same timestamp tick as our read could
    change its content without changing its state: None makes the next check read it again."""
    return state if time.time_ns() - state.mtime_ns >= 2_000_000_000 else None


def presented_key(metadata: Sequence[Any] | None) -> str | None:
    """The key a caller sent: `authorization: Bearer <key>`, else `x-api-key: <key>`; None when neither."""
    values: dict[str, str] = {}
    for item in metadata or ():
        name, value = item[0], item[1]
        if isinstance(value, str):
            values.setdefault(name, value)
    scheme, _, token = values.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return values.get("x-api-key", "").strip() or None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires a known API key on every RPC outside OPEN_SERVICES.

    The interceptor cannot end a call itself (it has no ServicerContext), so the check runs first inside
    the handler's own execution: it aborts with UNAUTHENTICATED before the request is parsed (decoding is
    the innermost interceptor), or sets the caller's tenant there, which holds whether or not grpc.aio runs
    interceptor and handler in one context (grpcio 1.85 does; that is not a documented promise). Each
    RPC runs in its own asyncio task, with its own copy of the context: the tenant needs no reset."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys
        self._wrapped = PerMethod(self._checking)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # "/package.Service/Method"
        if handler is None or method.split("/")[1] in OPEN_SERVICES:
            return handler
        return self._wrapped.get(handler, method)

    def _checking(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        keys = self.keys

        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            key = presented_key(context.invocation_metadata())
            tenant = keys.lookup(key) if key is not None else None
            if tenant is None:
                log.info("auth_rejected", method=method, reason="missing" if key is None else "invalid")
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING_KEY if key is None else INVALID_KEY)
            _tenant.set(tenant)
            return request

        wrapped = wrap_handler(handler, before=authenticated)
        if wrapped is None:  # fail closed: a handler we cannot wrap would run unauthenticated
            raise TypeError(f"{method}: only async handlers can be authenticated")
        return wrapped


def load_api_keys(config: GatewayConfig) -> ApiKeys | None:
    """The configured keys, or None (authentication off) when no keys file is set."""
    if not config.api_keys_file:
        log.warning(
            "auth_disabled",
            reason="no --api-keys-file (CODESTREAM_API_KEYS_FILE): every caller is served without a key",
        )
        return None
    try:
        keys = ApiKeys(config.api_keys_file)
    except OSError as exc:
        raise KeyFileError(f"{config.api_keys_file}: cannot read the API keys file: {exc.strerror}") from exc
    if not len(keys):
        log.warning("api_keys_empty", file=config.api_keys_file, consequence="every keyed call is refused")
    log.info("api_keys_loaded", file=config.api_keys_file, keys=len(keys), tenants=len(keys.tenants))
    return keys


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None (plaintext). With a client CA, clients must present a
    certificate it signed (mTLS). The files are read once, here, at start-up."""
    cert, key, client_ca = config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file (mTLS is TLS first)")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert-file and --tls-key-file")
    root = _read_bytes(client_ca) if client_ca else None
    return grpc.ssl_server_credentials(
        [(_read_bytes(key), _read_bytes(cert))],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
