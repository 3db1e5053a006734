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
    from live_server import running_server

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
    assert all(chunk.usage is None for chunk in chunks)  # usage only when asked (test_openai_compat.py)
    assert all("timings" not in chunk.model_extra for chunk in chunks[:-1])  # only the last, unless asked
    # llama-server's "timings_per_token": every chunk carries the timings so far
    streamed = client.completions.create(
        model=f"{base_id}+kind+big", prompt=PROMPT, max_tokens=16, stream=True,
        **sampled(7, extra_body={"timings_per_token": True}),
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected.text
    counts = [chunk.model_extra["timings"]["predicted_n"] for chunk in chunks]
    assert counts == sorted(counts) and 0 < counts[0] and counts[-1] >= len(expected.tokens)
    assert all(chunk.model_extra["timings"]["prompt_n"] >= 1 for chunk in chunks)


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
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"} and chunks[-1].usage is None
    assert chunks[-1].model_extra["timings"]["predicted_n"] > 0  # usage only when asked (test_openai_compat.py)
    # the stream's wire format: SSE data lines ending with [DONE]
    status, headers, text = server.request(
        "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in {"stop", "length"}


def test_arms_per_request_and_presets(server, local, base_id):
    from genarm_local import GuidedModel

    client = server.client()

    def text(model: str, arms: dict | None = None, seed: int = 11) -> str:
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, **sampled(seed, arms))
        return reply.choices[0].text

    with GuidedModel(local.config.base_path(), n_ctx=N_CTX, n_threads=1, kv_cache_type="f32", flash_attn=False) as base:
        alone = base.generate(PROMPT, max_tokens=16, seed=11, **SAMPLED).text
    # α = 0 for every ARM is the base's own output, whichever way it is asked for
    assert text(base_id) == alone
    assert text(f"{base_id}+kind+big", {"kind": 0, "big": 0}) == alone
    guided = local.generate(PROMPT, max_tokens=16, seed=11, weights=weights_of(local, 2.0, 0.0), **SAMPLED).text
    assert guided != alone
    assert text(base_id, {"kind": 2.0}) == guided
    # a preset by model name is its weights, and "arms" overrides it
    gentle = local.generate(PROMPT, max_tokens=16, seed=11, weights=weights_of(local, 0.5, 0.0), **SAMPLED).text
    assert text("gentle") == gentle == text(base_id, {"kind": 0.5})
    assert text("gentle", {"kind": 2.0}) == guided
    negative = local.generate(PROMPT, max_tokens=16, seed=11, weights=weights_of(local, -1.0, 0.5), **SAMPLED).text
    assert text(f"{base_id}+big", {"kind": -1.0}) == negative
    # an ARM named without a weight runs at its recommended α (the paper's 1 for an uncalibrated file)
    recommended = local.engine.arms[0].recommended_alpha  # "kind" is the first ARM (weights_of)
    default = local.generate(PROMPT, max_tokens=16, seed=11, weights=weights_of(local, recommended, 0.0), **SAMPLED)
    assert text(base_id, {"kind": None}) == default.text


def test_any_sampling_option_by_name(server, local, base_id):
    """Options the server has no code of its own for (guard_min_p, normalized, ...) reach SamplingConfig as given."""
    extra = {"guard_min_p": 0.05, "normalized": True, "repeat_penalty": 1.3, "repeat_last_n": 8}
    reply = server.client().completions.create(
        model=f"{base_id}+kind+big", prompt=PROMPT, max_tokens=16, **sampled(12, extra_body=extra)
    )
    assert reply.choices[0].text == local.generate(PROMPT, max_tokens=16, seed=12, **SAMPLED, **extra).text


def test_seeds_reproduce_and_differ(server):
    client = server.client()

    def text(seed: int) -> str:
        return client.completions.create(prompt=PROMPT, model="", max_tokens=16, **sampled(seed)).choices[0].text

    assert text(5) == text(5)
    assert len({text(5), text(6), text(7)}) == 3


def test_stop_strings(server, local):
    client = server.client()
    full = local.generate(PROMPT, max_tokens=24, temperature=0.0).text
    stop = full[8:11]
    assert len(stop) == 3 and full.find(stop) == 8
    reply = client.completions.create(prompt=PROMPT, model="", max_tokens=24, temperature=0.0, stop=[stop, "zzz"])
    assert reply.choices[0].text == full[:8] and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        prompt=PROMPT, model="", max_tokens=24, temperature=0.0, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == full[:8]


def test_logprobs(server, local):
    client = server.client()
    messages = [{"role": "user", "content": "Hello there."}]
    reply = client.chat.completions.create(
        messages=messages, model="", max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens > 0
    chat = local.chat_prompt(messages)
    expected = local.generate(chat.tokens, max_tokens=6, temperature=0.0, logprobs=3, **chat.sampling({}))
    for entry, logprob, top in zip(content, expected.logprobs, expected.top_logprobs, strict=True):
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(list(top.values()), abs=1e-4)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the sampled token is the most likely
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    completion = client.completions.create(prompt=PROMPT, model="", max_tokens=5, temperature=0.0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]


def test_json_output_through_the_grammar(server):
    client = server.client()
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    for response_format in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    ):
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": "Give me JSON."}], model="", max_tokens=48,
            response_format=response_format, **sampled(1),
        )  # fmt: skip
        text = reply.choices[0].message.content
        assert text.lstrip().startswith("{"), text
        if reply.choices[0].finish_reason == "stop":
            value = json.loads(text)
            assert isinstance(value, dict)
            if response_format["type"] == "json_schema":
                assert isinstance(value["age"], int)


