"""The Ollama API of `genarm-local serve` through the official ollama client: model names the Ollama way, generate and
chat (streamed and not) equal to the in-process GuidedModel's output for the same seed and weights, ARM weights in
options or at the top level, options, errors in Ollama's shape, show / ps / version."""

from __future__ import annotations

import json

import httpx
import pytest
from cli_helpers import EXACT, PROMPT

ollama = pytest.importorskip("ollama")

SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
N_CTX = 256


def options(seed: int, n: int = 16, **extra) -> dict:
    """Ollama options for SAMPLED: llama.cpp's names, num_predict for the token limit."""
    return {**SAMPLED, "seed": seed, "num_predict": n, **extra}


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    from live_server import running_server

    arms = ["--arm", f"kind={files['lora']}:1.5", "--arm", f"big={files['big']}:0.5"]
    cwd = tmp_path_factory.mktemp("serve-ollama")
    with running_server(
        "-m", files["base"], *arms, *EXACT, "-c", N_CTX, "-np", 2, "--preset", "gentle=kind:0.5", cwd=cwd
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def local(files):
    """The same model in this process: what the server must answer."""
    from genarm_local import GuidedModel

    arms = {str(files["lora"]): 1.5, str(files["big"]): 0.5}
    with GuidedModel(files["base"], arms, n_ctx=N_CTX, n_threads=1, kv_cache_type="f32", flash_attn=False) as model:
        yield model


@pytest.fixture(scope="module")
def base(server):
    """The base's name in /v1/models, which is the Ollama names' repository."""
    return server.client().models.list().data[0].id


def weights_of(local, kind: float, big: float) -> dict:
    return {local.arms[0].name: kind, local.arms[1].name: big}


def test_list_names_the_base_each_arm_and_presets_as_tags(client, base):
    models = {model.model: model for model in client.list().models}
    assert set(models) == {f"{base}:latest", f"{base}:kind", f"{base}:big", f"{base}:kind+big", f"{base}:gentle"}
    for model in models.values():
        assert model.details.format == "gguf" and model.details.family == "llama"
        assert model.details.quantization_level == "F32" and model.details.parameter_size.endswith("M")
        assert len(model.digest) == 64 and model.modified_at is not None
    assert len({model.digest for model in models.values()}) == len(models)
    # a name's size is the files it runs: the base alone, or with the ARM it weights
    assert models[f"{base}:kind"].size > models[f"{base}:latest"].size > 0
    assert models[f"{base}:kind+big"].size > models[f"{base}:big"].size > models[f"{base}:kind"].size


def test_generate_equals_in_process_generation(client, local, base):
    expected = local.generate(PROMPT, max_tokens=16, seed=7, **SAMPLED)
    reply = client.generate(model=f"{base}:kind+big", prompt=PROMPT, raw=True, options=options(7))
    assert reply.response == expected.text
    assert reply.done and reply.done_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.model == f"{base}:kind+big"
    assert reply.prompt_eval_count == len(local.tokenize(PROMPT))
    assert reply.eval_count == len(expected.tokens)
    assert reply.total_duration >= reply.eval_duration > 0 and reply.prompt_eval_duration > 0
    assert reply.total_duration >= reply.load_duration >= 0
    # streamed (the default): the same text over chunks, statistics on the last
    chunks = list(client.generate(model=f"{base}:kind+big", prompt=PROMPT, raw=True, options=options(7), stream=True))
    assert "".join(chunk.response for chunk in chunks) == expected.text
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].eval_count == len(expected.tokens) and chunks[-1].done_reason == reply.done_reason
    # without raw the prompt goes through the chat template, with the system message before it
    system = "You are brief."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": PROMPT}]
    templated = local.chat(messages, max_tokens=16, seed=7, **SAMPLED)
    reply = client.generate(model=f"{base}:kind+big", prompt=PROMPT, system=system, options=options(7))
    assert reply.response == templated.text and reply.prompt_eval_count == len(local.chat_prompt(messages).tokens)


