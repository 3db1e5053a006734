"""Continuous batching through the server: 8 concurrent streaming clients, each with its own prompt, seed and ARM
weights, get exactly the tokens each gets alone (exact settings: f32 KV cache, no flash attention, one thread)."""

from __future__ import annotations

import threading
import time

import pytest
from cli_helpers import EXACT

PROMPTS = [
    "The history of the bicycle",
    "Early designs had no pedals",
    "Cycling became popular with people of all ages, and",
    "In the city",
    "Roads were",
    "The first race",
    "A new kind of frame",
    "Tyres filled with air",
]
WEIGHTS = [{"kind": 1.0}, {"kind": 0.0}, {"kind": 2.0, "big": 0.5}, {"kind": -0.5}, {}, {"big": 1.0}, {"kind": 0.3}, {}]


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    from conftest import running_server

    cwd = tmp_path_factory.mktemp("serve-concurrency")
    arms = ["--arm", f"kind={files['lora']}:1.0", "--arm", f"big={files['big']}:0.0"]
    with running_server("-m", files["base"], *arms, *EXACT, "-c", 128, "-np", 8, cwd=cwd) as running:
        yield running


def stream(server, index: int, times: dict | None = None, client=None) -> str:
    """Client ``index``: a streamed completion (even) or chat reply (odd) with its own seed and weights."""
    client = client or server.client()
    options = dict(
        model="", max_tokens=40, temperature=1.0, top_p=1.0, seed=1000 + index, stream=True,
        extra_body={"top_k": 0, "min_p": 0.0, "arms": WEIGHTS[index]},
    )  # fmt: skip
    if times is not None:
        times[index] = [time.monotonic(), None]
    if index % 2:
        chunks = client.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[index]}], **options)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    else:
        chunks = client.completions.create(prompt=PROMPTS[index], **options)
        text = "".join(chunk.choices[0].text for chunk in chunks)
    if times is not None:
        times[index][1] = time.monotonic()
    return text


def test_eight_concurrent_streams_equal_each_alone(server):
    alone = [stream(server, index) for index in range(8)]
    assert len(set(alone)) == 8 and all(alone)
    together: list[str | None] = [None] * 8
    times: dict[int, list] = {}
    start = threading.Barrier(8)

    def client(index: int) -> None:
        openai_client = server.client()
        start.wait()
        together[index] = stream(server, index, times, openai_client)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    differ = {index: (alone[index], together[index]) for index in range(8) if together[index] != alone[index]}
    assert not differ, differ
    # they really ran together: the streams' durations add up to several times the wall time they took
    wall = max(end for _, end in times.values()) - min(begin for begin, _ in times.values())
    assert sum(end - begin for begin, end in times.values()) > 3 * wall, times
