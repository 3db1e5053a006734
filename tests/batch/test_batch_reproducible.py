"""Same input, same text, on the real embedded model (Gemma-3-270M Q4_K_M with the shipped default ARMs) at default
settings: a batch run writes the same text for every row when rerun while another process keeps a core busy, when
killed and resumed (also with a group half-written), and on Ray with one or two replicas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import cli, run_cli

pytestmark = pytest.mark.slow

SUBJECTS = ["the hotel", "the bus to work", "my neighbour", "the weekend", "the new phone", "the museum"]
FRAMES = ["Honestly, {} was", "When I think about {}, I", "Yesterday {} made me", "Everyone says {} is"]
ARGS = ["-n", 24, "--batch-size", 8, "--no-progress"]


def rows() -> list[dict]:
    prompts = [frame.format(subject) for subject in SUBJECTS for frame in FRAMES]
    return [{"id": f"row{i}", "prompt": prompt} for i, prompt in enumerate(prompts)]


def texts(path: Path) -> dict[str, str]:
    return {row["id"]: row["text"] for row in map(json.loads, path.read_text(encoding="utf-8").split("\n")[:-1])}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reproducible")
    (folder / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows()), encoding="utf-8")
    first = run_cli("batch", "in.jsonl", "-o", "first.jsonl", *ARGS, cwd=folder, timeout=600)
    assert first.returncode == 0, first.stderr
    reference = texts(folder / "first.jsonl")
    assert len(reference) == 24 and len(set(reference.values())) == 24  # real, distinct continuations
    return folder, reference


def busy_core():
    """Another process keeping one core busy for as long as it runs."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_a_rerun_under_load_writes_the_same_text(job):
    folder, reference = job
    hog = busy_core()
    try:
        rerun = run_cli("batch", "in.jsonl", "-o", "loaded.jsonl", *ARGS, cwd=folder, timeout=900)
    finally:
        hog.kill()
        hog.wait()
    assert rerun.returncode == 0, rerun.stderr
    assert texts(folder / "loaded.jsonl") == reference


def test_a_killed_and_resumed_run_writes_the_same_text(job):
    folder, reference = job
    out = folder / "killed.jsonl"
    proc = subprocess.Popen(cli("batch", "in.jsonl", "-o", out, *ARGS), cwd=folder, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while (not out.exists() or out.read_text().count("\n") < 8) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 8 <= written < 24, "the run was not killed half-way"
    resumed = run_cli("batch", "in.jsonl", "-o", out, *ARGS, cwd=folder, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {written}" in resumed.stderr
    assert texts(out) == reference
    # a group half-written when the run died (its first 3 rows and a torn line): the group is redone whole, and
    # only its missing rows are written
    lines = (folder / "first.jsonl").read_text(encoding="utf-8").split("\n")
    half = folder / "half.jsonl"
    half.write_text("\n".join(lines[:11]) + '\n{"id": "row11", "text": "torn', encoding="utf-8")
    resumed = run_cli("batch", "in.jsonl", "-o", half, *ARGS, cwd=folder, timeout=600)
    assert resumed.returncode == 0 and "done 13, skipped 11" in resumed.stderr, resumed.stderr
    assert texts(half) == reference


@pytest.mark.parametrize("replicas", [1, 2])
def test_ray_writes_what_the_local_backend_writes(job, replicas):
    pytest.importorskip("ray")
    folder, reference = job
    out = f"ray{replicas}.jsonl"
    # two replicas share this 2-core machine: one thread each
    threads = ["--threads-per-replica", 1] if replicas == 2 else []
    env = dict(os.environ, RAY_DATA_LOG_LEVEL="ERROR")
    result = run_cli("batch", "in.jsonl", "-o", out, *ARGS, "--ray", "--replicas", replicas, *threads, cwd=folder,
                     env=env, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{replicas} replicas" in result.stderr.strip().splitlines()[-1]
    assert texts(folder / out) == reference
    assert list(texts(folder / out)) == list(reference)  # OUT in input order, as locally
