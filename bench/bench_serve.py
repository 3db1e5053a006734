"""`genarm-local serve` on the real Gemma-3-270M Q4_K_M base with the shipped default ARMs (issue 15's benchmark).

    python bench/bench_serve.py [--tokens 64] [--threads N] [--clients 8] [--load-clients 32 --load-requests 4]

writes docs/serve.json (stamped with date, machine, commit and load average: see bench/stamp.py).

Two kinds of request throughout: "guided" (the server's default model, the shipped default ARMs at their recommended
α) and "base" (the base's own model name: every α 0, no ARM decoded). Measured side by side in one run, each figure
from streamed completions read by a plain HTTP client, the in-process model and the server loaded at the same time:
- single stream: the server's tokens/s for one client against the in-process GuidedModel.generate of the same
  request (same model, weights, threads, prompt and seed, so the same tokens: "same_text" counts the rounds where
  they were), in alternating rounds so that both see the same machine (this one is shared: its speed drifts by
  15% over minutes) — the server's overhead, the median of the rounds' ratios;
- concurrency: aggregate tokens/s of --clients clients streaming at once (-np = clients), and of --few-clients,
  against one client alone, in alternating rounds, and beside the first the ceiling this machine sets for that
  work, measured with llama.cpp alone (no mixing, no sampling, no HTTP): for base requests, one context decoding
  --clients sequences per batch against one; for guided ones, the base's context and the ARM's each decoding them,
  side by side on half the threads or one after the other on all, whichever is faster
  (bench_engine.raw_guided_decode_tok_s);
- a bounded load test: --load-clients clients × --load-requests requests each, with mixed ARM weights, plain and
  streamed, some clients disconnecting mid-stream and some requests malformed. Every well-formed request must be
  answered correctly (200, a finish reason, the weights it asked for, no more tokens than asked), every bad one
  with a 4xx, nothing with a 5xx; afterwards the server must be alive with nothing in flight, and its RSS, read
  after a warm-up round and after each of --load-rounds rounds of that load, must level off (a leak grows with
  every round).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from stamp import measurement_stamp, write_stamped  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time, in a small village by the sea, there lived"
WEIGHTS = [{"positive": 0}, {"positive": 1}, {"positive": 2, "concise": 1}, {"positive": -1}, {"concise": 1}]
BAD = [
    (b'{"prompt": "unterminated', "malformed JSON"),
    (json.dumps({"prompt": PROMPT, "arms": {"nope": 1}}).encode(), "unknown ARM"),
    (json.dumps({"prompt": PROMPT, "max_tokens": 0}).encode(), "max_tokens 0"),
    (json.dumps({"prompt": PROMPT, "model": "no-such-model"}).encode(), "unknown model"),
    (json.dumps({"prompt": PROMPT * 400, "max_tokens": 8}).encode(), "prompt beyond the context"),
    (json.dumps({"prompt": PROMPT, "grammar": "root ::= ("}).encode(), "bad grammar"),
]


def post(port: int, body: bytes, stream: bool, stop_after: int | None = None, timeout: float = 600) -> dict:
    """One POST /v1/completions. Streams are read chunk by chunk; ``stop_after`` chunks, then the socket is closed."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    try:
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        result = {"status": response.status, "chunks": 0, "done": False}
        if not stream or response.status != 200:
            result["body"] = json.loads(response.read() or b"{}")
        else:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    result["done"] = True
                    break
                chunk = json.loads(data)
                result["chunks"] += 1
                if chunk.get("choices"):
                    result["text"] = result.get("text", "") + chunk["choices"][0].get("text", "")
                if "error" in chunk or chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    result["body"] = chunk  # the finish chunk: finish_reason, timings, arms
                if chunk.get("usage"):  # the last chunk (stream_options.include_usage): no choices
                    result.setdefault("body", {})["usage"] = chunk["usage"]
                if stop_after is not None and result["chunks"] >= stop_after:
                    result["disconnected"] = True
                    break
        result["seconds"] = time.perf_counter() - start
        return result
    finally:
        connection.close()