def test_chat_stream_and_not(client, local, base):
    messages = [{"role": "user", "content": "Tell me about bicycles."}]
    expected = local.chat(messages, max_tokens=20, seed=3, **SAMPLED)
    reply = client.chat(model=f"{base}:kind+big", messages=messages, options=options(3, 20), keep_alive="5m")
    assert reply.message.role == "assistant" and reply.message.content == expected.text
    assert reply.done and reply.eval_count == len(expected.tokens)
    chunks = list(client.chat(model=f"{base}:kind+big", messages=messages, options=options(3, 20), stream=True))
    assert len(chunks) > 1 and all(chunk.message.role == "assistant" for chunk in chunks)
    assert "".join(chunk.message.content for chunk in chunks) == expected.text
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].done_reason in {"stop", "length"} and chunks[-1].eval_count == len(expected.tokens)


def test_the_stream_is_ndjson(server, base):
    body = {"model": base, "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 4}}
    status, headers, text = server.request("POST", "/api/chat", body)
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) >= 2 and [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["eval_count"] == 4 and lines[-1]["done_reason"] == "length"
    assert all(isinstance(lines[-1][key], int) for key in ("total_duration", "eval_duration", "prompt_eval_count"))
    status, headers, whole = server.request("POST", "/api/chat", {**body, "stream": False})
    assert status == 200 and headers["content-type"].startswith("application/json") and whole["done"]


def test_arm_weights_in_options_or_at_the_top_level(server, client, local, base):
    from genarm_local import GuidedModel

    def text(model: str, arms: dict | None = None) -> str:
        extra = {} if arms is None else {"arms": arms}
        return client.generate(model=model, prompt=PROMPT, raw=True, options=options(11, **extra)).response

    with GuidedModel(local.config.base_path(), n_ctx=N_CTX, n_threads=1, kv_cache_type="f32", flash_attn=False) as b:
        alone = b.generate(PROMPT, max_tokens=16, seed=11, **SAMPLED).text
    # a name without a tag is :latest, the base alone
    assert text(base) == text(f"{base}:latest") == alone
    guided = local.generate(PROMPT, max_tokens=16, seed=11, weights=weights_of(local, 2.0, 0.0), **SAMPLED).text
    assert guided != alone
    assert text(base, {"kind": 2.0}) == guided
    # a preset is its weights, and "arms" overrides them
    gentle = local.generate(PROMPT, max_tokens=16, seed=11, weights=weights_of(local, 0.5, 0.0), **SAMPLED).text
    assert text(f"{base}:gentle") == gentle == text(base, {"kind": 0.5})
    assert text(f"{base}:gentle", {"kind": 2.0}) == guided
    # the top-level "arms" field (as in the OpenAI routes), which the client has no argument for
    body = {"model": base, "prompt": PROMPT, "raw": True, "stream": False, "options": options(11), "arms": {"kind": 2}}
    reply = httpx.post(f"{server.url}/api/generate", json=body, timeout=120).json()
    assert reply["response"] == guided and reply["arms"] == {"kind": 2.0, "big": 0.0}


def test_options(client, local, base):
    full = local.generate(PROMPT, max_tokens=24, temperature=0.0, weights=weights_of(local, 0, 0)).text
    stop = full[8:11]
    assert len(stop) == 3 and full.find(stop) == 8
    greedy = {"temperature": 0.0, "num_predict": 24}
    reply = client.generate(model=base, prompt=PROMPT, raw=True, options={**greedy, "stop": [stop, "zzz"]})
    assert reply.response == full[:8] and reply.done_reason == "stop"
    # options Ollama has and this server does not are ignored, as Ollama ignores unknown ones
    ignored = {"num_thread": 3, "num_gpu": 0, "mirostat": 0, "use_mmap": True, "no_such_option": 1}
    assert client.generate(model=base, prompt=PROMPT, raw=True, options={**greedy, **ignored}).response == full
    # num_ctx below the server's context: generation stops where the window is full
    n_prompt = len(local.tokenize(PROMPT))
    capped = client.generate(model=base, prompt=PROMPT, raw=True, options={**greedy, "num_ctx": n_prompt + 5})
    assert capped.eval_count == 5 and capped.done_reason == "length" and full.startswith(capped.response)
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model=base, prompt=PROMPT, raw=True, options={"num_ctx": n_prompt - 1})
    assert error.value.status_code == 400 and "num_ctx" in error.value.error
    # num_predict -1: until the end of generation (here the end of the context)
    endless = client.generate(model=base, prompt=PROMPT, raw=True, options={"num_predict": -1, "seed": 1})
    assert endless.eval_count > 24 or endless.done_reason == "stop"
    # format "json" and a JSON schema go through the grammar
    for form in ("json", {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}):
        reply = client.chat(
            model=base, messages=[{"role": "user", "content": "JSON please"}], format=form, options=options(1, 48)
        )
        assert reply.message.content.lstrip().startswith("{"), reply.message.content
        if reply.done_reason == "stop":
            assert isinstance(json.loads(reply.message.content), dict)
    # log-probs as Ollama gives them: one entry per generated token
    reply = client.generate(model=base, prompt=PROMPT, raw=True, options=greedy, logprobs=True, top_logprobs=2)
    assert len(reply.logprobs) == reply.eval_count and "".join(entry.token for entry in reply.logprobs) == full
    assert all(len(entry.top_logprobs) == 2 for entry in reply.logprobs)


