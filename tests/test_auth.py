"""Authentication: API keys on the gRPC port, TLS and mTLS, and Redis AUTH / ACL users / TLS in the Redis URL.

Real gRPC servers on localhost, real Redis servers (the shared one, and ones started here with a password
or TLS), certificates from trustme."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import structlog
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from codestream import cli
from codestream.client import seqs
from codestream.redis_server import free_port, server_binary
from gateway import auth
from gateway.auth import ApiKeys, KeyFileError, current_tenant, parse_keys, server_credentials
from gateway.config import GatewayConfig
from gateway.server import start_gateway
from gateway.servicer import CodeStreamServicer
from protos import api, api_grpc
from tests.conftest import running_stack

KEY_A = "ka-7f3c9e2b1d4a6058"
KEY_B = "kb-0e9d8c7b6a5f4e3d"
KEY_A2 = "ka2-5a4b3c2d1e0f9a8b"


def write_keys(path: Path, text: str) -> None:
    """Replace the file the way a Kubernetes Secret update does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    write_keys(path, f"# tenant:key\nalpha:{KEY_A}\n\nbeta:{KEY_B}\n")
    return path


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The server's certificate and key, the CA, and a client certificate signed by the same CA."""
    folder = tmp_path_factory.mktemp("tls")
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files |= {"client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(files["cert"]), append=True)
    server.private_key_pem.write_to_path(str(files["key"]))
    client = ca.issue_cert("client@codestream.test")
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return {name: str(path) for name, path in files.items()}


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def small_request(prompt: str = "def add(a, b):", n: int = 6) -> api.GenerateRequest:
    return api.GenerateRequest(prompt=prompt, stopping=api.StoppingCriteria(max_new_tokens=n, ignore_eos=True))


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def stream_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


# --- the keys file ---------------------------------------------------------------------------------------


def test_keys_file_format():
    keys = parse_keys("# comment\n\n  alpha : k1  \nbeta:with:colons\nalpha:k2\n", "keys")
    assert sorted(keys.values()) == ["alpha", "alpha", "beta"]
    assert keys[auth.key_digest("k1")] == "alpha" and keys[auth.key_digest("with:colons")] == "beta"
    with pytest.raises(KeyFileError, match=r"keys:2: expected 'tenant:key'") as bad:
        parse_keys("alpha:k1\nsecret-without-tenant\n", "keys")
    assert "secret-without-tenant" not in str(bad.value), "an error must not echo what may be a key"
    with pytest.raises(KeyFileError, match="same key is listed for tenants 'alpha' and 'beta'"):
        parse_keys("alpha:k1\nbeta:k1\n", "keys")
    for metadata, expected in [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("x-api-key", "xyz"),), "xyz"),
        ((("x-api-key", "xyz"), ("authorization", "Bearer abc")), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer "),), None),
        ((), None),
    ]:
        assert auth.presented_key(metadata) == expected, metadata


def test_only_digests_are_kept(keys_file: Path):
    keys = ApiKeys(str(keys_file))
    assert keys.lookup(KEY_A) == "alpha" and keys.lookup(KEY_B) == "beta" and keys.lookup("nope") is None
    assert keys.tenants == {"alpha", "beta"}
    held = repr(vars(keys))
    assert KEY_A not in held and KEY_B not in held
    assert all(len(digest) == 32 for digest, _ in keys._entries)


def test_bad_key_or_tls_settings_fail_at_start_up(tmp_path: Path, tls_files: dict[str, str]):
    with pytest.raises(KeyFileError, match="cannot read the API keys file"):
        auth.load_api_keys(replace(GatewayConfig(), api_keys_file=str(tmp_path / "absent")))
    (tmp_path / "bad").write_text("no colon here\n")
    with pytest.raises(KeyFileError, match="bad:1"):
        auth.load_api_keys(replace(GatewayConfig(), api_keys_file=str(tmp_path / "bad")))
    (tmp_path / "binary").write_bytes(b"alpha:\xff\xfe\n")
    with pytest.raises(KeyFileError, match="not UTF-8"):
        auth.load_api_keys(replace(GatewayConfig(), api_keys_file=str(tmp_path / "binary")))
    with pytest.raises(ValueError, match="both --tls-cert-file and --tls-key-file"):
        server_credentials(replace(GatewayConfig(), tls_cert_file=tls_files["cert"]))
    with pytest.raises(ValueError, match="mTLS is TLS first"):
        server_credentials(replace(GatewayConfig(), tls_client_ca_file=tls_files["ca"]))
    assert server_credentials(GatewayConfig()) is None


