"""Characters that str.splitlines() treats as line breaks (U+2028, U+2029, U+0085, U+000B, U+000C, U+001C-U+001E),
in prompts and in generated text (forced by a grammar): a batch run writes them, reads its own OUT back on a rerun,
resumes after a torn write, writes Parquet, and the text round-trips."""

from __future__ import annotations

import json

import pytest
from cli_helpers import EXACT, model_files, run_cli

BREAKERS = "\u2028\u2029\u0085\u000b\u000c\u001c\u001d\u001e"
FORCED = "".join(f"{letter}{char}" for letter, char in zip("abcdefgh", BREAKERS, strict=True)) + "z"
GRAMMAR = 'root ::= "' + "".join(f"\\u{ord(c):04X}" if c in BREAKERS else c for c in FORCED) + '"'


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


def jsonl_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def job(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("breakers")
    rows = [{"id": f"r{i}", "prompt": f"The history{BREAKERS[i % len(BREAKERS)]} of the bicycle {i}"} for i in range(5)]
    (folder / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (folder / "grammar.gbnf").write_text(GRAMMAR, encoding="utf-8")
    args = ["-m", files["base"], "--arm", f"kind={files['lora']}:1.0", "-n", 64, "--batch-size", 2, *EXACT]
    args += ["--grammar-file", "grammar.gbnf", "--no-progress"]
    return folder, args


def test_jsonl_out_rerun_and_resume(job):
    folder, args = job
    out = folder / "out.jsonl"
    first = run_cli("batch", "in.jsonl", "-o", out, *args, cwd=folder)
    assert first.returncode == 0, first.stderr
    rows = jsonl_rows(out)
    assert [row["text"] for row in rows] == [FORCED] * 5
    assert any(char in out.read_text(encoding="utf-8") for char in "\u2028\u0085")  # written raw, not escaped
    again = run_cli("batch", "in.jsonl", "-o", out, *args, cwd=folder)  # reads its own OUT back
    assert again.returncode == 0 and "skipped 5" in again.stderr, again.stderr
    # killed mid-write: two rows and a torn third, whose text holds the characters
    torn = json.dumps(rows[2], ensure_ascii=False)[:-30]
    resumed_out = folder / "resumed.jsonl"
    kept = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[:2])
    resumed_out.write_text(kept + torn, encoding="utf-8")
    resumed = run_cli("batch", "in.jsonl", "-o", resumed_out, *args, cwd=folder)
    assert resumed.returncode == 0 and "done 3, skipped 2" in resumed.stderr, resumed.stderr
    assert jsonl_rows(resumed_out) == rows


def test_parquet_out(job):
    parquet = pytest.importorskip("pyarrow.parquet")
    folder, args = job
    out = folder / "out.parquet"
    result = run_cli("batch", "in.jsonl", "-o", out, *args, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert [record["text"] for record in parquet.read_table(out).to_pylist()] == [FORCED] * 5
    again = run_cli("batch", "in.jsonl", "-o", out, *args, cwd=folder)
    assert again.returncode == 0 and "skipped 5" in again.stderr, again.stderr
