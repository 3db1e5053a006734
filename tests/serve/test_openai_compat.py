"""The OpenAI API as apps send it and llama-server serves it, through the real openai client: a hard-coded foreign
model name, frequency/presence penalties and logit_bias (equal to the in-process model's output with the same
options), stream_options.include_usage, harmless OpenAI fields, no max_tokens until the context's end, bodies with
malformed JSON or without Content-Type, and llama-server's /health, /props, /slots and /metrics."""

from __future__ import annotations

import http.client
import json
import re
import time

import openai
import pytest
from cli_helpers import EXACT, PROMPT

N_CTX = 512
MESSAGES = [{"role": "user", "content": "Tell me about bicycles."}]


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    from live_server import running_server

    cwd = tmp_path_factory.mktemp("serve-compat")
    args = ["-m", files["base"], "--arm", f"kind={files['lora']}:1.5", *EXACT, "-c", N_CTX, "-np", 2]
    with running_server(*args, "--temp", "0.7", "--metrics", cwd=cwd) as running:
        yield running


@pytest.fixture(scope="module")
def local(files):
    """The same model in this process: what the server must answer."""
    from genarm_local import GuidedModel

    arms = {str(files["lora"]): 1.5}
    with GuidedModel(files["base"], arms, n_ctx=N_CTX, n_threads=1, kv_cache_type="f32", flash_attn=False) as model:
        yield model


@pytest.fixture(scope="module")
def no_end(local) -> dict[str, int]:
    """logit_bias that bans every end-of-generation token: generation runs until max_tokens or the context's end."""
    base = local.engine.base_model
    return {str(token): -100 for token in range(local.engine.n_vocab) if base.is_eog(token)}


def error_of(reply) -> dict:
    status, _, body = reply
    assert 400 <= status < 500, (status, body)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_a_foreign_model_name_is_served_by_the_default_model(server):
    client = server.client()
    listed = [card.id for card in client.models.list().data]
    default = server.request("GET", "/props")[2]["default_model"]
    assert "gpt-4o-mini" not in listed and default in listed
    asked = dict(messages=MESSAGES, max_tokens=12, temperature=0.0)
    foreign = client.chat.completions.create(model="gpt-4o-mini", **asked)
    assert foreign.model == default  # says what served it
    assert (
        foreign.choices[0].message.content
        == client.chat.completions.create(model="", **asked).choices[0].message.content
    )
    completion = client.completions.create(model="text-davinci-003", prompt=PROMPT, max_tokens=4, temperature=0.0)
    assert completion.model == default and completion.choices[0].text
    base = listed[0]  # a name the server has is served as itself: the base alone here
    assert client.completions.create(model=base, prompt=PROMPT, max_tokens=4, temperature=0.0).model == base
    assert [card.id for card in client.models.list().data] == listed


def test_frequency_and_presence_penalties_reach_the_sampler(server, local):
    """Each penalty, either sign (OpenAI allows -2 to 2): the server's greedy text is the in-process model's with the
    same penalty, and for each kind at least one sign changes that text (the guided tiny model seldom repeats
    itself, so a positive penalty alone may change nothing; a negative one makes it repeat the prompt's tokens)."""
    client = server.client()
    plain = local.generate(PROMPT, max_tokens=32, temperature=0.0).text
    for penalty in ("frequency_penalty", "presence_penalty"):
        changed = []
        for value in (1.5, -1.5):
            expected = local.generate(PROMPT, max_tokens=32, temperature=0.0, **{penalty: value}).text
            changed.append(expected != plain)
            reply = client.completions.create(
                model="", prompt=PROMPT, max_tokens=32, temperature=0.0, **{penalty: value}
            )
            assert reply.choices[0].text == expected, (penalty, value)
        assert any(changed), penalty


