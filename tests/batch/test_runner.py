"""The real `genarm-local batch`: killed with SIGKILL and rerun, every input id ends up in OUT exactly once with
the text an uninterrupted run writes; bad rows become error rows; per-row settings; bad input files."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from cli_helpers import EXACT, PROMPT, assert_one_line_error, cli, model_files, run_cli


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


def write_jsonl(path, rows: list) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigkill_then_rerun_gives_every_id_once(files, tmp_path):
    rows: list = [{"id": f"r{i}", "prompt": f"{PROMPT}, part {i}"} for i in range(80)]
    rows[17] = '{"id": "r17", "prompt": "a torn'  # a malformed line: an error row, known by its line number
    write_jsonl(tmp_path / "in.jsonl", rows)
    expected_ids = {f"r{i}" for i in range(80)} - {"r17"} | {18}
    out = tmp_path / "out.jsonl"
    args = ["batch", "in.jsonl", "-o", out, "-m", files["base"], "--arm", files["lora"], "-n", 48, "--batch-size", 2]
    proc = subprocess.Popen(cli(*args, *EXACT), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 6) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    first = read_jsonl(out)
    assert 6 <= len(first) < 80, "the run was not killed half-way"
    with open(out, "a") as sink:  # what a kill in the middle of a write leaves behind
        sink.write('{"id": "r79", "text": "half a ro')

    rerun = run_cli(*args, *EXACT, cwd=tmp_path)
    assert rerun.returncode == 1, rerun.stderr  # the malformed row failed
    summary = rerun.stderr.strip().splitlines()[-1]
    earlier = sum("error" in row for row in first)  # the malformed row, written with its group if that came first
    done = f"done {80 - len(first) - (1 - earlier)}, skipped {len(first)} (already in OUT), failed {1 - earlier}"
    assert done + ("; 1 earlier" if earlier else "") in summary, summary
    final = read_jsonl(out)
    ids = [row["id"] for row in final]
    assert sorted(map(str, ids)) == sorted(map(str, expected_ids)) and len(ids) == len(set(ids)) == 80
    assert final[: len(first)] == first  # nothing written before the kill was lost or changed
    error = next(row for row in final if "error" in row)
    assert error["id"] == 18 and error["line"] == 18 and "not JSON" in error["error"]

    again = run_cli(*args, *EXACT, cwd=tmp_path)
    assert again.returncode == 1 and "skipped 80" in again.stderr and read_jsonl(out) == final
    # a resumed run writes what an uninterrupted one writes: every row has its own seed
    fresh = tmp_path / "fresh.jsonl"
    assert run_cli(*args[:3], fresh, *args[4:], *EXACT, "--no-progress", cwd=tmp_path).returncode == 1
    text = lambda rows: {row["id"]: row.get("text") for row in rows}  # noqa: E731
    assert text(read_jsonl(fresh)) == text(final)


def test_rows_carry_their_own_settings(files, tmp_path):
    question = [{"role": "user", "content": "Tell me about the bicycle."}]
    rows = [
        {"id": "plain", "prompt": PROMPT},
        {"id": "unguided", "prompt": PROMPT, "weights": {"kind": 0}, "temperature": 0},
        {"id": "chat", "messages": question, "temperature": 0, "max_tokens": 6},
        {"id": "seeded", "prompt": PROMPT, "seed": 123, "stop": ["\n"]},
        {"id": "bad-weights", "prompt": PROMPT, "weights": {"nobody": 1}},
        {"id": "bad-type", "prompt": PROMPT, "temperature": "hot"},
        {"id": "typo", "prompt": PROMPT, "temprature": 0.5},
        {"id": "too-long", "prompt": PROMPT * 600},
        {"prompt": PROMPT + " again"},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["-m", files["base"], "-n", 10, *EXACT]
    arm = ["--arm", f"kind={files['lora']}:1.5"]
    result = run_cli("batch", "in.jsonl", "-o", "out.jsonl", *common, *arm, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "done 5, skipped 0 (already in OUT), failed 4" in result.stderr
    out = {row["id"]: row for row in read_jsonl(tmp_path / "out.jsonl")}
    assert set(out) == {"plain", "unguided", "chat", "seeded", "bad-weights", "bad-type", "typo", "too-long", 9}
    assert "nobody" in out["bad-weights"]["error"] and out["bad-weights"]["line"] == 5
    assert "temperature" in out["bad-type"]["error"] and "temprature" in out["typo"]["error"]
    assert "context" in out["too-long"]["error"]
    plain = out["plain"]["settings"]
    assert plain["seed"] == 1 and plain["weights"] == {"kind": 1.5} and plain["temperature"] == 0.8  # seed 0 + line
    assert out["seeded"]["settings"]["seed"] == 123 and "\n" not in out["seeded"]["text"]
    assert out["chat"]["settings"]["max_tokens"] == 6 and len(out["chat"]["tokens"]) <= 6
    generate = lambda *args: run_cli("generate", *common, "--temp", 0, *args, cwd=tmp_path).stdout  # noqa: E731
    assert out["unguided"]["text"] + "\n" == generate("-p", PROMPT, "--no-arm")
    assert out["unguided"]["settings"]["weights"] == {"kind": 0.0}
    assert out["chat"]["text"] + "\n" == generate("--chat", "-p", question[0]["content"], "-n", 6, *arm)
    sampled = run_cli("generate", *common, "-p", PROMPT, *arm, "--seed", 1, cwd=tmp_path)
    assert out["plain"]["text"] + "\n" == sampled.stdout  # batched = one at a time with the row's seed
    # line 9 ran in the second group of 8 rows, with its own seed: --seed + 9
    again = run_cli("generate", *common, "-p", PROMPT + " again", *arm, "--seed", 9, cwd=tmp_path)
    assert out[9]["settings"]["seed"] == 9 and out[9]["text"] + "\n" == again.stdout


def test_bad_input_files(files, tmp_path):
    base = ["-m", files["base"], "-n", 4]
    write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a"}, {"prompt": "b"}, {"id": 1, "prompt": "c"}])
    result = run_cli("batch", "dup.jsonl", "-o", "out.jsonl", *base, cwd=tmp_path)
    assert_one_line_error(result, "id 1", "lines 1 and 3")
    assert not (tmp_path / "out.jsonl").exists()  # refused before any work
    (tmp_path / "binary.jsonl").write_bytes(files["base"].read_bytes()[:4096])
    assert_one_line_error(run_cli("batch", "binary.jsonl", "-o", "out.jsonl", *base, cwd=tmp_path), "binary.jsonl")
    (tmp_path / "text.jsonl").write_text("just some text\nand more\n")
    assert_one_line_error(run_cli("batch", "text.jsonl", "-o", "out.jsonl", *base, cwd=tmp_path), "JSONL")
    assert_one_line_error(run_cli("batch", "nope.jsonl", "-o", "out.jsonl", *base, cwd=tmp_path), "nope.jsonl")
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a"}])
    (tmp_path / "foreign.jsonl").write_text("not ours\n{}\n")
    result = run_cli("batch", "ok.jsonl", "-o", "foreign.jsonl", *base, cwd=tmp_path)
    assert_one_line_error(result, "foreign.jsonl", "line 1")
    result = run_cli("batch", "ok.jsonl", "-o", "new.jsonl", "-m", tmp_path / "nope.gguf", cwd=tmp_path)
    assert_one_line_error(result, "nope.gguf")
    assert not (tmp_path / "new.jsonl").exists()
