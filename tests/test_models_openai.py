"""The OpenAI-compatible backend against real servers started on 127.0.0.1.

* generation: ``transformers serve`` serving the tiny model (its chat/completions rejects logprobs);
* scoring: llama-cpp-python's server serving the built-in GGUF file (returns logprobs);
* retries: a fault-injecting proxy in front of the real server.
"""

from __future__ import annotations

import logging
import time

import pytest
from fault_proxy import FaultProxy

from constitutional.core.errors import UserError
from constitutional.models import SamplingParams, load_model
from constitutional.models.openai import OpenAIModel

CHATS = [[{"role": "user", "content": f"Tell me fact number {i} about the sea."}] for i in range(6)]


def test_generation_matches_local_backend(hf_server: str, tiny, tiny_model_dir) -> None:
    remote = load_model(f"openai:{hf_server}#{tiny_model_dir}")
    params = SamplingParams(max_new_tokens=12)
    assert remote.generate(CHATS, params) == tiny.generate(CHATS, params)
    assert remote.stats.requests == len(CHATS)
    assert remote.stats.generated_tokens > 0


def test_raw_completion_and_stop(hf_server: str, tiny, tiny_model_dir) -> None:
    remote = load_model(f"openai:{hf_server}#{tiny_model_dir}")
    free = tiny.generate(["Once upon a time"], SamplingParams(max_new_tokens=20))[0]
    stop = free[8:11]
    out = remote.generate(["Once upon a time"], SamplingParams(max_new_tokens=20, stop=(stop,)))
    assert out == [free[: free.index(stop)]]


def test_transformers_serve_has_no_chat_logprobs(hf_server: str, tiny_model_dir) -> None:
    remote = load_model(f"openai:{hf_server}#{tiny_model_dir}")
    with pytest.raises(UserError, match="no logprobs"):
        remote.score([CHATS[0]], ["A", "B"])


@pytest.mark.slow
def test_llama_cpp_scores_match_local_model(llama_server: str) -> None:
    """Same weights in two engines: llama.cpp's logprobs agree with our transformers backend."""
    local = load_model("builtin:smollm2-135m-instruct")
    remote = load_model(f"openai:{llama_server}#smollm2")
    contexts = ["The capital of France is", ("Question: Is the sky green? Answer (A) yes or (B) no."
                " The answer is: ("), "2 + 2 ="]
    options = [" Paris", " London", "A", "B", " 4"]
    ours = local.score(contexts, options)
    theirs = remote.score(contexts, options)
    for row_ours, row_theirs in zip(ours, theirs, strict=True):
        for a, b in zip(row_ours, row_theirs, strict=True):
            if b > min(row_theirs):  # options outside the top-k get a floor value
                assert a == pytest.approx(b, abs=0.08)
    assert theirs[0][0] > theirs[0][1]  # Paris over London


@pytest.mark.slow
def test_llama_cpp_generates(llama_server: str) -> None:
    remote = load_model(f"openai:{llama_server}#smollm2")
    out = remote.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                          SamplingParams(max_new_tokens=24))
    assert "Paris" in out[0]


def test_retries_recover_and_are_counted(hf_server: str, tiny, tiny_model_dir) -> None:
    upstream = hf_server.removesuffix("/v1")
    schedule = ["429", "500", "hang", "malformed", "500", "429"]
    # a timeout far above a real answer's time: under a loaded CPU (CI beside a 1.5B model) a
    # real request took over 1 s and was counted as a second timeout (retries 7 for 6 faults)
    with FaultProxy(upstream, schedule, hang_seconds=12.0) as proxy:
        remote = OpenAIModel(f"{proxy.url}/v1", str(tiny_model_dir), timeout=6.0, backoff=0.05,
                             max_concurrency=4)
        params = SamplingParams(max_new_tokens=8)
        out = remote.generate(CHATS, params)
    assert out == tiny.generate(CHATS, params)  # correct results despite the faults
    assert proxy.injected == {"429": 2, "500": 2, "hang": 1, "malformed": 1}
    assert remote.stats.retries == len(schedule)  # every fault was retried and counted
    assert remote.stats.errors["APITimeoutError"] == 1
    assert remote.stats.errors["RateLimitError"] == 2


def test_retries_give_up_with_one_line(hf_server: str, tiny_model_dir) -> None:
    upstream = hf_server.removesuffix("/v1")
    with FaultProxy(upstream, ["500"] * 10) as proxy:
        remote = OpenAIModel(f"{proxy.url}/v1", str(tiny_model_dir), backoff=0.01, max_retries=2)
        with pytest.raises(UserError, match="failed after 2 retries"):
            remote.generate(CHATS[:1], SamplingParams(max_new_tokens=4))
    assert remote.stats.retries == 2


def test_unreachable_server_is_a_user_error() -> None:
    from conftest import free_port

    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot reach"):
        load_model(f"openai:http://127.0.0.1:{free_port()}/v1#whatever")
    assert time.monotonic() - t0 < 30


def test_api_key_is_never_logged(hf_server: str, tiny_model_dir, monkeypatch, caplog) -> None:
    secret = "sk-test-" + "7" * 32
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    upstream = hf_server.removesuffix("/v1")
    with FaultProxy(upstream, ["500"]) as proxy:
        remote = OpenAIModel(f"{proxy.url}/v1", str(tiny_model_dir), backoff=0.01)
        remote.generate(CHATS[:1], SamplingParams(max_new_tokens=2))
    assert remote.client.api_key == secret  # it was used …
    assert secret not in caplog.text  # … but never logged
    assert secret not in repr(remote)
