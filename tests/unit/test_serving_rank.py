"""The served max LoRA rank is checked against the adapter's rank before a run (vLLM 0.32 reports it in its
dev-mode `/server_info`), instead of being discovered when the candidate is refused at evaluation."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from cl_core.errors import ConfigError, InvalidInputError
from cl_core.serving.client import LoRARankTooLarge, ServingError, VLLMServer, check_lora_rank


def server_info(lora: Any, status: int = 200) -> httpx.MockTransport:
    """A vLLM server whose `/server_info?config_format=json` holds `lora` as `vllm_config.lora_config`."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path != "/server_info":
            return httpx.Response(404, json={"detail": "Not Found"})
        if request.url.params.get("config_format") != "json":
            return httpx.Response(200, json={"vllm_config": "text form, unparsed"})
        if status != 200:
            return httpx.Response(status, json={"detail": "boom"})
        # the shape vLLM 0.32 answers: PydanticVllmConfig.dump_python(vllm_config, mode="json") plus envs
        body = {"vllm_config": {"model_config": {"max_model_len": 256}, "lora_config": lora},
                "vllm_env": {"VLLM_SERVER_DEV_MODE": True}, "system_env": {}}
        return httpx.Response(200, content=json.dumps(body))

    transport = httpx.MockTransport(handle)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


def lora(rank: int) -> dict[str, Any]:
    return {"max_lora_rank": rank, "max_loras": 4, "max_cpu_loras": 4, "fully_sharded_loras": False}


def test_the_servers_max_lora_rank_is_read_from_server_info() -> None:
    transport = server_info(lora(16))
    assert VLLMServer("http://vllm:8000", transport=transport).max_lora_rank() == 16
    assert [str(r.url) for r in transport.seen] == ["http://vllm:8000/server_info?config_format=json"]


@pytest.mark.parametrize("transport", [
    server_info(lora(16), status=404),           # no VLLM_SERVER_DEV_MODE=1: the endpoint does not exist
    server_info(lora(16), status=500),           # a server-side hiccup must not fail the run it checks
    server_info({"max_loras": 4}),               # a vLLM that names the field differently
    server_info({"max_lora_rank": "16"}),
])
def test_an_unknown_limit_is_none(transport: httpx.MockTransport) -> None:
    assert VLLMServer("http://vllm:8000", transport=transport).max_lora_rank() is None


def test_a_server_with_lora_off_is_named_with_the_fix() -> None:
    with pytest.raises(ServingError, match="runs with LoRA off.*--enable-lora"):
        VLLMServer("http://vllm:8000", transport=server_info(None)).max_lora_rank()


@pytest.mark.parametrize("rank", [1, 8, 16])
def test_a_rank_within_the_limit_passes(rank: int) -> None:
    assert check_lora_rank(["http://vllm:8000"], rank, transport=server_info(lora(16))) == {"http://vllm:8000": 16}


def test_a_rank_over_the_limit_fails_naming_server_limit_rank_and_fix() -> None:
    with pytest.raises(LoRARankTooLarge) as info:
        check_lora_rank(["http://vllm:8000/v1"], 32, how="lora_rank 8 x 4 rank block(s)",
                        transport=server_info(lora(16)))
    error = info.value
    assert isinstance(error, ConfigError) and (error.server, error.limit, error.rank) == ("http://vllm:8000", 16, 32)
    message = str(error)
    for part in ("http://vllm:8000", "up to rank 16", "rank 32 (lora_rank 8 x 4 rank block(s))",
                 "training.lora_rank", "--max-lora-rank ≥ 32"):
        assert part in message, part


def test_an_unknown_limit_lets_the_run_go_on(caplog: pytest.LogCaptureFixture) -> None:
    limits = check_lora_rank(["http://a:8000", "http://b:8000"], 64, transport=server_info(lora(16), status=404))
    assert limits == {"http://a:8000": None, "http://b:8000": None}
    assert "does not report its max LoRA rank" in caplog.text


def test_every_replica_is_checked() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        rank = 16 if request.url.host == "a" else 8
        return httpx.Response(200, json={"vllm_config": {"lora_config": lora(rank)}})

    with pytest.raises(LoRARankTooLarge, match="http://b:8000 serves LoRA adapters up to rank 8"):
        check_lora_rank(["http://a:8000", "http://b:8000"], 16, transport=httpx.MockTransport(handle))


@pytest.mark.parametrize(("urls", "rank"), [(["http://a:8000"], 0), (["http://a:8000"], True),
                                            (["http://a:8000"], 8.0), ([], 8), ("http://a:8000", 8)])
def test_bad_arguments_are_refused(urls: Any, rank: Any) -> None:
    with pytest.raises(InvalidInputError):
        check_lora_rank(urls, rank, transport=server_info(lora(16)))


def test_the_train_task_checks_the_rank_before_it_touches_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """A too-large rank fails the train task first: no registry download, no anchor answers, no training."""
    from cl_core.pipeline.config import PipelineConfig
    from tasks import clients
    from tasks.train import train_candidate

    def untouched(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the train task went past the rank check")

    monkeypatch.setattr(VLLMServer, "max_lora_rank", lambda self: 16)
    monkeypatch.setattr(clients, "registry", untouched)
    config = PipelineConfig.load(training={"anti_forgetting": ["olora", "replay"], "lora_rank": 8, "max_tasks": 4})
    with pytest.raises(LoRARankTooLarge, match=r"rank 32 \(lora_rank 8 x 4 rank block\(s\)\)"):
        train_candidate.fn(config, [], "run-1")
    # within the limit the task goes on (here into the stand-in registry)
    config = PipelineConfig.load(training={"lora_rank": 16})
    with pytest.raises(AssertionError, match="went past the rank check"):
        train_candidate.fn(config, [], "run-2")
