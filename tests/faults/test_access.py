"""Authentication with real processes (case 11): two gateways share a keys file (`tenant:key` lines, as a
Kubernetes Secret mounts it); every codestream.v1 RPC without a key, with a wrong key, or with a key revoked
by rewriting the file is refused with UNAUTHENTICATED and never reaches a worker; two tenants streaming at once
under the same request ids, through both gateways, each get only their own tokens, and neither can resume or
cancel the other's request."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import api, api_grpc
from tests.faults.conftest import (
    PROMPTS,
    Cluster,
    Reference,
    Stream,
    assert_exactly_once,
    consume,
    covered_seqs,
    generate_request,
    open_stream,
    wait_for,
)

KEY_A, KEY_A2, KEY_B = (f"k{secrets.token_hex(16)}" for _ in range(3))
N_JOBS, MAX_NEW, LONG = 4, 60, 300


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def write_keys(path: Path, text: str) -> None:
    """Replace the file as a Secret update does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """A unary call's status, or a streaming call's once its first event (or error) is in (then cancelled)."""
    try:
        if hasattr(call, "read"):
            await call.read()
            call.cancel()
        else:
            await call
        return grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""


def every_rpc(stub: api_grpc.CodeStreamStub, metadata: Any) -> dict[str, Any]:
    """One call of each codestream.v1 RPC (valid requests), with the given metadata."""
    small = generate_request(PROMPTS[0], 4)
    return {
        "GenerateStream": stub.GenerateStream(small, metadata=metadata, timeout=10),
        "Generate": stub.Generate(small, metadata=metadata, timeout=10),
        "Infill": stub.Infill(api.InfillRequest(prefix="def f(", suffix="):\n"), metadata=metadata, timeout=10),
        "Chat": stub.Chat(
            api.ChatRequest(messages=[api.ChatMessage(role="user", content="hi")]), metadata=metadata, timeout=10
        ),
        "Tokenize": stub.Tokenize(api.TokenizeRequest(text="x = 1"), metadata=metadata, timeout=10),
        "GetModelInfo": stub.GetModelInfo(api.GetModelInfoRequest(), metadata=metadata, timeout=10),
        "Cancel": stub.Cancel(api.CancelRequest(request_id="job-0"), metadata=metadata, timeout=10),
        "Resume": stub.Resume(api.ResumeRequest(request_id="job-0"), metadata=metadata, timeout=10),
    }


