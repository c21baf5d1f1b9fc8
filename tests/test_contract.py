"""The wire contract: generated code is fresh, Redis names are namespaced, settings come from flags and env."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from codestream import settings
from gateway.config import GatewayConfig
from protos import api, bus
from protos.keys import Keys
from worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent


def test_committed_generated_code_matches_the_proto_files():
    result = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"stale generated code; run `make protos`:\n{result.stdout}{result.stderr}"


def test_model_card_request_maps_field_for_field():
    # {"input_data": {"input_string": [...], "parameters": {"return_full_text": false, "do_sample": true}}}
    card = {"return_full_text": False, "do_sample": True, "max_new_tokens": 200, "temperature": 0.6, "top_p": 0.9}
    request = api.GenerateRequest(prompt="Develop a Python function to sort a list of integers in ascending order")
    for name, value in card.items():
        group = next(
            g for g in ("sampling", "stopping", "response") if name in getattr(request, g).DESCRIPTOR.fields_by_name
        )
        setattr(getattr(request, group), name, value)
    assert request.sampling.HasField("do_sample") and request.sampling.do_sample
    assert request.response.return_full_text is False
    assert request.stopping.max_new_tokens == 200


def test_every_key_is_namespaced():
    keys = Keys("ns1")
    names = [
        keys.jobs,
        keys.cancel_channel,
        keys.gateway_channel("g"),
        keys.cancelled("r"),
        keys.request_claim("r"),
        keys.worker("w"),
        keys.worker_pattern,
    ]
    assert all(n.startswith("ns1:") for n in names)
    assert len(set(names)) == len(names)


def test_event_batch_round_trips():
    batch = bus.EventBatch(
        worker_id="w", events=[api.GenerateEvent(request_id="r", seq=3, tokens=api.TokenChunk(text="é"))]
    )
    assert bus.EventBatch.FromString(batch.SerializeToString()) == batch


def test_settings_precedence_flag_then_env_then_default():
    parser = argparse.ArgumentParser()
    settings.add_flags(parser, WorkerConfig)
    env = {"CODESTREAM_REDIS_URL": "redis://env:1/0", "CODESTREAM_MAX_NUM_SEQS": "8", "CODESTREAM_DEVICE": "cpu"}
    config = settings.load(WorkerConfig, parser.parse_args(["--max-num-seqs", "4"]), env)
    assert config.max_num_seqs == 4  # flag beats env
    assert config.redis_url == "redis://env:1/0" and config.device == "cpu"  # env beats default
    assert config.block_size == WorkerConfig().block_size
    with pytest.raises(ValueError, match="CODESTREAM_PORT"):
        settings.load(GatewayConfig, None, {"CODESTREAM_PORT": "not-a-number"})


def test_every_setting_has_help_and_a_flag():
    for cls in (GatewayConfig, WorkerConfig):
        parser = argparse.ArgumentParser()
        settings.add_flags(parser, cls)
        for field in cls.__dataclass_fields__.values():
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help"
            assert settings.flag_name(field.name) in parser.format_help()


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for cls in (GatewayConfig, WorkerConfig):
        for name in cls.__dataclass_fields__:
            assert f"`{settings.env_name(name)}`" in readme or settings.env_name(name) in readme, name