def completion(max_tokens: int, seed: int, stream: bool, arms: dict | None = None, model: str | None = None) -> bytes:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "temperature": 0.8, "stream": stream}
    if stream:  # a stream's usage comes in a last chunk only when asked for, as OpenAI's
        body["stream_options"] = {"include_usage": True}
    if arms is not None:
        body["arms"] = arms
    if model is not None:
        body["model"] = model
    return json.dumps(body).encode()


def tokens_of(result: dict) -> int:
    return result["body"]["usage"]["completion_tokens"]


def health(port: int) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def models(port: int) -> dict[str, dict[str, float]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/v1/models")
        return {card["id"]: card["arms"] for card in json.loads(connection.getresponse().read())["data"]}
    finally:
        connection.close()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def start_server(threads: int, parallel: int, n_ctx: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "genarm_local.cli", "serve", "--port", str(port), "-np", str(parallel)]
    command += ["-c", str(n_ctx), "-t", str(threads), "--queue-size", "256"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()}")
        try:
            if health(port)[0] == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready in 300 s")


def load_in_process(threads: int, n_ctx: int):
    """GuidedModel with what `serve` loads by default: the embedded base and the shipped default ARMs."""
    from genarm_local import GuidedModel
    from genarm_local.core.config import ArmSpec, LoadConfig, default_arms, resolve_base

    arms = tuple(ArmSpec.of(name, alpha) for name, alpha in default_arms().items())
    config = LoadConfig(base=str(resolve_base(None)), arms=arms, n_ctx=n_ctx, n_threads=threads)
    return GuidedModel(config=config)


def single_streams(model, port: int, kinds: dict, tokens: int, repeats: int) -> dict:
    """Per kind of request, alternating rounds: the in-process API, then the server, on the same request."""
    runs = {kind: {"in_process": [], "server": [], "same_text": 0} for kind in kinds}
    for repeat in range(repeats):
        for kind, (weights, model_name) in kinds.items():
            start = time.perf_counter()
            local = model.generate(PROMPT, max_tokens=tokens, seed=repeat, temperature=0.8, weights=weights)
            runs[kind]["in_process"].append(len(local.tokens) / (time.perf_counter() - start))
            result = post(port, completion(tokens, repeat, True, model=model_name), True)
            runs[kind]["server"].append(tokens_of(result) / result["seconds"])
            runs[kind]["same_text"] += result.get("text") == local.text
    report = {}
    for kind, run in runs.items():
        ratios = [server / local for server, local in zip(run["server"], run["in_process"], strict=True)]
        report[kind] = {
            "server_tok_s": round(statistics.median(run["server"]), 2),
            "in_process_tok_s": round(statistics.median(run["in_process"]), 2),
            "server_vs_in_process": round(statistics.median(ratios), 3),
            "ratios": [round(ratio, 3) for ratio in ratios],
            "same_text": f"{run['same_text']}/{repeats}",
        }
    return report


def ceilings(threads: int, clients: int, tokens: int) -> dict:
    """llama.cpp alone: --clients sequences per step against one, for each kind of request."""
    from bench_engine import raw_decode_tok_s, raw_guided_decode_tok_s

    from genarm_local.core.config import LoadConfig, default_arms, resolve_arm_path, resolve_base
    from genarm_local.core.native import Model

    base = resolve_base(None)
    with Model(base, LoadConfig(n_threads=threads)) as model:
        plain = {n: raw_decode_tok_s(model, n, tokens, threads) for n in (1, clients)}
    arm = resolve_arm_path(next(name for name, alpha in default_arms().items() if alpha != 0.0))
    guided = {n: raw_guided_decode_tok_s(base, arm, n, tokens, threads) for n in (1, clients)}
    return {
        "base": {"one_tok_s": round(plain[1], 2), "many_tok_s": round(plain[clients], 2),
                 "ratio": round(plain[clients] / plain[1], 2)},
        "guided": {"one": {k: round(v, 2) for k, v in guided[1].items()},
                   "many": {k: round(v, 2) for k, v in guided[clients].items()},
                   "ratio": round(guided[clients]["best"] / guided[1]["best"], 2)},
    }  # fmt: skip


def concurrent(port: int, clients: int, tokens: int, seed: int, model: str | None = None) -> dict:
    results: list[dict] = [{}] * clients
    barrier = threading.Barrier(clients)

    def run(index: int) -> None:
        barrier.wait()
        results[index] = post(port, completion(tokens, seed + index, True, model=model), True)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    total = sum(tokens_of(result) for result in results)
    return {"clients": clients, "tokens": total, "seconds": round(wall, 3), "tok_s": round(total / wall, 2)}


def concurrency(port: int, kinds: dict, clients: int, few: int, tokens: int, repeats: int) -> dict:
    """Per kind of request, alternating rounds of one client, ``few`` and ``clients`` at once; medians."""
    runs = {kind: {"one": [], "few": [], "many": []} for kind in kinds}
    for repeat in range(repeats):
        for kind, (_, model_name) in kinds.items():
            runs[kind]["one"].append(concurrent(port, 1, tokens, 1000 * repeat, model_name))
            runs[kind]["few"].append(concurrent(port, few, tokens, 1000 * repeat + 50, model_name))
            runs[kind]["many"].append(concurrent(port, clients, tokens, 1000 * repeat + 100, model_name))
    report = {}
    for kind, run in runs.items():
        one, few_tok_s, many = (statistics.median(r["tok_s"] for r in run[key]) for key in ("one", "few", "many"))
        report[kind] = {"clients": clients, "one_client_tok_s": round(one, 2), "clients_tok_s": round(many, 2),
                        "ratio": round(many / one, 2), "few_clients": few, "few_clients_tok_s": round(few_tok_s, 2),
                        "few_ratio": round(few_tok_s / one, 2), "rounds": run}  # fmt: skip
    return report


def load_test(port: int, clients: int, requests: int, tokens: int) -> dict:
    """Every kind of request at once; returns counts and every failed expectation."""
    outcome = {"ok": 0, "rejected_4xx": 0, "disconnected": 0, "status": {}, "failures": []}
    lock = threading.Lock()

    def one(client: int, index: int) -> None:
        n = client * requests + index
        kind = n % 8
        try:
            if kind == 5:
                body, what = BAD[n % len(BAD)]
                result = post(port, body, False)
                good = 400 <= result["status"] < 500
                failure = None if good else f"{what}: status {result['status']} instead of a 4xx"
                key = "rejected_4xx"
            elif kind == 3:
                result = post(port, completion(200, n, True, WEIGHTS[n % len(WEIGHTS)]), True, stop_after=3)
                failure = None if result["status"] == 200 else f"disconnecting stream: status {result['status']}"
                key = "disconnected"
            else:
                arms = WEIGHTS[n % len(WEIGHTS)]
                stream = kind % 2 == 0
                result = post(port, completion(tokens, n, stream, arms), stream)
                failure = check_answer(result, arms, tokens, stream)
                key = "ok"
        except Exception as exc:  # a dropped connection, a timeout: a failure of the server, recorded
            result, failure, key = {"status": "exception"}, f"request {n}: {exc!r}", "ok"
        with lock:
            status = str(result["status"])
            outcome["status"][status] = outcome["status"].get(status, 0) + 1
            if failure:
                outcome["failures"].append(failure)
            else:
                outcome[key] += 1

    threads = [
        threading.Thread(target=lambda c=c: [one(c, i) for i in range(requests)]) for c in range(clients)
    ]  # fmt: skip
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcome["seconds"] = round(time.perf_counter() - start, 2)
    outcome["requests"] = clients * requests
    outcome["server_5xx"] = sum(n for status, n in outcome["status"].items() if status.startswith("5"))
    return outcome


def check_answer(result: dict, arms: dict, max_tokens: int, stream: bool) -> str | None:
    """What is wrong with the answer to a well-formed request, or None."""
    if result["status"] != 200:
        return f"status {result['status']}: {result.get('body')}"
    body = result.get("body", {})
    if stream and not result["done"]:
        return "stream without [DONE]"
    if "error" in body:
        return f"error in the stream: {body['error']}"
    finish = body["choices"][0].get("finish_reason")
    used = {name: body["arms"][name] for name in arms}
    if finish not in {"stop", "length"} or used != arms or not 0 < tokens_of(result) <= max_tokens:
        return f"unexpected answer: finish {finish}, weights {used} for {arms}, {tokens_of(result)} tokens"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of the speed measurements")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--few-clients", type=int, default=2, help="a small concurrency too (the web page's compare)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of the single-stream comparison")
    parser.add_argument("--concurrency-repeats", type=int, default=3, help="rounds of the concurrency comparison")
    parser.add_argument("--load-clients", type=int, default=32)
    parser.add_argument("--load-requests", type=int, default=4)
    parser.add_argument("--load-rounds", type=int, default=3, help="rounds of the load test, RSS read after each")
    parser.add_argument("--load-tokens", type=int, default=24)
    parser.add_argument("--ctx", type=int, default=512, help="context per slot (-c)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serve.json")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    stamp = measurement_stamp(args.allow_dirty)
    report: dict = {"threads": args.threads, "tokens": args.tokens, "n_ctx": args.ctx, "clients": args.clients}

    def record(key: str, value) -> None:  # each result as soon as it is measured
        report[key] = value
        print(json.dumps({key: value}), flush=True)

    process, port = start_server(args.threads, args.clients, args.ctx)
    try:
        with load_in_process(args.threads, args.ctx) as model:
            base_model = next(name for name, arms in models(port).items() if not any(arms.values()))
            off = {name: 0.0 for name in model.arm_weights()}
            kinds = {"guided": (None, None), "base": (off, base_model)}
            model.generate(PROMPT, max_tokens=4, seed=0)  # warm-up, both sides
            post(port, completion(4, 0, True), True)
            record("single_stream", single_streams(model, port, kinds, args.tokens, args.repeats))
        many = concurrency(port, kinds, args.clients, args.few_clients, args.tokens, args.concurrency_repeats)
        limits = ceilings(args.threads, args.clients, args.tokens)
        for kind in kinds:
            many[kind]["llama_cpp_alone"] = limits[kind]
        record("concurrency", many)
        load_test(port, args.load_clients, 1, args.load_tokens)  # warm-up: every kind of request once per client
        rss, rounds = [rss_mib(process.pid)], []
        for _ in range(args.load_rounds):
            rounds.append(load_test(port, args.load_clients, args.load_requests, args.load_tokens))
            deadline = time.monotonic() + 60
            while (state := health(port))[1].get("in_flight") and time.monotonic() < deadline:
                time.sleep(0.1)
            rss.append(rss_mib(process.pid))
        load = {
            key: sum(outcome[key] for outcome in rounds)
            for key in ("ok", "rejected_4xx", "disconnected", "requests", "server_5xx", "seconds")
        }
        load["status"] = {}
        for outcome in rounds:
            for status, n in outcome["status"].items():
                load["status"][status] = load["status"].get(status, 0) + n
        load.update(
            rounds=len(rounds), failures=[f for outcome in rounds for f in outcome["failures"]],
            alive=state[0] == 200 and process.poll() is None, in_flight_after=state[1].get("in_flight"),
            rss_mib=[round(value, 1) for value in rss], rss_mib_before=round(rss[0], 1),
            rss_mib_after=round(rss[-1], 1), rss_growth_mib=round(rss[-1] - rss[0], 1),
        )  # fmt: skip
        record("load_test", load)
    finally:
        process.terminate()
        process.wait(30)
    write_stamped(args.out, report, stamp)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
