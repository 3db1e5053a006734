"""Which weights of a long training run make the best ARM, and can a measure without a judge tell? (issue 21)

    python bench/checkpoint_candidates.py --task brief --steps 12 18 24 [--out docs/checkpoint_candidates.json]
    python bench/checkpoint_candidates.py --table [--out FILE]

Trains the task of bench/preference_tasks.py as preference_bench.py's "3× steps" run does (`--epochs 3
--min-steps 48`), keeping the LoRA weights of the held-out evaluations at --steps (evaluations fall every 6 steps
there). Each is exported as a GGUF adapter and calibrated as `train --export` calibrates (on the task's training
prompts), then measured as preference_bench.py measures, with 4 continuations of every held-out prompt (96 texts):
the preferred behaviour's rate at the recommended α (what a person gets), beside two judge-free signals a training
run could compute: KL(p_α ‖ p_base) at the recommended α, from the calibration alone — how far the ARM moves the
text while it stays as fluent as the base's —, and the held-out preference under the guided distribution — over the
run's own held-out pairs (train's split), how much more the distribution the user samples at the recommended α
prefers the chosen response to the rejected one than the base does: the mean of
(log p_α(y_w|x) − log p_α(y_l|x)) − (log p_base(y_w|x) − log p_base(y_l|x)), summed over response tokens.
A checkpoint selection by a signal is right when it ranks the checkpoints as the rate does. --arms adds ARMs made
elsewhere (e.g. the bench's defaults ARM, calibrated) to the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and llama.cpp in one process

from preference_bench import RUNS, SAMPLES, SEED, write_json  # noqa: E402
from preference_tasks import TASKS  # noqa: E402
from stamp import describe, measurement_stamp  # noqa: E402
from train_experiments import calibrate_arm, measure  # noqa: E402


def train_keeping(task, steps: set[int], work: Path) -> dict:
    """The 3×-steps run of ``task`` in ``work``, with the weights of the evaluations at ``steps`` saved as PEFT
    adapters (work/step-N). The run's own choice (lowest held-out loss) is in its log."""
    from genarm_local.train import TrainConfig, train
    from genarm_local.train.run import Run

    evaluate = Run._evaluate_and_select

    def keeping(run: Run, write):
        stop = evaluate(run, write)
        if run.step in steps:
            run.model.save_pretrained(str(work / f"step-{run.step}"))
        return stop

    Run._evaluate_and_select = keeping  # an experiment's hook; the product keeps only the selected weights
    try:
        config = TrainConfig(data=task.pairs, output=str(work / "run"), progress=False, calibrate=False,
                             **RUNS["3× steps"])  # fmt: skip
        result = train(config)
    finally:
        Run._evaluate_and_select = evaluate
    return {"steps": result.steps, "selected_step": result.selected_step, "evaluations": result.evaluations}


