"""`genarm-local serve` through the real openai client: chat and completions (streamed and not) equal the in-process
GuidedModel's output for the same seed and weights; per-request "arms" and presets by model name; seeds, stop strings,
logprobs, JSON output, tokenize; prefix reuse across chat turns; a client that disconnects frees its slot."""

from __future__ import annotations

import json
import time

import pytest
from cli_helpers import EXACT, PROMPT

SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
N_CTX = 256


def sampled(seed: int, arms: dict | None = None, **extra) -> dict:
    """openai client keywords for SAMPLED; llama.cpp's options and the ARM weights travel in extra_body."""
    body = {"top_k": 0, "min_p": 0.0, **({"arms": arms} if arms is not None else {}), **extra.pop("extra_body", {})}
    return dict(temperature=1.0, top_p=1.0, seed=seed, extra_body=body, **extra)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    from conftest import running_server

    arms = ["--arm", f"kind={files['lora']}:1.5", "--arm", f"big={files['big']}:0.5"]
    cwd = tmp_path_factory.mktemp("serve")
    with running_server(
        "-m", files["base"], *arms, *EXACT, "-c", N_CTX, "-np", 4, "--preset", "gentle=kind:0.5", cwd=cwd
    ) as running:
        yield running


@pytest.fixture(scope="module")
def local(files):
    """The same model in this process: what the server must answer."""
    from genarm_local import GuidedModel

    arms = {str(files["lora"]): 1.5, str(files["big"]): 0.5}
    with GuidedModel(files["base"], arms, n_ctx=N_CTX, n_threads=1, kv_cache_type="f32", flash_attn=False) as model:
        yield model


@pytest.fixture(scope="module")
def base_id(server):
    return server.client().models.list().data[0].id


def weights_of(local, kind: float, big: float) -> dict:
    return {local.arms[0].name: kind, local.arms[1].name: big}


def test_models_list_the_base_each_arm_all_arms_and_presets(server, base_id):
    cards = {card.id: card.model_extra["arms"] for card in server.client().models.list().data}
    assert cards == {
        base_id: {"kind": 0.0, "big": 0.0},
        f"{base_id}+kind": {"kind": 1.5, "big": 0.0},
        f"{base_id}+big": {"kind": 0.0, "big": 0.5},
        f"{base_id}+kind+big": {"kind": 1.5, "big": 0.5},
        "gentle": {"kind": 0.5, "big": 0.0},
    }


def test_completion_equals_in_process_generation(server, local, base_id):
    client = server.client()
    expected = local.generate(PROMPT, max_tokens=16, seed=7, **SAMPLED)
    reply = client.completions.create(model=f"{base_id}+kind+big", prompt=PROMPT, max_tokens=16, **sampled(7))
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens == len(local.tokenize(PROMPT))
    assert reply.usage.completion_tokens == len(expected.tokens)
    timings = reply.model_extra["timings"]
    assert timings["predicted_n"] >= len(expected.tokens) and timings["predicted_per_second"] > 0
    streamed = client.completions.create(
        model=f"{base_id}+kind+big", prompt=PROMPT, max_tokens=16, stream=True, **sampled(7)
    )
    chunks = list(streamed)
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.tokens)


def test_chat_stream_and_not(server, local):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me about bicycles."}]
    expected = local.chat(messages, max_tokens=20, seed=3, **SAMPLED)
    reply = client.chat.completions.create(messages=messages, max_tokens=20, model="", **sampled(3))
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    stream = client.chat.completions.create(messages=messages, max_tokens=20, stream=True, model="", **sampled(3))
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"} and chunks[-1].usage.total_tokens > 0
    # the stream's wire format: SSE data lines ending with [DONE]
    status, headers, text = server.request(
        "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in {"stop", "length"}
