"""Bad requests get OpenAI error bodies with the right status and the server keeps serving; --api-key guards every
endpoint but /health; CORS only when asked; /health is 503 while the model loads; bad flags fail at start-up."""

from __future__ import annotations

import json
import threading
import time

import pytest
from cli_helpers import EXACT, PROMPT, assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    from live_server import running_server

    cwd = tmp_path_factory.mktemp("serve-errors")
    args = ["-m", files["base"], "--arm", f"kind={files['lora']}", *EXACT, "-c", 128, "--max-body-bytes", 4096]
    with running_server(*args, cwd=cwd) as running:
        yield running


def assert_error(reply, status: int, *words, code: str | None = None) -> None:
    got, _, body = reply
    assert got == status, (got, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    if code is not None:
        assert error["code"] == code


def test_each_bad_request_is_a_4xx_and_the_server_keeps_serving(server):
    def chat(**body):
        return server.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], **body})

    assert_error(server.request("POST", "/v1/chat/completions", raw=b'{"messages": [}'), 400, "not valid JSON")
    assert_error(server.request("POST", "/v1/completions", {"prompt": 3}), 400, "prompt")
    # from a page elsewhere, JSON only as application/json: it cannot post that cross-site without a CORS preflight
    form = {"Content-Type": "text/plain", "Origin": "http://elsewhere.example"}
    assert_error(server.request("POST", "/v1/completions", {"prompt": PROMPT}, headers=form), 400, "application/json")
    assert_error(chat(arms={"nope": 1.0}), 400, "unknown ARM 'nope'", "kind")
    assert_error(chat(arms={"kind": "much"}), 400, "arms.kind")
    assert_error(chat(max_tokens=0), 400, "max_tokens")
    long_prompt = " ".join(["bicycle"] * 150)
    assert_error(server.request("POST", "/v1/completions", {"prompt": long_prompt, "max_tokens": 4}), 400, "context")
    assert_error(chat(grammar="root ::= ("), 400, "grammar")
    assert_error(chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 12}}}), 400)
    assert_error(chat(n=2), 400, '"n"')
    assert_error(chat(temperature="hot"), 400, "temperature")
    assert_error(chat(top_k=-1), 400, "top_k")
    assert_error(chat(logit_bias={"one": 5}), 400, "logit_bias")
    assert_error(server.request("POST", "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(server.request("POST", "/detokenize", {"tokens": [10**9]}), 400, "token ids")
    assert_error(server.request("POST", "/v1/completions", {"prompt": "x" * 5000}), 413, code="request_too_large")
    assert_error(server.request("GET", "/v1/nothing-here"), 404)
    assert_error(server.request("GET", "/v1/chat/completions"), 405)
    status, _, body = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert status == 200 and body["choices"][0]["finish_reason"] in {"stop", "length"}
    assert server.process.poll() is None


def test_api_key_and_cors(files, tmp_path):
    from live_server import running_server
    from openai import AuthenticationError

    (tmp_path / "key.txt").write_text("s3cret\n")
    args = ["-m", files["base"], *EXACT, "-c", 128, "--api-key-file", tmp_path / "key.txt"]
    with running_server(*args, "--cors-origin", "http://app.example", cwd=tmp_path) as server:
        assert server.request("GET", "/health")[0] == 200
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/tokenize"),
            ("GET", "/props"),
        ]:
            assert_error(server.request(method, path, {} if method == "POST" else None), 401, code="invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(server.request("GET", "/v1/models", headers=wrong), 401)
        with pytest.raises(AuthenticationError):
            server.client().models.list()
        assert server.client("s3cret").completions.create(prompt=PROMPT, model="", max_tokens=2).choices
        assert server.request("GET", "/")[0] == 200  # the page; every call it makes needs the key
        preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
        status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
        other = dict(preflight, Origin="http://evil.example")
        assert "access-control-allow-origin" not in server.request("OPTIONS", "/v1/models", headers=other)[1]


def test_no_cors_headers_by_default(server):
    headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    _, reply_headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers=headers)
    assert not any(name.lower().startswith("access-control") for name in reply_headers)
    _, reply_headers, _ = server.request("GET", "/v1/models", headers={"Origin": "http://app.example"})
    assert not any(name.lower().startswith("access-control") for name in reply_headers)


def test_health_is_503_while_loading(files, monkeypatch):
    """In-process: the engine thread's model load is held until the test has seen /health answer 503."""
    import uvicorn
    from live_server import Server, free_port

    from genarm_local.core.config import LoadConfig
    from genarm_local.serve import worker
    from genarm_local.serve.app import create_app
    from genarm_local.serve.config import ServeConfig

    release = threading.Event()
    real = worker.GuidedModel

    def slow_model(**kwargs):
        release.wait(60)
        return real(**kwargs)

    monkeypatch.setattr(worker, "GuidedModel", slow_model)
    port = free_port()
    app = create_app(ServeConfig(port=port), LoadConfig(base=str(files["base"]), n_ctx=64, n_threads=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = Server(f"http://127.0.0.1:{port}", None, None)
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        status, _, body = client.request("GET", "/health")
        assert status == 503 and body["status"] == "loading model"
        assert_error(client.request("POST", "/v1/completions", {"prompt": PROMPT}), 503, "loading")
        release.set()
        while client.request("GET", "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_bad_flags_are_one_line_at_start_up(files, tmp_path):
    base = ["serve", "-m", files["base"], "--port", "0"]
    assert_one_line_error(run_cli(*base, "--preset", "x=kind", cwd=tmp_path), "--preset")
    assert_one_line_error(run_cli(*base, "--preset", "x=nope:1", cwd=tmp_path), "unknown ARM 'nope'")
    assert_one_line_error(run_cli(*base, "--api-key-file", tmp_path / "missing", cwd=tmp_path), "no such file")
    assert_one_line_error(run_cli(*base, "-np", "0", cwd=tmp_path), "--parallel")
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "-m", files["base"], "--port", port, cwd=tmp_path)
        assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    assert_one_line_error(run_cli("serve", "-m", broken, "--port", "0", cwd=tmp_path), "broken.gguf")


def test_a_full_server_answers_503_and_clients_that_leave_free_their_place(files, tmp_path):
    import http.client

    from live_server import running_server

    def in_flight(server) -> int:
        return server.request("GET", "/health")[2]["in_flight"]

    def wait_for(server, count: int) -> None:
        deadline = time.monotonic() + 20
        while in_flight(server) != count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert in_flight(server) == count

    args = ["-m", files["base"], *EXACT, "-c", 2048, "-np", 1, "--queue-size", 1]
    with running_server(*args, cwd=tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        # a grammar that no token can complete: no end of generation, so each request holds on for 2000 tokens
        long = {"prompt": PROMPT, "max_tokens": 2000, "grammar": 'root ::= [a-z]+ "\\x01"'}
        running = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        json_type = {"Content-Type": "application/json"}
        running.request("POST", "/v1/completions", json.dumps(dict(long, stream=True)), json_type)
        assert running.getresponse().readline().startswith(b"data: ")  # it holds the only slot
        waiting = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        waiting.request("POST", "/v1/completions", json.dumps(long), json_type)
        wait_for(server, 2)
        assert_error(server.request("POST", "/v1/completions", long), 503, "full", code="server_busy")
        waiting.close()  # a waiting client leaves: its place in the queue frees at the next step
        wait_for(server, 1)
        running.close()  # a streaming client leaves: its slot frees at the next step
        wait_for(server, 0)
        status, _, body = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_a_chunked_body_over_the_limit_is_413(server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60)
    chunks = (b'{"prompt": "' if i == 0 else b"x" * 1000 for i in range(10))
    connection.request("POST", "/v1/completions", chunks, {"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