# --- API keys over gRPC ----------------------------------------------------------------------------------


async def test_keys_are_required_except_for_health_and_reflection(
    redis_url: str, demo_model_dir: Path, keys_file: Path
):
    async with running_stack(redis_url, demo_model_dir, gateway={"api_keys_file": str(keys_file)}) as stack:
        stub = stack.stub
        info = api.GetModelInfoRequest()

        missing = await rpc_error(stub.GetModelInfo(info))
        assert (missing.code(), missing.details()) == (grpc.StatusCode.UNAUTHENTICATED, "missing API key")
        missing = await stream_error(stub.GenerateStream(small_request()))
        assert (missing.code(), missing.details()) == (grpc.StatusCode.UNAUTHENTICATED, "missing API key")
        not_bearer = await rpc_error(stub.GetModelInfo(info, metadata=(("authorization", f"Basic {KEY_A}"),)))
        assert not_bearer.details() == "missing API key"

        wrong = await rpc_error(stub.GetModelInfo(info, metadata=bearer("not-a-key")))
        assert (wrong.code(), wrong.details()) == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        wrong = await stream_error(stub.GenerateStream(small_request(), metadata=(("x-api-key", KEY_A + "x"),)))
        assert (wrong.code(), wrong.details()) == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        cancel = await rpc_error(stub.Cancel(api.CancelRequest(request_id="someone-elses")))
        assert cancel.code() == grpc.StatusCode.UNAUTHENTICATED

        assert (await stub.GetModelInfo(info, metadata=bearer(KEY_A))).max_model_len > 0
        assert (await stub.GetModelInfo(info, metadata=(("x-api-key", KEY_B),))).max_model_len > 0
        events = [event async for event in stub.GenerateStream(small_request(), metadata=bearer(KEY_B), timeout=60)]
        assert events[-1].HasField("finished") and events[-1].finished.generated_tokens == 6

        # Kubernetes probes and grpcurl's discovery carry no key.
        health = health_pb2_grpc.HealthStub(stack.channel)
        for service in ("", "codestream.v1.CodeStream"):
            assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        reflection = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
        names = [
            service.name
            async for reply in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            for service in reply.list_services_response.service
        ]
        assert "codestream.v1.CodeStream" in names


async def test_a_revoked_key_stops_working_without_a_restart(redis_url: str, demo_model_dir: Path, keys_file: Path):
    gateway = {"api_keys_file": str(keys_file)}
    async with running_stack(redis_url, demo_model_dir, gateway=gateway, start_worker=False) as stack:
        info = api.GetModelInfoRequest()
        await stack.stub.GetModelInfo(info, metadata=bearer(KEY_A))
        write_keys(keys_file, f"alpha:{KEY_A2}\nbeta:{KEY_B}\n")  # alpha's key rotated: the old one revoked
        await asyncio.sleep(1.1)  # the file is checked at most once a second
        revoked = await rpc_error(stack.stub.GetModelInfo(info, metadata=bearer(KEY_A)))
        assert (revoked.code(), revoked.details()) == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        await stack.stub.GetModelInfo(info, metadata=bearer(KEY_A2))
        await stack.stub.GetModelInfo(info, metadata=bearer(KEY_B))
        assert stack.gateway.api_keys is not None and stack.gateway.api_keys.tenants == {"alpha", "beta"}

        # A broken file keeps the last good keys (and says so in the log) rather than locking everyone out.
        write_keys(keys_file, "broken line\n")
        await asyncio.sleep(1.1)
        await stack.stub.GetModelInfo(info, metadata=bearer(KEY_A2))


