"""`genarm-local serve` on the real Gemma-3-270M Q4_K_M base with the shipped default ARMs (issue 15's benchmark).

    python bench/bench_serve.py [--tokens 64] [--threads N] [--clients 8] [--load-clients 32 --load-requests 4]

writes docs/serve.json (stamped with date, machine, commit and load average: see bench/stamp.py).

Measured side by side in one run, each figure from streamed completions read by a plain HTTP client:
- single stream: the server's tokens/s for one client against the in-process GuidedModel.generate of the same
  request (same model, ARMs, threads, prompt, seed; medians of --repeats) — the server's overhead;
- concurrency: aggregate tokens/s of --clients clients streaming at once (-np = clients) against one client alone,
  and beside it the ceiling this machine sets: llama.cpp's own decode of that many sequences per batch against one
  (bench_engine.raw_decode_tok_s: no mixing, no sampling, no HTTP);
- a bounded load test: --load-clients clients × --load-requests requests each, with mixed ARM weights, plain and
  streamed, some clients disconnecting mid-stream and some requests malformed. Every well-formed request must be
  answered correctly (200, a finish reason, the weights it asked for, no more tokens than asked), every bad one
  with a 4xx, nothing with a 5xx; afterwards the server must be alive with nothing in flight, and its RSS (after a
  warm-up round of the same load) flat.
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
                if "usage" in chunk or "error" in chunk:
                    result["body"] = chunk
                if stop_after is not None and result["chunks"] >= stop_after:
                    result["disconnected"] = True
                    break
        result["seconds"] = time.perf_counter() - start
        return result
    finally:
        connection.close()


def completion(max_tokens: int, seed: int, stream: bool, arms: dict | None = None) -> bytes:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "temperature": 0.8, "stream": stream}
    return json.dumps(body if arms is None else dict(body, arms=arms)).encode()


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


def in_process_tok_s(threads: int, n_ctx: int, tokens: int, repeats: int) -> list[float]:
    """GuidedModel.generate with what `serve` loads by default: the embedded base and the shipped default ARMs."""
    from genarm_local import GuidedModel
    from genarm_local.core.config import ArmSpec, LoadConfig, default_arms, resolve_base

    arms = tuple(ArmSpec.of(name, alpha) for name, alpha in default_arms().items())
    config = LoadConfig(base=str(resolve_base(None)), arms=arms, n_ctx=n_ctx, n_threads=threads)
    speeds = []
    with GuidedModel(config=config) as model:
        model.generate(PROMPT, max_tokens=4, seed=0)  # warm-up
        for repeat in range(repeats):
            start = time.perf_counter()
            result = model.generate(PROMPT, max_tokens=tokens, seed=repeat, temperature=0.8)
            speeds.append(len(result.tokens) / (time.perf_counter() - start))
    return speeds


def raw_ratio(threads: int, n_seq: int, tokens: int) -> float:
    from bench_engine import raw_decode_tok_s

    from genarm_local.core.config import LoadConfig, resolve_base
    from genarm_local.core.native import Model

    with Model(resolve_base(None), LoadConfig(n_threads=threads)) as model:
        return round(raw_decode_tok_s(model, n_seq, tokens, threads) / raw_decode_tok_s(model, 1, tokens, threads), 2)


def concurrent(port: int, clients: int, tokens: int, seed: int) -> dict:
    results: list[dict] = [{}] * clients
    barrier = threading.Barrier(clients)

    def run(index: int) -> None:
        barrier.wait()
        results[index] = post(port, completion(tokens, seed + index, True), True)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    total = sum(tokens_of(result) for result in results)
    return {"clients": clients, "tokens": total, "seconds": round(wall, 3), "tok_s": round(total / wall, 2)}


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-clients", type=int, default=32)
    parser.add_argument("--load-requests", type=int, default=4)
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

    local = in_process_tok_s(args.threads, args.ctx, args.tokens, args.repeats)
    raw = raw_ratio(args.threads, args.clients, args.tokens)
    process, port = start_server(args.threads, args.clients, args.ctx)
    try:
        post(port, completion(4, 0, True), True)  # warm-up
        single = []
        for repeat in range(args.repeats):
            result = post(port, completion(args.tokens, repeat, True), True)
            single.append(tokens_of(result) / result["seconds"])
        server_tok_s, local_tok_s = statistics.median(single), statistics.median(local)
        record(
            "single_stream",
            {"server_tok_s": round(server_tok_s, 2), "in_process_tok_s": round(local_tok_s, 2),
             "server_vs_in_process": round(server_tok_s / local_tok_s, 3)},
        )  # fmt: skip
        one = concurrent(port, 1, args.tokens, 100)
        many = concurrent(port, args.clients, args.tokens, 200)
        ratio = round(many["tok_s"] / one["tok_s"], 2)
        record("concurrency", {"one_client": one, "clients": many, "ratio": ratio, "raw_llama_cpp_ratio": raw})
        load_test(port, args.load_clients, 1, args.load_tokens)  # warm-up: every kind of request once per client
        before = rss_mib(process.pid)
        load = load_test(port, args.load_clients, args.load_requests, args.load_tokens)
        deadline = time.monotonic() + 60
        while (state := health(port))[1].get("in_flight") and time.monotonic() < deadline:
            time.sleep(0.1)
        after = rss_mib(process.pid)
        load.update(
            alive=state[0] == 200 and process.poll() is None, in_flight_after=state[1].get("in_flight"),
            rss_mib_before=round(before, 1), rss_mib_after=round(after, 1), rss_growth_mib=round(after - before, 1),
        )  # fmt: skip
        record("load_test", load)
    finally:
        process.terminate()
        process.wait(30)
    write_stamped(args.out, report, stamp)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
