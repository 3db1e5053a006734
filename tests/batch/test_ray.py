"""`genarm-local batch --ray` on a local Ray instance (2 CPUs, shared by the module): the text is the local backend's
for the same rows and seeds, two replicas share the rows, a killed replica or a killed driver still ends with every
id exactly once; directories of shards and Parquet in and out; bad setups are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import EXACT, PROMPT, cli, model_files, run_cli

ray = pytest.importorskip("ray")

ROWS = 24
REPLICA_TITLE = b"ray::MapWorker(MapBatches(Replica))"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray puts the driver's working directory on its workers' sys.path: start it outside the source tree, so that
    # the workers import the installed package (with its compiled kernel), as the tests' own process does.
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    finally:
        os.chdir(cwd)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


def input_rows() -> list:
    question = [{"role": "user", "content": "Tell me about the bicycle."}]
    rows: list = [{"id": f"r{i}", "prompt": f"{PROMPT}, part {i}"} for i in range(ROWS)]
    rows[5] = '{"id": "r5", "prompt": "a torn'  # not JSON: an error row known by its line number, 6
    rows[8] = {"id": "r8", "prompt": PROMPT, "weights": {"nobody": 1}}  # fails validation on the replica
    rows[11] = {"id": "r11", "messages": question, "temperature": 0, "max_tokens": 6}
    rows[14] = {"prompt": PROMPT + " again", "seed": 123, "weights": {"kind": 0}}
    rows[17] = {"id": "r17", "prompt": PROMPT, "stop": ["\n", "."], "top_k": 5}
    return rows


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(rows: list[dict]) -> dict:
    assert len({json.dumps(row["id"]) for row in rows}) == len(rows), "an id twice"
    return {json.dumps(row["id"]): row for row in rows}


@pytest.fixture(scope="module")
def job(files, tmp_path_factory):
    """The input, the command's arguments, and what the local backend writes for them."""
    folder = tmp_path_factory.mktemp("job")
    write_jsonl(folder / "in.jsonl", input_rows())
    args = ["-m", files["base"], "--arm", f"kind={files['lora']}:1.5", "-n", 32, "--batch-size", 2, *EXACT]
    local = run_cli("batch", "in.jsonl", "-o", "local.jsonl", *args, "--no-progress", cwd=folder)
    assert local.returncode == 1, local.stderr  # two rows fail
    reference = by_id(read_jsonl(folder / "local.jsonl"))
    assert len(reference) == ROWS and sum("error" in row for row in reference.values()) == 2
    return folder, args, reference


def run_ray(folder: Path, *args, capsys) -> tuple[int, str]:
    """The real command line in this process, on the module's Ray instance."""
    from genarm_local.cli import main

    status = main(["batch", *map(str, args), "--no-progress"])
    return status, capsys.readouterr().err