async def test_handlers_see_the_callers_tenant(
    redis_url: str, demo_model_dir: Path, keys_file: Path, monkeypatch: pytest.MonkeyPatch
):
    seen: list[tuple[str, str, str]] = []
    generate_stream, get_model_info = CodeStreamServicer.GenerateStream, CodeStreamServicer.GetModelInfo

    async def spy_stream(self, request, context) -> AsyncIterator[api.GenerateEvent]:
        seen.append((request.prompt, "start", current_tenant()))
        async for event in generate_stream(self, request, context):
            yield event
        # Still the caller's after every await of a stream interleaved with another tenant's.
        seen.append((request.prompt, "end", current_tenant()))

    async def spy_info(self, request, context) -> api.ModelInfo:
        seen.append(("", "info", current_tenant()))
        return await get_model_info(self, request, context)

    # Patched before the gateway starts: the server binds the servicer's methods when it is registered.
    monkeypatch.setattr(CodeStreamServicer, "GenerateStream", spy_stream)
    monkeypatch.setattr(CodeStreamServicer, "GetModelInfo", spy_info)
    async with running_stack(redis_url, demo_model_dir, gateway={"api_keys_file": str(keys_file)}) as stack:

        async def run(prompt: str, key: str) -> None:
            async for _ in stack.stub.GenerateStream(small_request(prompt, 12), metadata=bearer(key), timeout=60):
                pass

        await asyncio.gather(run("# alpha\n", KEY_A), run("# beta\n", KEY_B), run("# alpha again\n", KEY_A))
        await stack.stub.GetModelInfo(api.GetModelInfoRequest(), metadata=(("x-api-key", KEY_B),))
    assert sorted(seen) == sorted(
        [
            (p, moment, tenant)
            for p, tenant in [("# alpha\n", "alpha"), ("# beta\n", "beta"), ("# alpha again\n", "alpha")]
            for moment in ("start", "end")
        ]
        + [("", "info", "beta")]
    )
    assert current_tenant() == ""


async def test_without_a_keys_file_auth_is_off_and_says_so(redis_url: str, demo_model_dir: Path):
    with structlog.testing.capture_logs() as logs:
        async with running_stack(redis_url, demo_model_dir, start_worker=False) as stack:
            assert (await stack.stub.GetModelInfo(api.GetModelInfoRequest())).max_model_len > 0
            assert stack.gateway.api_keys is None
    assert [entry["event"] for entry in logs].count("auth_disabled") == 1


# --- TLS and mTLS on the gRPC port ------------------------------------------------------------------------