def test_tokenize_detokenize(server, local):
    status, _, body = server.request("POST", "/tokenize", {"content": PROMPT})
    assert status == 200 and body["tokens"] == local.tokenize(PROMPT)
    status, _, pieces = server.request("POST", "/tokenize", {"content": PROMPT, "with_pieces": True})
    assert "".join(piece["piece"] for piece in pieces["tokens"]) == PROMPT
    status, _, text = server.request("POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and text["content"] == PROMPT


def test_a_second_chat_turn_reuses_the_cached_prefix(server):
    from genarm_local.core.scheduler import PREFILL_CHUNK

    client = server.client()
    messages = [
        {"role": "system", "content": "You know bicycles and their long history in cities. " * 5},
        {"role": "user", "content": "Tell me about bicycles and their long history in cities."},
    ]
    first = client.chat.completions.create(messages=messages, model="", max_tokens=12, **sampled(2))
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = client.chat.completions.create(messages=messages, model="", max_tokens=12, **sampled(2))
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the history is reused in whole chunks of the first prompt's prefill (core/scheduler.py)
    assert first.usage.prompt_tokens > PREFILL_CHUNK and cached == PREFILL_CHUNK, (cached, first.usage)
    assert second.model_extra["timings"]["cache_n"] == cached
    assert second.model_extra["timings"]["prompt_n"] == second.usage.prompt_tokens - cached


def test_without_max_tokens_a_request_runs_to_the_end_of_its_context(server, local):
    """OpenAI's and llama-server's rule: no max_tokens means until the end of generation, a stop or the context's
    end; only a prompt that does not fit is refused. Here a prompt 100 tokens short of the context."""
    client = server.client()
    words = local.tokenize(" ".join(["bicycle", "history", "wheel", "road"] * 100), add_special=False)
    prompt = local.detokenize(words[: N_CTX - 100 - 1])  # + BOS where the tokenizer adds one
    n_prompt = len(local.tokenize(prompt))
    assert abs(n_prompt - (N_CTX - 100)) <= 2, n_prompt
    result = client.completions.create(prompt=prompt, model="", **sampled(3))
    usage = result.usage
    assert usage.prompt_tokens == n_prompt and usage.completion_tokens > 16  # past the old default of 16 or 256
    assert usage.prompt_tokens + usage.completion_tokens <= N_CTX + 1
    if result.choices[0].finish_reason == "length":  # it stopped because the context was full
        assert usage.prompt_tokens + usage.completion_tokens == N_CTX + 1


def test_a_client_that_disconnects_frees_its_slot(server):
    client = server.client()
    stream = client.completions.create(prompt=PROMPT, model="", max_tokens=200, stream=True, **sampled(4))
    for index, _ in enumerate(stream):
        if index == 2:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while server.request("GET", "/health")[2]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.request("GET", "/health")[2]["in_flight"] == 0
    assert client.completions.create(prompt=PROMPT, model="", max_tokens=3).choices[0].text is not None
