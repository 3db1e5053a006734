"""Before and after, side by side in one run: this checkout's speed against another checkout's (e.g. the commit
before a change), on the same machine at the same time, in alternating rounds.

    git worktree add ../before COMMIT && (cd ../before && python3 -m venv .venv && .venv/bin/pip install -e '.[demo]')
    python bench/compare_trees.py --other ../before [--rounds 2] [--out docs/compare.json]

Each round runs, in the other checkout and then in this one, each with its own .venv (an editable install, as the
bench scripts import the package from the checkout) and its own bench scripts (so that each measures its own code
the way its own benchmarks do):
- bench_engine.py: guided tokens/s (a full-model ARM and a LoRA ARM) against the sequential bound and the naive
  llama-cpp-python + numpy loop; generate_batch of 8 sequences against one;
- bench_serve.py: one stream through the server (guided and base), and 8 clients at once against one;
- `genarm-local batch` on 24 rows (the shipped positive ARM at its recommended α, 32 tokens each, --batch-size 8):
  generated tokens per second of wall time, model loading included.
Reported: each figure's median over the rounds in each checkout, and after / before. This machine is shared and
noisy: a ratio within ±10% is noise unless the rounds agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from stamp import measurement_stamp, write_stamped  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# (script, arguments, {figure: path into the script's printed JSON records})
ENGINE = {
    "guided tok/s, full-model ARM": ("full_model_arm", "guided_tok_s"),
    "guided / sequential bound, full-model ARM": ("full_model_arm", "ratio_to_bound"),
    "guided tok/s, LoRA ARM": ("lora_arm", "guided_tok_s"),
    "guided / sequential bound, LoRA ARM": ("lora_arm", "ratio_to_bound"),
    "guided (concurrent) tok/s, LoRA ARM": ("lora_arm", "concurrent_tok_s"),
    "guided / naive loop": ("ratio_to_naive",),
    "generate_batch of 8, tok/s": ("batch_lora_arm", "batch_tok_s"),
    "generate_batch 8 / 1": ("batch_lora_arm", "ratio"),
}
SERVE = {
    "server, one stream, guided tok/s": ("single_stream", "guided", "server_tok_s"),
    "server, one stream, base tok/s": ("single_stream", "base", "server_tok_s"),
    "server / in-process, guided": ("single_stream", "guided", "server_vs_in_process"),
    "server, 8 clients, guided tok/s": ("concurrency", "guided", "clients_tok_s"),
    "server, 8 clients / 1, guided": ("concurrency", "guided", "ratio"),
    "server, 8 clients, base tok/s": ("concurrency", "base", "clients_tok_s"),
    "server, 8 clients / 1, base": ("concurrency", "base", "ratio"),
    "server, 2 clients / 1, guided": ("concurrency", "guided", "few_ratio"),
}
SUBJECTS = ["the hotel", "the bus to work", "my neighbour", "the weekend", "the new phone", "the museum"]
FRAMES = ["Honestly, {} was", "When I think about {}, I", "Yesterday {} made me", "Everyone says {} is"]


def records(tree: Path, script: str, *args: str) -> dict:
    """Run bench/SCRIPT in ``tree`` with its own virtualenv; the JSON records it printed, merged."""
    command = [str(tree / ".venv" / "bin" / "python"), str(tree / "bench" / script), *args]
    out = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{script} failed in {tree}:\n{out.stderr[-2000:]}")
    merged: dict = {}
    for line in out.stdout.splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                merged.update(json.loads(line))
            except json.JSONDecodeError:
                pass
    return merged


def pick(data: dict, path: tuple) -> float:
    for key in path:
        data = data[key]
    return float(data)


def batch_tok_s(tree: Path, folder: Path) -> float:
    """`genarm-local batch` on 24 rows, in ``tree``: generated tokens per second of wall time."""
    rows = [
        {"id": i, "prompt": frame.format(s)} for i, (s, frame) in enumerate((s, f) for s in SUBJECTS for f in FRAMES)
    ]
    (folder / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = folder / f"out-{tree.name}.jsonl"
    out.unlink(missing_ok=True)
    command = [str(tree / ".venv" / "bin" / "genarm-local"), "batch", str(folder / "in.jsonl"), "-o", str(out)]
    start = time.perf_counter()
    # the ARM named: an older tree's batch ran the base alone by default
    options = ["--arm", "positive", "-n", "32", "--batch-size", "8", "--no-progress"]
    done = subprocess.run([*command, *options], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"batch failed in {tree}:\n{done.stderr[-2000:]}")
    tokens = sum(len(json.loads(line)["tokens"]) for line in out.read_text().split("\n") if line)
    return tokens / seconds


def measure(tree: Path, folder: Path) -> dict[str, float]:
    figures = {}
    engine = records(tree, "bench_engine.py", "--tokens", "64")
    figures.update({name: pick(engine, path) for name, path in ENGINE.items()})
    serve_out = folder / f"serve-{tree.name}.json"
    serve = records(tree, "bench_serve.py", "--repeats", "5", "--concurrency-repeats", "2", "--load-clients", "2",
                    "--load-requests", "1", "--load-rounds", "1", "--out", str(serve_out), "--allow-dirty")  # fmt: skip
    figures.update({name: pick(serve, path) for name, path in SERVE.items()})
    figures["batch CLI, 24 rows, tok/s"] = batch_tok_s(tree, folder)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the checkout to compare with (its own .venv)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (JSON)")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    stamp = measurement_stamp(args.allow_dirty) if args.out else None
    other = args.other.resolve()
    commit = lambda tree: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,  # noqa: E731
                                         text=True).stdout.strip()  # fmt: skip
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name, tree in (("before", other), ("after", REPO)):
                runs[name].append(measure(tree, Path(scratch)))
                print(json.dumps({"round": round_, name: runs[name][-1]}), flush=True)
    report = {"before": {"tree": str(other.name), "commit": commit(other)}, "after": {"commit": commit(REPO)},
              "rounds": args.rounds, "figures": {}}  # fmt: skip
    for figure in runs["after"][0]:
        before = statistics.median(run[figure] for run in runs["before"])
        after = statistics.median(run[figure] for run in runs["after"])
        report["figures"][figure] = {
            "before": round(before, 3),
            "after": round(after, 3),
            "after_over_before": round(after / before, 3),
            "rounds_before": [round(run[figure], 3) for run in runs["before"]],
            "rounds_after": [round(run[figure], 3) for run in runs["after"]],
        }
    width = max(map(len, report["figures"]))
    for figure, values in report["figures"].items():
        print(
            f"{figure:<{width}}  {values['before']:10.3f}  {values['after']:10.3f}  {values['after_over_before']:6.3f}"
        )
    if args.out:
        write_stamped(args.out, report, stamp)


if __name__ == "__main__":
    main()