def secure_channel(port: int, tls_files: dict[str, str], *, client_cert: bool = False, ca_file: str = ""):
    read = lambda name: Path(tls_files[name]).read_bytes()  # noqa: E731
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else read("ca"),
        private_key=read("client_key") if client_cert else None,
        certificate_chain=read("client_cert") if client_cert else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def test_tls_with_api_key_and_the_cli_client(
    redis_url: str,
    demo_model_dir: Path,
    keys_file: Path,
    tls_files: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    gateway = {"api_keys_file": str(keys_file), "tls_cert_file": tls_files["cert"], "tls_key_file": tls_files["key"]}
    async with running_stack(redis_url, demo_model_dir, gateway=gateway) as stack:
        port = stack.gateway.port
        async with secure_channel(port, tls_files) as channel:
            stub = api_grpc.CodeStreamStub(channel)
            assert (await stub.GetModelInfo(api.GetModelInfoRequest(), metadata=bearer(KEY_A))).max_model_len > 0
            missing = await rpc_error(stub.GetModelInfo(api.GetModelInfoRequest()))
            assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
        # Plaintext to a TLS port, and TLS that does not trust the server's CA, both fail.
        plain = await rpc_error(stack.stub.GetModelInfo(api.GetModelInfoRequest(), metadata=bearer(KEY_A), timeout=5))
        assert plain.code() == grpc.StatusCode.UNAVAILABLE
        other_ca = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        async with secure_channel(port, tls_files, ca_file=str(other_ca)) as channel:
            untrusted = await rpc_error(
                api_grpc.CodeStreamStub(channel).GetModelInfo(api.GetModelInfoRequest(), timeout=5)
            )
            assert untrusted.code() == grpc.StatusCode.UNAVAILABLE

        # `codestream generate` over TLS, the key from the environment. It is a blocking client: off the loop.
        monkeypatch.setenv("CODESTREAM_API_KEY", KEY_B)
        argv = ["generate", "def add(a, b):", "--target", f"localhost:{port}", "--tls-ca-file", tls_files["ca"]]
        argv += ["--max-new-tokens", "5", "--ignore-eos", "--json", "--timeout", "60"]
        assert await asyncio.to_thread(cli.main, argv) == 0
        assert '"finished"' in capsys.readouterr().out
        monkeypatch.setenv("CODESTREAM_API_KEY", "wrong")
        assert await asyncio.to_thread(cli.main, argv) == 1
        assert "UNAUTHENTICATED: invalid API key" in capsys.readouterr().err


async def test_mtls_requires_a_client_certificate_from_the_ca(
    redis_url: str, demo_model_dir: Path, tls_files: dict[str, str], tmp_path: Path
):
    stranger = trustme.CA().issue_cert("client@elsewhere.test")
    stranger_cert, stranger_key = tmp_path / "stranger.pem", tmp_path / "stranger.key"
    stranger.cert_chain_pems[0].write_to_path(str(stranger_cert))
    stranger.private_key_pem.write_to_path(str(stranger_key))
    gateway = {
        "tls_cert_file": tls_files["cert"],
        "tls_key_file": tls_files["key"],
        "tls_client_ca_file": tls_files["ca"],
    }
    async with running_stack(redis_url, demo_model_dir, gateway=gateway, start_worker=False) as stack:
        port = stack.gateway.port
        no_cert = secure_channel(port, tls_files)
        foreign_cert = secure_channel(
            port, {**tls_files, "client_cert": str(stranger_cert), "client_key": str(stranger_key)}, client_cert=True
        )
        for channel in (no_cert, foreign_cert):
            async with channel:
                refused = await rpc_error(
                    api_grpc.CodeStreamStub(channel).GetModelInfo(api.GetModelInfoRequest(), timeout=5)
                )
                assert refused.code() == grpc.StatusCode.UNAVAILABLE
        async with secure_channel(port, tls_files, client_cert=True) as channel:
            assert (await api_grpc.CodeStreamStub(channel).GetModelInfo(api.GetModelInfoRequest())).max_model_len > 0


# --- Redis AUTH, ACL users and TLS, all in the URL ---------------------------------------------------------


@contextlib.contextmanager
def redis_server(*args: str, tls: list[str] | None = None) -> Iterator[int]:
    """A Redis server on a free port with extra arguments (a password, ACL users), on TLS only when `tls`
    (its TLS arguments) is given; yields its port."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="codestream-redis-") as folder:
        command = [server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder]
        command += ["--port", "0", "--tls-port", str(port), *tls] if tls else ["--port", str(port)]
        process = subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                if process.poll() is not None:
                    error = process.stderr.read().decode(errors="replace") if process.stderr else ""
                    pytest.skip(f"{Path(server_binary()).name} would not start with {args} {tls}: {error[-300:]}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                assert time.monotonic() < deadline, "redis server did not start"
                time.sleep(0.02)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=10)
            if process.stderr:
                process.stderr.close()


async def stream_one(stub: api_grpc.CodeStreamStub) -> api.Finished:
    events = [event async for event in stub.GenerateStream(small_request(), timeout=60)]
    return events[-1].finished


async def test_redis_with_a_password(demo_model_dir: Path):
    with redis_server("--requirepass", "s3cret") as port:
        async with running_stack(f"redis://:s3cret@127.0.0.1:{port}/0", demo_model_dir) as stack:
            assert (await stream_one(stack.stub)).generated_tokens == 6
        for url in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong@127.0.0.1:{port}/0"):
            config = replace(GatewayConfig(), redis_url=url, host="127.0.0.1", port=0, model=str(demo_model_dir))
            with pytest.raises(RuntimeError, match="refused this gateway's credentials") as refused:
                await asyncio.wait_for(start_gateway(config, str(demo_model_dir)), timeout=10)
            assert "wrong" not in str(refused.value), "the password must not reach the message"


async def test_redis_acl_user_over_tls(demo_model_dir: Path, tls_files: dict[str, str]):
    tls = ["--tls-cert-file", tls_files["cert"], "--tls-key-file", tls_files["key"]]
    tls += ["--tls-ca-cert-file", tls_files["ca"], "--tls-auth-clients", "no"]
    # An ACL user, and the default user off: only codestream:p4ss gets in.
    acl = ["--user", "default", "off", "--user", "codestream", "on", ">p4ss", "~*", "&*", "+@all"]
    with redis_server(*acl, tls=tls) as port:
        url = f"rediss://codestream:p4ss@127.0.0.1:{port}/0?ssl_ca_certs={tls_files['ca']}"
        async with running_stack(url, demo_model_dir) as stack:
            assert (await stream_one(stack.stub)).generated_tokens == 6


async def test_a_stream_never_crosses_tenants(redis_url: str, demo_model_dir: Path, keys_file: Path):
    """Two tenants may use the same request id at once; neither can cancel nor resume the other's request."""
    gateway = {"api_keys_file": str(keys_file)}
    async with running_stack(redis_url, demo_model_dir, gateway=gateway) as stack:
        long = api.GenerateRequest(
            prompt="def alpha():", request_id="same-id",
            stopping=api.StoppingCriteria(max_new_tokens=400, ignore_eos=True),
        )  # fmt: skip
        alpha = stack.stub.GenerateStream(long, metadata=bearer(KEY_A))
        first = await alpha.read()
        assert first.request_id == "same-id"
        # beta uses the same id for its own request: no ALREADY_EXISTS, and it is beta's.
        short = api.GenerateRequest(
            prompt="def beta():", request_id="same-id", stopping=api.StoppingCriteria(max_new_tokens=3)
        )
        beta_events = [e async for e in stack.stub.GenerateStream(short, metadata=bearer(KEY_B))]
        assert beta_events[-1].finished.generated_tokens == 3 and {e.request_id for e in beta_events} == {"same-id"}
        # beta's Cancel and Resume of "same-id" reach only beta's own (finished) request, never alpha's.
        await stack.stub.Cancel(api.CancelRequest(request_id="same-id"), metadata=bearer(KEY_B))
        resumed = [e async for e in stack.stub.Resume(api.ResumeRequest(request_id="same-id"), metadata=bearer(KEY_B))]
        assert resumed[-1].finished.generated_tokens == 3  # beta's own log
        events = [first]
        while (event := await alpha.read()) is not grpc.aio.EOF:
            events.append(event)
        assert events[-1].finished.stop_reason == api.STOP_REASON_LENGTH
        assert events[-1].finished.generated_tokens == 400
        # A server-assigned id of alpha's is unknown to beta, and alpha's to resume.
        done = [e async for e in stack.stub.GenerateStream(short_of(short), metadata=bearer(KEY_A))]
        assigned = done[0].request_id
        err = await stream_error(stack.stub.Resume(api.ResumeRequest(request_id=assigned), metadata=bearer(KEY_B)))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        again = [e async for e in stack.stub.Resume(api.ResumeRequest(request_id=assigned), metadata=bearer(KEY_A))]
        assert seqs(again) == seqs(done[1:])


def short_of(request: api.GenerateRequest) -> api.GenerateRequest:
    """The same request without a client id: the server assigns one."""
    copy = api.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = ""
    return copy
