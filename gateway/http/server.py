"""The gateway's HTTP API (aiohttp, in the gateway's own event loop): the model card's /score and the
OpenAI-compatible /v1 routes, on `--http-port`.

Handlers only convert: the JSON body into the gRPC API's request messages (score.py, openai_compat.py),
resolved by gateway.validation, opened through the same `Generations` as gRPC (admission, queue, workers,
deadlines, repair); the events back into JSON or server-sent events. What gRPC gets from interceptors is
the middleware here: API keys (the same `ApiKeys`, `Authorization: Bearer` or `x-api-key`, the tenant
passed to `Generations`), request counts by route and status, and errors in OpenAI's shape.

A client that disconnects cancels its handler (aiohttp's `handler_cancellation`), which closes the run's
generations: the same `Generation.close()` that cancels a job when a gRPC client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import Counter

from gateway import auth
from gateway.auth import ApiKeys, presented_key
from gateway.config import GatewayConfig
from gateway.generations import Generations, RequestRejected
from gateway.http import openai_compat, score
from gateway.http.errors import CLIENT_CLOSED, HttpError, dumps, invalid, rejected
from gateway.http.pieces import Pieces
from gateway.http.runs import Output, Plan, Run, open_all
from gateway.model_card import ModelCard
from gateway.prompts import UnsupportedByModel
from gateway.servicer import TRACEPARENT
from gateway.validation import InvalidRequest

log = structlog.get_logger("gateway.http")

# As the gRPC port's grpc.max_receive_message_length: a prompt of max_prompt_chars fits, JSON-escaped.
MAX_BODY_BYTES = 16 * 2**20
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OPEN_ROUTES = frozenset({"/health"})  # load balancer probes carry no key
TIMEOUT_HEADER = "X-Request-Timeout"  # the client's deadline in seconds (HTTP has no standard one)
TENANT = web.RequestKey("tenant", str)
# The status a streamed response is counted under: 200 was sent before it could fail or be abandoned.
OUTCOME = web.RequestKey("outcome", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpApi:
    def __init__(
        self, generations: Generations, card: ModelCard, config: GatewayConfig, api_keys: ApiKeys | None
    ) -> None:
        self.generations = generations
        self.card = card
        self.config = config
        self.api_keys = api_keys
        self.pieces = Pieces(card)
        self.created = int(time.time())
        self.serving = True  # /health; false from the start of a drain
        self.refusing = False  # new requests get 503; from the end of the drain's delay, as gRPC's
        self.inflight: set[asyncio.Task] = set()
        self.requests = Counter(
            "codestream_gateway_http_requests", "HTTP requests by route and final status", ["route", "code"],
            registry=generations.metrics.registry,
        )  # fmt: skip
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._middleware])
        self.app.add_routes(
            [
                web.post("/score", self.score),
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat),
                web.get("/v1/models", self.models),
                web.get("/v1/models/{model:.+}", self.model),
                web.get("/health", self.health),
            ]
        )
        # access_log off: the gateway logs each request's life (request_accepted ... request_ended) already.
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = site.port
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Refuse new requests, give those in flight `grace_s` to finish, cancel the rest (their jobs too)."""
        self.serving, self.refusing = False, True
        for site in list(self.runner.sites):
            await site.stop()
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=grace_s)
        for task in list(self.inflight):
            task.cancel()
        await self.runner.cleanup()

    # ------------------------------------------------------------------------------------------ routes

    async def score(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, score.parse(await _json(request), self.card, self.config))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        plan = openai_compat.parse_completion(await _json(request), self.card, self.config, self.pieces)
        return await self._serve(request, plan)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        plan = openai_compat.parse_chat(await _json(request), self.card, self.config, self.pieces)
        return await self._serve(request, plan)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return _json_response(openai_compat.models(self.card, self.created))

    async def model(self, request: web.Request) -> web.StreamResponse:
        openai_compat.check_model(request.match_info["model"], self.card)
        return _json_response(openai_compat.model(self.card, self.created))

    async def health(self, request: web.Request) -> web.StreamResponse:
        return _json_response({"status": "serving" if self.serving else "not_serving"}, 200 if self.serving else 503)

    # ------------------------------------------------------------------------------------ generations

    async def _serve(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        try:
            resolved = [resolve() for resolve in plan.resolvers]
        except UnsupportedByModel as exc:
            raise plan.unsupported(exc) from None
        traceparent = request.headers.get("traceparent", "")
        try:
            generations = await open_all(
                self.generations, resolved, self._timeout_s(request), request[TENANT],
                traceparent if TRACEPARENT.match(traceparent) else "",
            )  # fmt: skip
        except RequestRejected as exc:
            raise rejected(exc) from None
        run = Run(generations, plan.n)
        # Also here, not only in Run.updates(): a handler cancelled (the client left) before that generator's
        # first step never runs its `finally`, and the jobs would run on unheard.
        try:
            if plan.stream:
                return await self._stream(request, run, plan.output)
            choices = await run.collect()
            return _json_response(plan.output.response(run, choices))
        finally:
            run.close()

    def _timeout_s(self, request: web.Request) -> float:
        """The client's deadline, from `X-Request-Timeout` (seconds, as gRPC's deadline; the gateway's
        --request-timeout-s still caps it), else --request-timeout-s."""
        limit = self.config.request_timeout_s
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return limit
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            raise HttpError(400, f"{TIMEOUT_HEADER}: a number of seconds > 0, got {raw[:40]!r}", param=TIMEOUT_HEADER)
        return min(timeout, limit)

    async def _stream(self, request: web.Request, run: Run, output: Output) -> web.StreamResponse:
        """Server-sent events: `data: {chunk}` per update, then `data: [DONE]`. An error after the 200 went out
        is an event in OpenAI's error shape (which its clients raise), before the [DONE]."""
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            async with contextlib.aclosing(run.updates()) as updates:
                for chunk in output.start(run):
                    await _event(response, chunk)
                async for update in updates:
                    for chunk in output.update(run, update):
                        await _event(response, chunk)
            for chunk in output.end(run):
                await _event(response, chunk)
        except HttpError as exc:
            request[OUTCOME] = exc.status
            await _event(response, exc.body())
        except ConnectionResetError:  # the client left between two writes; the run is closed already
            request[OUTCOME] = CLIENT_CLOSED
            return response
        except Exception:  # e.g. Redis failing during a gap repair: the 200 is out, so the error goes in the stream
            log.exception("http_stream_failed", route=request.path)
            request[OUTCOME] = 500
            await _event(response, HttpError(500, "internal error").body())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ------------------------------------------------------------------------------------- middleware

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"  # bounded label values
        status = 500
        task = asyncio.current_task()
        if task is not None:
            self.inflight.add(task)
        try:
            if self.refusing and route not in OPEN_ROUTES:
                raise HttpError(503, "the gateway is shutting down: retry (another gateway will take it)")
            if route not in OPEN_ROUTES:
                request[TENANT] = self._authenticate(request, route)
            response = await handler(request)
            status = request.get(OUTCOME, response.status)
            return response
        except HttpError as exc:
            status = exc.status
            return exc.response()
        except InvalidRequest as exc:
            status = 400
            return invalid(exc).response()
        except web.HTTPException as exc:  # aiohttp's own: no such route (404), method (405), body too large (413)
            status = exc.status
            return HttpError(exc.status, exc.text or exc.reason).response()
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            raise
        except Exception:
            log.exception("http_handler_failed", route=route)
            return HttpError(500, "internal error").response()
        finally:
            self.requests.labels(route, str(status)).inc()
            if task is not None:
                self.inflight.discard(task)

    def _authenticate(self, request: web.Request, route: str) -> str:
        """The caller's tenant ("" with authentication off), as the gRPC interceptor decides it."""
        if self.api_keys is None:
            return ""
        # presented_key reads gRPC metadata, whose names are lower case; HTTP's are case-insensitive.
        key = presented_key([(name.lower(), value) for name, value in request.headers.items()])
        tenant = self.api_keys.lookup(key) if key is not None else None
        if tenant is None:
            reason = "missing" if key is None else "invalid"
            log.info("auth_rejected", route=route, reason=reason)
            message = auth.MISSING_KEY if key is None else auth.INVALID_KEY
            raise HttpError(401, message, code=f"{reason}_api_key", headers={"WWW-Authenticate": "Bearer"})
        return tenant


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None


def _json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=dumps(value), content_type="application/json")


async def _event(response: web.StreamResponse, value: Any) -> None:
    await response.write(f"data: {dumps(value)}\n\n".encode())


def ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The gRPC port's TLS (and mTLS) on the HTTP port too: one certificate, one policy for the gateway."""
    if not config.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    if config.tls_client_ca_file:
        context.load_verify_locations(cafile=config.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