def test_logit_bias_changes_a_greedy_token(server, local):
    client = server.client()

    def first_tokens(**options) -> str:
        reply = client.completions.create(model="", prompt=PROMPT, max_tokens=3, temperature=0.0, **options)
        return reply.choices[0].text

    greedy = local.generate(PROMPT, max_tokens=3, temperature=0.0)
    assert first_tokens() == greedy.text
    banned = {str(greedy.tokens[0]): -100}
    expected = local.generate(PROMPT, max_tokens=3, temperature=0.0, logit_bias={greedy.tokens[0]: -100})
    assert expected.tokens[0] != greedy.tokens[0]
    assert first_tokens(logit_bias=banned) == expected.text
    forced = local.tokenize(" wheel", add_special=False)[-1]
    assert forced != greedy.tokens[0]
    assert first_tokens(logit_bias={str(forced): 100}).startswith(local.detokenize([forced]))
    # bad keys or biases: a 400 that names the parameter, as OpenAI's
    for bias in ({"wheel": 5}, {"1.5": 5}, {"3": 150}, {"-3": 1}, {str(local.engine.n_vocab): 1}):
        reply = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "logit_bias": bias})
        error = error_of(reply)
        assert error["param"] == "logit_bias" and "logit_bias" in error["message"], (bias, error)