def test_errors_in_ollama_shape(server, client, base):
    for call in (
        lambda: client.chat(model="nope", messages=[{"role": "user", "content": "Hi"}]),
        lambda: list(client.chat(model="nope", messages=[{"role": "user", "content": "Hi"}], stream=True)),
        lambda: client.generate(model=f"{base}:nope", prompt=PROMPT),
        lambda: client.show("nope"),
    ):
        with pytest.raises(ollama.ResponseError) as error:
            call()
        assert error.value.status_code == 404
        assert error.value.error.startswith('model "') and error.value.error.endswith(
            '" not found, try pulling it first'
        )
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model=base, prompt=PROMPT, options={"temperature": "hot"})
    assert error.value.status_code == 400 and "temperature" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model=base, prompt=PROMPT, options={"arms": {"no_such_arm": 1.0}})
    assert error.value.status_code == 400 and "no_such_arm" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model=base, messages=[{"role": "user", "content": "Hi"}], tools=[{"type": "function"}])
    assert error.value.status_code == 400 and "does not support tools" in error.value.error
    # bodies that do not validate: {"error": "message"}, never OpenAI's nested object
    for body, fragment in ((b"{not json", "JSON"), (b'{"prompt": "x"}', "model is required")):
        status, _, reply = server.request("POST", "/api/generate", raw=body)
        assert status == 400 and isinstance(reply["error"], str) and fragment in reply["error"], reply
    status, _, reply = server.request("POST", "/api/chat", {"model": base, "messages": "Hi"})
    assert status == 400 and reply["error"].startswith("messages")
    # what Ollama serves and this server does not (pulling models, embeddings): a 404 in the same shape
    status, _, reply = server.request("POST", "/api/pull", {"model": base})
    assert status == 404 and "/api/pull is not served" in reply["error"]


def test_an_empty_prompt_loads_the_model(client, base):
    reply = client.generate(model=base, prompt="")
    assert reply.done and reply.done_reason == "load" and reply.response == ""
    assert client.chat(model=base, messages=[]).done_reason == "load"


def test_show_ps_version(server, client, base):
    import genarm_local

    shown = client.show(f"{base}:kind")
    assert shown.capabilities == ["completion"] and shown.details.family == "llama"
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["general.parameter_count"] > 0
    assert "temperature" in shown.parameters and shown.template
    status, _, raw = server.request("POST", "/api/show", {"model": f"{base}:kind"})
    assert status == 200 and raw["arms"] == {"kind": 1.5, "big": 0.0}
    running = client.ps().models
    assert {model.model for model in running} == {model.model for model in client.list().models}
    assert all(model.context_length == N_CTX and model.expires_at.year == 9999 for model in running)
    assert client.show(base).modelinfo == shown.modelinfo
    assert server.request("GET", "/api/version")[2] == {"version": genarm_local.__version__}
    assert server.request("HEAD", "/")[0] == 200  # how Ollama's CLI checks that a server is up