async def test_missing_wrong_and_revoked_keys_are_refused_and_streams_never_cross_tenants(
    cluster: Cluster, reference: Reference, figure: Callable[..., None]
) -> None:
    keys_file = cluster.tmp_path / "api-keys"
    write_keys(keys_file, f"# tenant:key\nalpha:{KEY_A}\nbeta:{KEY_B}\n")
    worker = cluster.start_worker("worker")
    gateways = [cluster.start_gateway(f"gateway-{i}", api_keys_file=str(keys_file)) for i in (1, 2)]
    await cluster.ready(worker, *gateways)  # health stays open: probes carry no key
    stubs = [cluster.stub(g) for g in gateways]

    # -- missing and wrong keys, every RPC, both gateways ------------------------------------------------------
    refusals = {
        "no metadata": (None, "missing API key"),
        "empty bearer": ((("authorization", "Bearer "),), "missing API key"),
        "basic scheme": ((("authorization", f"Basic {KEY_A}"),), "missing API key"),
        "unknown key": (bearer("k" + secrets.token_hex(16)), "invalid API key"),
        "key prefix": (bearer(KEY_A[:-1]), "invalid API key"),
        "key + 1 char": ((("x-api-key", KEY_B + "0"),), "invalid API key"),
        "other case": (bearer(KEY_A.upper()), "invalid API key"),
    }
    wrong = []
    refused = 0
    for stub in stubs:
        for case, (metadata, message) in refusals.items():
            calls = every_rpc(stub, metadata)
            for rpc, status in zip(calls, await asyncio.gather(*map(status_of, calls.values())), strict=True):
                refused += 1
                if status != (grpc.StatusCode.UNAUTHENTICATED, message):
                    wrong.append(f"{case} {rpc}: {status[0].name} {status[1]!r}")
    assert not wrong, "\n".join(wrong)

    # -- two tenants, the same request ids, both gateways ------------------------------------------------------
    alpha_prompts, beta_prompts = PROMPTS[:N_JOBS], PROMPTS[N_JOBS : 2 * N_JOBS]
    alpha = [
        open_stream(stubs[i % 2], generate_request(p, MAX_NEW, f"job-{i}"), 60, bearer(KEY_A))
        for i, p in enumerate(alpha_prompts)
    ]
    beta = [
        open_stream(stubs[(i + 1) % 2], generate_request(p, MAX_NEW, f"job-{i}"), 60, bearer(KEY_B))
        for i, p in enumerate(beta_prompts)
    ]
    long_prompt = PROMPTS[2 * N_JOBS]
    only, only_task, _ = open_stream(stubs[0], generate_request(long_prompt, LONG, "alpha-only"), 60, bearer(KEY_A))
    await wait_for(lambda: len(only.chunks) >= 5, what="alpha's long stream under way")

    # beta, through the other gateway: alpha's id is unknown to it, and its Cancel reaches only its own space.
    code, _ = await status_of(stubs[1].Resume(api.ResumeRequest(request_id="alpha-only"), metadata=bearer(KEY_B)))
    assert code == grpc.StatusCode.NOT_FOUND, code
    await stubs[1].Cancel(api.CancelRequest(request_id="alpha-only"), metadata=bearer(KEY_B))
    await asyncio.gather(*(task for _, task, _ in alpha + beta))
    # beta's Resume of "job-0" replays beta's job-0, not alpha's.
    replay = await consume(
        stubs[0].Resume(api.ResumeRequest(request_id="job-0"), metadata=bearer(KEY_B), timeout=30), Stream()
    )

    # -- revoke alpha's key (rotated to a new one) while its long stream runs ---------------------------------
    revoked_at = time.monotonic()
    write_keys(keys_file, f"# tenant:key\nalpha:{KEY_A2}\nbeta:{KEY_B}\n")
    took_effect = []
    for stub in stubs:
        while (await status_of(stub.GetModelInfo(api.GetModelInfoRequest(), metadata=bearer(KEY_A))))[0] == (
            grpc.StatusCode.OK
        ):
            assert time.monotonic() - revoked_at < 5, "the revoked key still works 5 s after the file changed"
            await asyncio.sleep(0.05)
        took_effect.append(time.monotonic() - revoked_at)
    streaming_at_revocation = only.code is None
    half = only.chunks[len(only.chunks) // 2].seq
    old_key, only_id = bearer(KEY_A), "alpha-only"
    statuses = {
        "revoked GenerateStream": await status_of(stubs[1].GenerateStream(generate_request("x", 4), metadata=old_key)),
        "revoked Resume": await status_of(stubs[1].Resume(api.ResumeRequest(request_id=only_id), metadata=old_key)),
        "revoked Cancel": await status_of(stubs[0].Cancel(api.CancelRequest(request_id=only_id), metadata=old_key)),
    }  # fmt: skip
    for name, status in statuses.items():
        assert status == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key"), (name, status)
    await only_task
    # The new key is the same tenant: it resumes alpha's stream (through the other gateway); beta's key still works.
    rest = await consume(
        stubs[1].Resume(
            api.ResumeRequest(request_id="alpha-only", after_seq=half), metadata=bearer(KEY_A2), timeout=30
        ),
        Stream(),
    )
    assert (await status_of(stubs[0].GetModelInfo(api.GetModelInfoRequest(), metadata=bearer(KEY_B))))[0] == (
        grpc.StatusCode.OK
    )

    # -- every stream is its own tenant's --------------------------------------------------------------------
    for tenant, calls, prompts in (("alpha", alpha, alpha_prompts), ("beta", beta, beta_prompts)):
        for i, ((stream, _, _), want) in enumerate(zip(calls, reference.tokens(prompts, MAX_NEW), strict=True)):
            assert stream.code == grpc.StatusCode.OK, (tenant, i, stream.code, stream.details)
            assert {e.request_id for e in stream.events} == {f"job-{i}"}
            assert_exactly_once(stream.events, want, f"{tenant} job-{i}")
    assert replay.code == grpc.StatusCode.OK, (replay.code, replay.details)
    assert_exactly_once(
        [beta[0][0].events[0], *replay.events], reference.tokens(beta_prompts[:1], MAX_NEW)[0], "replay"
    )
    long_want = reference.tokens([long_prompt], LONG)[0]
    assert only.code == grpc.StatusCode.OK, (only.code, only.details)  # neither beta's Cancel nor the revocation
    assert_exactly_once(only.events, long_want, "alpha-only")
    assert only.events[-1].finished.stop_reason == api.STOP_REASON_LENGTH
    assert rest.code == grpc.StatusCode.OK and covered_seqs(rest.events[0]).start == half + 1
    kept = [e for e in only.events if e.seq <= half]
    assert_exactly_once(kept + rest.events, long_want, "alpha-only resumed with the new key")
    # Refused calls never reached a worker: it took exactly the authenticated jobs.
    worker.send(signal.SIGTERM)
    await worker.wait_event("worker_stopped", 15)
    assert worker.counts()["taken"] == 2 * N_JOBS + 1, worker.counts()
    rejected_logged = sum(len(g.events("auth_rejected")) for g in gateways)
    assert rejected_logged == refused + len(took_effect) + len(statuses)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateways[0].port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    figure("refused_calls", refused, f"({len(refusals)} kinds of missing/wrong key x 8 RPCs x 2 gateways)")
    figure("revocation_effective_after", max(took_effect), "s")
    figure("revoked_key_calls_refused", len(statuses) + len(took_effect))
    figure("stream_in_flight_at_revocation_completed", int(streaming_at_revocation and only.code == grpc.StatusCode.OK))
    figure("tenant_streams_with_shared_ids", 2 * N_JOBS)
    figure("cross_tenant_tokens", 0)
    figure("jobs_taken_by_worker", worker.counts()["taken"])