def guided_preference(model, task, alpha: float) -> float:
    """The held-out preference under the guided distribution at ``alpha`` (module docstring), on the held-out pairs
    of `train`'s split: the API's own log-probs (GuidedModel.next_token_logprobs, normalized: the distribution the
    default sampling draws from at T = 1, as scale_temperature gives it) against the base's."""
    import llama_cpp as lc

    from genarm_local.train.config import TrainConfig, split

    (arm,) = model.arm_weights()
    eos = lc.llama_vocab_eos(model.engine.base_model.vocab)  # train ends string responses with EOS by default

    def logp(tokens: list[int], start: int, weight: float) -> float:
        rows = (
            model.next_token_logprobs(tokens[:i], {arm: weight}, normalized=True) for i in range(start, len(tokens))
        )
        return sum(float(row[token]) for row, token in zip(rows, tokens[start:], strict=True))

    _, held_out = split(task.pairs, TrainConfig.eval_split, TrainConfig.seed)
    gains = []
    for pair in held_out:
        prompt = model.tokenize(pair["prompt"])
        chosen, rejected = (
            prompt + model.tokenize(r, add_special=False) + [eos] for r in (pair["chosen"], pair["rejected"])
        )
        gains.append(sum(sign * (logp(seq, len(prompt), alpha) - logp(seq, len(prompt), 0.0))
                         for sign, seq in ((1, chosen), (-1, rejected))))  # fmt: skip
    return float(np.mean(gains))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="brief")
    parser.add_argument("--steps", type=int, nargs="+", default=[12, 18, 24])
    parser.add_argument("--out", default="docs/checkpoint_candidates.json")
    parser.add_argument(
        "--work",
        type=Path,
        help="keep the run and the adapters here (default: a temporary folder); "
        "a folder of an earlier run is reused: its training and its calibrated checkpoints",
    )
    parser.add_argument("--arms", nargs="*", default=[], type=Path, help="calibrated ARMs to measure beside them")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    records = json.loads(out.read_text())["tasks"] if out.is_file() else {}
    if args.table:
        print(table(records))
        return
    stamp = measurement_stamp(args.allow_dirty)
    started = time.time()

    from genarm_local.convert import convert

    from genarm_local import GuidedModel
    from genarm_local.core.arm_metadata import interpolate_kl, read_calibration
    from genarm_local.core.config import resolve_base

    task = TASKS[args.task]()
    with tempfile.TemporaryDirectory(prefix="genarm-ckpt-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        record = work / "training.json"  # a --work folder of an earlier run: its run and adapters are reused
        if record.is_file():
            training = json.loads(record.read_text())
        else:
            training = train_keeping(task, set(args.steps), work)
            record.write_text(json.dumps(training) + "\n")
        missing = [step for step in args.steps if not (work / f"step-{step}").is_dir()]
        if missing:
            sys.exit(f"no held-out evaluation at step(s) {missing}: evaluations fell at "
                     f"{[e['step'] for e in training['evaluations']]}")  # fmt: skip
        with GuidedModel(arms={}, n_ctx=4096, seed=SEED) as model:
            base = measure(model, task, 0.0, SEED, samples=SAMPLES)
        rows = []
        for step in [*args.steps, *args.arms]:
            if isinstance(step, Path):  # made elsewhere, calibrated
                arm, evaluation = step, {"loss": float("nan"), "margin": float("nan")}
                calibration = vars(read_calibration(arm))
            else:
                arm = work / f"step-{step}.gguf"
                if arm.is_file() and read_calibration(arm) is not None:  # converted and calibrated before
                    calibration = vars(read_calibration(arm))
                else:
                    convert(resolve_base(None), arm, lora=work / f"step-{step}", adapter_only=True, force=True,
                            progress=False)  # fmt: skip
                    calibration = calibrate_arm(task, arm, 0, None)["calibration"]
                evaluation = next(e for e in training["evaluations"] if e["step"] == step)
            alpha = calibration["recommended_alpha"]
            with GuidedModel(arms={str(arm): None}, n_ctx=4096, seed=SEED) as model:
                guided = measure(model, task, alpha, SEED, samples=SAMPLES)
                preference = guided_preference(model, task, alpha)
            label = f"{step.parent.name}/{step.name}" if isinstance(step, Path) else step  # no machine path
            rows.append({"step": label, "eval_loss": evaluation["loss"],
                         "eval_margin": evaluation["margin"], "alpha": alpha,
                         "kl_at_alpha": interpolate_kl(calibration["alphas"], calibration["kl"], alpha),
                         "guided_preference": preference,
                         **{k: v for k, v in guided.items() if k != "examples"}})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    records[args.task] = {"stamp": stamp, "minutes": round((time.time() - started) / 60, 1), "base": base,
                          "run_kept": training["selected_step"], "steps": training["steps"], "rows": rows}  # fmt: skip
    write_json(out, {"tasks": records})
    print(table(records))


def table(records: dict) -> str:
    lines = []
    for name, record in records.items():
        base = record["base"]
        lines += [f"\n{name}, 3× steps ({record['steps']} steps; the held-out loss kept step {record['run_kept']}); "
                  f"_{describe(record['stamp'])}, {record['minutes']} min_; base alone: feature {base['feature']:.2f}, "
                  f"distinct-2 {base['distinct_2']:.3f}, rep-4 {base['rep_4']:.3f}\n",
                  "| step | held-out loss | margin β·Δ | recommended α | KL at α (nats/token) | "
                  "guided held-out preference (nats) | feature | distinct-2 | rep-4 | degenerate |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in record["rows"]:
            made_elsewhere = math.isnan(r["eval_loss"])  # an --arms row: no evaluation of this run
            loss = "—" if made_elsewhere else f"{r['eval_loss']:.4f}"
            margin = "—" if made_elsewhere else f"{r['eval_margin']:.2f}"
            lines.append(f"| {r['step']} | {loss} | {margin} | {r['alpha']:.3g} | "
                         f"{r['kl_at_alpha']:.3f} | {r.get('guided_preference', math.nan):.1f} | "
                         f"{r['feature']:.2f} | {r['distinct_2']:.3f} | {r['rep_4']:.3f} | "
                         f"{r['degenerate']:.2f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