def test_include_usage_sends_a_last_chunk_without_choices(server):
    client = server.client()
    asked = dict(model="", messages=MESSAGES, max_tokens=12, temperature=0.0)
    whole = client.chat.completions.create(**asked)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **asked))
    last, finish = chunks[-1], chunks[-2]
    counts = lambda usage: (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)  # noqa: E731
    assert last.choices == [] and counts(last.usage) == counts(whole.usage)
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason and finish.usage is None
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1]) == whole.choices[0].message.content
    # not asked: no usage anywhere and no chunk without choices
    chunks = list(client.chat.completions.create(stream=True, **asked))
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # on the wire, as OpenAI sends it: "usage": null in every chunk but the last, which has "choices": []
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    status, _, text = server.request("POST", "/v1/completions", body)
    events = [line[6:] for line in text.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    data = [json.loads(event) for event in events[:-1]]
    assert all("usage" in chunk and chunk["usage"] is None for chunk in data[:-1])
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 4
    assert data[-1]["object"] == "text_completion" and data[-2]["choices"][0]["finish_reason"] == "length"


def test_harmless_openai_fields_are_accepted_and_n_above_one_is_a_clear_400(server):
    client = server.client()
    asked = dict(model="", messages=MESSAGES, max_tokens=8, temperature=0.0)
    plain = client.chat.completions.create(**asked).choices[0].message.content
    extras = dict(user="u-42", service_tier="auto", store=False, metadata={"app": "test"}, n=1)
    extra_body = {"parallel_tool_calls": True, "prediction": None}
    assert client.chat.completions.create(**asked, **extras, extra_body=extra_body).choices[0].message.content == plain
    assert server.request("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "n": None})[0] == 200
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**asked, n=2)
    error = caught.value.body
    assert error["param"] == "n" and '"n"' in error["message"], error


def test_without_max_tokens_a_completion_runs_to_the_end_of_the_context(server, no_end):
    """Not 256 tokens: until the end of generation or of the context; here every end token is banned, so the
    context's end it is."""
    client = server.client()
    reply = client.completions.create(model="", prompt=PROMPT, temperature=1.0, seed=5, logit_bias=no_end)
    usage = reply.usage
    assert usage.completion_tokens > 256
    assert usage.prompt_tokens + usage.completion_tokens == N_CTX + 1  # the last token is sampled, never decoded
    assert reply.choices[0].finish_reason == "length"


def test_malformed_json_and_bodies_without_a_json_content_type(server):
    error = error_of(server.request("POST", "/v1/chat/completions", raw=b'{"messages": [}'))
    assert error["param"] is None and "malformed JSON" in error["message"], error
    body = json.dumps({"prompt": PROMPT, "max_tokens": 3, "temperature": 0.0}).encode()
    port = int(server.url.rsplit(":", 1)[1])

    def post(headers: dict) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.putrequest("POST", "/v1/completions", skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        reply = response.status, json.loads(response.read())
        connection.close()
        return reply

    expected = server.request("POST", "/v1/completions", json.loads(body))[2]["choices"][0]["text"]
    status, reply = post({})  # no Content-Type at all
    assert status == 200 and reply["choices"][0]["text"] == expected
    status, reply = post({"Content-Type": "application/x-www-form-urlencoded"})  # what `curl -d` sends
    assert status == 200 and reply["choices"][0]["text"] == expected
    # a browser page from elsewhere may post such bodies without a CORS preflight: it must say application/json
    status, reply = post({"Content-Type": "text/plain", "Origin": "http://elsewhere.example"})
    assert status == 400 and "application/json" in reply["error"]["message"]
    status, reply = post({"Origin": "http://elsewhere.example"})
    assert status == 400 and "application/json" in reply["error"]["message"]


def test_health_props_and_slots(server, files, no_end):
    status, _, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, _, props = server.request("GET", "/props")
    assert status == 200 and props["total_slots"] == 2
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == N_CTX and settings["params"]["temperature"] == 0.7  # serve --temp 0.7
    assert settings["params"]["max_tokens"] is None and settings["params"]["top_k"] == 40
    assert props["model_path"] == str(files["base"]) and props["endpoint_metrics"] is True
    assert isinstance(props["chat_template"], str) and props["chat_template"]
    status, _, slots = server.request("GET", "/slots")
    assert status == 200 and [slot["id"] for slot in slots] == [0, 1]
    assert not any(slot["is_processing"] for slot in slots)
    stream = server.client().completions.create(
        model="", prompt=PROMPT, max_tokens=400, stream=True, logit_bias=no_end, temperature=1.0
    )
    next(iter(stream))
    busy = [slot for slot in server.request("GET", "/slots")[2] if slot["is_processing"]]
    assert len(busy) == 1 and busy[0]["state"] == 1 and busy[0]["n_prompt_tokens"] > 1
    assert busy[0]["next_token"]["n_decoded"] >= 1
    stream.close()
    deadline = time.monotonic() + 10
    while any(slot["is_processing"] for slot in server.request("GET", "/slots")[2]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(slot["is_processing"] for slot in server.request("GET", "/slots")[2])


def metrics_of(server) -> dict[str, float]:
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), (status, text)
    values = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.split()
            values[name] = float(value)
        else:
            assert re.fullmatch(r"# (HELP \S+ .+|TYPE \S+ (counter|gauge))", line), line
    return values


def test_metrics_count_tokens_and_requests(server, no_end):
    before = metrics_of(server)
    reply = server.client().completions.create(model="", prompt=PROMPT, max_tokens=20, logit_bias=no_end)
    after = metrics_of(server)
    assert after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"] == 20
    assert after["genarm_local:requests_total"] - before["genarm_local:requests_total"] == 1
    prompt_tokens = after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"]
    assert 0 < prompt_tokens <= reply.usage.prompt_tokens  # cached tokens are not decoded again
    assert after["llamacpp:predicted_tokens_seconds"] > 0 and after["llamacpp:tokens_predicted_seconds_total"] > 0
    assert after["llamacpp:requests_processing"] == after["llamacpp:requests_deferred"] == 0
    stream = server.client().completions.create(
        model="", prompt=PROMPT, max_tokens=400, stream=True, logit_bias=no_end, temperature=1.0
    )
    next(iter(stream))
    assert metrics_of(server)["llamacpp:requests_processing"] == 1
    stream.close()


def test_metrics_only_with_the_flag(files, tmp_path):
    from live_server import running_server

    with running_server("-m", files["base"], *EXACT, "-c", 128, cwd=tmp_path) as server:
        status, _, body = server.request("GET", "/metrics")
        assert status == 501 and "--metrics" in body["error"]["message"]
        assert server.request("GET", "/props")[2]["endpoint_metrics"] is False