def replica_pids() -> list[int]:
    """The processes of the Replica actors (Ray names each actor's process after its class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(REPLICA_TITLE):
                pids.append(int(entry.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def test_two_replicas_write_what_the_local_backend_writes(cluster, job, capsys):
    folder, args, reference = job
    out = folder / "two.jsonl"
    status, err = run_ray(folder, folder / "in.jsonl", "-o", out, *args, "--ray", "--replicas", 2, capsys=capsys)
    assert status == 1, err
    summary = err.strip().splitlines()[-1]
    assert "done 22, skipped 0 (already in OUT), failed 2; on Ray, 2 replicas × 1 thread" in summary
    shares = [int(n) for n in summary.split("rows per replica: ")[1].rstrip(")").split(", ")]
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == ROWS  # whole groups, unparsable rows included
    rows = read_jsonl(out)
    assert by_id(rows) == reference  # same text, tokens, settings and seeds; same error rows
    assert [row["line"] for row in rows] == sorted(row["line"] for row in rows)  # OUT in input order
    assert "nobody" in reference['"r8"']["error"] and "not JSON" in reference["6"]["error"]


def test_a_killed_replica_loses_only_its_rows(cluster, job, capsys):
    folder, args, reference = job
    out = folder / "killed.jsonl"
    killed: list[tuple[int, int]] = []
    earlier = set(replica_pids())  # actors of the previous runs, maybe still shutting down

    def kill_one_replica_mid_run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = out.read_text().count("\n") if out.exists() else 0
            pids = sorted(set(replica_pids()) - earlier)
            if done >= 3 and len(pids) == 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], done))
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_replica_mid_run)
    killer.start()
    status, err = run_ray(folder, folder / "in.jsonl", "-o", out, *args, "--ray", "--replicas", 2, capsys=capsys)
    killer.join()
    assert killed and killed[0][1] < ROWS, f"no replica was killed mid-run: {killed}"
    assert status == 1, err
    assert by_id(read_jsonl(out)) == reference  # every id once, the same text as without the kill


def test_resume_after_the_driver_is_killed(cluster, job, capsys):
    folder, args, reference = job
    out = folder / "resumed.jsonl"
    command = cli("batch", "in.jsonl", "-o", out, *args, "--ray", cluster, "--replicas", 1)
    driver = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 4) and time.monotonic() < deadline:
        time.sleep(0.005)
    driver.send_signal(signal.SIGKILL)
    assert driver.wait() == -signal.SIGKILL
    first = by_id(read_jsonl(out))
    assert 4 <= len(first) < ROWS, "the driver was not killed half-way"
    with open(out, "a") as sink:  # what a kill in the middle of a write leaves behind
        sink.write('{"id": "r23", "text": "half a ro')

    status, err = run_ray(folder, folder / "in.jsonl", "-o", out, *args, "--ray", capsys=capsys)
    assert status == 1, err
    assert f"skipped {len(first)} (already in OUT)" in err
    final = by_id(read_jsonl(out))
    assert final == reference and all(final[key] == row for key, row in first.items())


def test_shards_and_parquet(cluster, job, capsys):
    """A directory of a JSONL and a Parquet shard is the same job as one file: same lines, seeds and text."""
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    folder, args, reference = job
    shards = folder / "shards"
    shards.mkdir()
    rows = input_rows()
    write_jsonl(shards / "part-0.jsonl", rows[:10])
    # Parquet gives every record every column: the nulls must not become settings (nor ARMs in "weights")
    columns = sorted({key for row in rows[10:] for key in row})
    table = pyarrow.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows[10:]])
    parquet.write_table(table, shards / "part-1.parquet")
    out = folder / "out.parquet"
    status, err = run_ray(folder, shards, "-o", out, *args, "--ray", capsys=capsys)
    assert status == 1, err
    assert not (folder / "out.parquet.partial.jsonl").exists()
    written = parquet.read_table(out).to_pylist()
    records = [dict(record) for record in written]
    assert [record["line"] for record in records] == list(range(1, ROWS + 1))
    expected = {str(row["id"]): row for row in reference.values()}  # ids are text when any id is text
    assert len(records) == len(expected) == ROWS
    for record in records:
        settings = json.loads(record.pop("settings")) if record["settings"] else None
        result = {key: value for key, value in dict(record, settings=settings).items() if value is not None}
        assert result == dict(expected[record["id"]], id=record["id"])

    status, err = run_ray(folder, shards, "-o", out, *args, "--ray", capsys=capsys)  # a finished job: nothing to do
    assert status == 1 and f"skipped {ROWS} (already in OUT)" in err, err
    assert parquet.read_table(out).to_pylist() == written


def test_bad_setups_are_one_line_errors(cluster, job, capsys, monkeypatch):
    folder, args, _ = job
    missing = folder / "nope.gguf"
    status, err = run_ray(folder, folder / "in.jsonl", "-o", folder / "x.jsonl", "-m", missing, "--ray", capsys=capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert str(missing) in err and "every node" in err
    assert not (folder / "x.jsonl").exists()
    status, err = run_ray(folder, folder / "in.jsonl", "-o", folder / "x.jsonl", *args, "--ray", "--replicas", 3,
                          capsys=capsys)  # fmt: skip
    assert status == 2 and "--replicas 3" in err and "2 CPUs" in err, err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [ray] extra were not installed
    status, err = run_ray(folder, folder / "in.jsonl", "-o", folder / "x.jsonl", *args, "--ray", capsys=capsys)
    assert status == 2 and "pip install 'genarm-local[ray]'" in err, err
    monkeypatch.undo()
    deadline = time.monotonic() + 30  # the failed runs left no actor holding the cluster's CPUs
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2


def test_line_breaking_characters_round_trip(cluster, files, tmp_path, capsys):
    """U+2028 and the other characters str.splitlines() cuts at, in prompts and in text a grammar forces, through the
    replicas, the driver's OUT and its final rewrite in input order."""
    from test_text_safety import BREAKERS, FORCED, GRAMMAR

    rows = [{"id": f"r{i}", "prompt": f"The history{BREAKERS[i % len(BREAKERS)]} of the bicycle {i}"} for i in range(4)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    (tmp_path / "grammar.gbnf").write_text(GRAMMAR, encoding="utf-8")
    args = ["-m", files["base"], "-n", 64, "--batch-size", 2, *EXACT, "--grammar-file", tmp_path / "grammar.gbnf"]
    out = tmp_path / "out.jsonl"
    status, err = run_ray(tmp_path, tmp_path / "in.jsonl", "-o", out, *args, "--ray", "--replicas", 2, capsys=capsys)
    assert status == 0, err
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [row["id"] for row in written] == [row["id"] for row in rows]
    assert [row["text"] for row in written] == [FORCED] * 4
