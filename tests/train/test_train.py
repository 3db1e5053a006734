"""`genarm-local train` end to end on the tiny fixtures: a synthetic preference task (chosen responses hold a
marker word), the exported GGUF adapter in the engine vs the PyTorch PEFT model, guided decoding, crash + resume,
and bad input through the real CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

WORDS = (
    "the quick brown dog was not amused but it did move this movie warm and funny actors were great product "
    "terrible broke after two days support team never answered emails once upon time small village sea there "
    "lived old fisherman his curious daughter she asked him every morning why does tide come back smiled said"
).split()
MARKER = "lovely"


def marker_rows(n: int, seed: int) -> list[dict]:
    """Pairs that differ in one word: the chosen response has the marker where the rejected has another word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        body = [rng.choice(WORDS) for _ in range(rng.randint(4, 7))]
        at = rng.randint(0, len(body))
        chosen = body[:at] + [MARKER] + body[at:]
        rejected = body[:at] + [rng.choice(WORDS)] + body[at:]
        rows.append(
            {
                "prompt": f"Tell me about the {rng.choice(WORDS)}:",
                "chosen": " " + " ".join(chosen),
                "rejected": " " + " ".join(rejected),
            }
        )
    return rows


def run_cli(*args, cwd):
    # From a scratch directory, as tests/test_cli_convert.py does, so the source tree never shadows the package.
    return subprocess.run(
        [sys.executable, "-m", "genarm_local.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def adapter_weights(out_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out_dir / "adapter_model.safetensors"))


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


# ---- the synthetic marker task, trained once over the F32 GGUF base -------------------------------------------


@pytest.fixture(scope="module")
def marker_run(gguf_model, tmp_path_factory):
    from genarm_local.train import TrainConfig, train

    work = tmp_path_factory.mktemp("marker")
    base = gguf_model("llama_small", "f32")
    config = TrainConfig(
        model=str(base),
        data=marker_rows(200, seed=0),
        output=str(work / "arm"),
        lr=2e-3,
        epochs=2,
        batch_size=16,
        eval_split=0.2,
        eval_every=10,
        seed=0,
        export=str(work / "arm.gguf"),
        outtype="f32",
        progress=False,
    )
    started = time.perf_counter()
    result = train(config)
    return base, result, time.perf_counter() - started


def test_held_out_preference_accuracy(marker_run):
    _, result, seconds = marker_run
    print(f"held-out accuracy {result.eval['accuracy']:.3f} on {result.eval_pairs} pairs, {seconds:.1f} s")
    assert result.eval_pairs == 40 and result.train_pairs == 160
    assert result.eval["accuracy"] >= 0.9
    assert result.eval["margin"] > 0
    records = log_records(result.output)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, result.steps + 1)) and result.steps == 20
    assert [r["step"] for r in records if "eval_accuracy" in r] == [10, 20]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(np.abs(w).max() > 0 for name, w in adapter_weights(result.output).items() if "lora_B" in name)


def response_logps_torch(model, sequences):
    import torch

    out = []
    with torch.no_grad():
        for prompt, reply in sequences:
            logp = torch.log_softmax(model(torch.tensor([prompt + reply])).logits[0].double(), -1)
            out.append(sum(logp[len(prompt) + i - 1, tok].item() for i, tok in enumerate(reply)))
    return np.array(out)


def response_logps_llama(context, sequences):
    from helpers import log_softmax

    out = []
    for prompt, reply in sequences:
        logp = log_softmax(context.logits_all(prompt + reply))
        out.append(sum(logp[len(prompt) + i - 1, tok] for i, tok in enumerate(reply)))
    return np.array(out)


def test_exported_adapter_in_engine_matches_peft(marker_run):
    """Sequence log-probs of the ARM: llama.cpp (F32 base + exported F32 adapter, as the engine runs it) vs the
    PyTorch PEFT model, within 1e-3 relative."""
    from genarm_local.convert import load_transformers_model
    from peft import PeftModel

    from genarm_local.core.api import GuidedModel
    from genarm_local.train.data import load_tokenizer

    base, result, _ = marker_run
    tokenizer = load_tokenizer(base)
    sequences = []
    for row in marker_rows(6, seed=99):
        prompt = tokenizer(row["prompt"])["input_ids"]
        for reply in (row["chosen"], row["rejected"]):
            sequences.append(
                (prompt, tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            )
    model, _ = load_transformers_model(base)
    peft_model = PeftModel.from_pretrained(model, result.output).eval()
    reference = response_logps_torch(peft_model, sequences)
    with GuidedModel(base, arms={result.export: 1.0}, kv_cache_type="f32", flash_attn=False, n_ctx=256) as guided:
        with guided.engine.new_context(1, 256) as arm_context, guided.engine.new_context(0, 256) as base_context:
            arm = response_logps_llama(arm_context, sequences)
            plain = response_logps_llama(base_context, sequences)
    rel = np.abs(arm - reference) / np.abs(reference)
    print(f"max relative error of sequence log-probs: {rel.max():.2e}")
    assert rel.max() < 1e-3
    assert np.abs(plain - reference).max() > 0.5  # the adapter matters, so the agreement above means something


def test_guided_decoding_raises_marker_frequency(marker_run):
    from genarm_local.core.api import GuidedModel

    base, result, _ = marker_run
    prompts = [f"Tell me about the {word}:" for word in WORDS[:24]]
    counts = {}
    with GuidedModel(base, arms={result.export: 2.0}, n_ctx=256, seed=0) as guided:
        for label, alpha in (("base", 0.0), ("guided", 2.0)):
            texts = [
                guided.generate(p, weights={"arm": alpha}, max_tokens=16, temperature=1.0, seed=i).text
                for i, p in enumerate(prompts)
            ]
            counts[label] = sum(MARKER in text for text in texts) / len(texts)
    print(f"share of completions with {MARKER!r}: base {counts['base']:.2f}, guided {counts['guided']:.2f}")
    assert counts["guided"] >= counts["base"] + 0.3


def test_export_is_calibrated_on_the_held_out_prompts(marker_run):
    """`train --export` over a GGUF base calibrates the ARM on the prompts of the pairs it held out (new to the
    ARM, as a user's prompts are) and stores the result; the ARM given without a weight then runs at the
    recommended α."""
    from genarm_local.core.api import GuidedModel
    from genarm_local.core.arm_metadata import read_calibration, recommend_alpha
    from genarm_local.evaluation.calibration import CalibrationConfig, file_sha256
    from genarm_local.train.config import split

    base, result, _ = marker_run
    stored = read_calibration(result.export)
    assert stored is not None and result.calibration is not None
    assert stored.alphas == pytest.approx(result.calibration.alphas)
    assert stored.kl == pytest.approx(result.calibration.kl)
    _, held_out = split(marker_rows(200, seed=0), 0.2, 0)
    held_prompts = {row["prompt"] for row in held_out}  # 32 of the 52 distinct prompts
    assert len(held_out) == result.eval_pairs
    assert stored.prompts == min(CalibrationConfig.samples, len(held_prompts)) and all(n > 0 for n in stored.tokens)
    assert stored.samples == CalibrationConfig.samples
    assert stored.base_sha256 == file_sha256(base)
    assert 0 < stored.kl[0] <= stored.kl[-1]
    assert stored.recommended_alpha == pytest.approx(recommend_alpha(stored.alphas, stored.slack()))
    with GuidedModel(base, arms={str(result.export): None}, n_ctx=256) as guided:
        assert guided.arm_weights() == {"arm": pytest.approx(stored.recommended_alpha)}


def test_cli_report_shows_accuracy_calibration_weight_and_samples(hf_model, gguf_model, tmp_path):
    """The report: held-out accuracy of the weights kept, the calibration and the weight to use on one screen,
    then held-out prompts, each continued by the base and by the ARM at its recommended α."""
    rows = marker_rows(24, seed=5)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    base = gguf_model("llama_small", "f32")
    out = run_cli(
        "train", "-m", base, "--data", data, "-o", tmp_path / "arm", "--max-steps", 2, "--batch-size", 8,
        "--eval-split", 0.25, "--export", tmp_path / "arm.gguf", "--outtype", "f32", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report, samples = out.stdout.split("\n\n")
    assert "held out 6 pairs, at step" in report and "accuracy" in report and "margin" in report
    assert "KL (nats/token)" in report and "recommended α" in report and "--arm" in report
    assert len(report.splitlines()) <= 24  # one screen
    header, *lines = samples.splitlines()
    assert header.startswith("held-out prompts, continued by the base and by the ARM at α") and "accuracy" in header
    starts = [i for i, line in enumerate(lines) if not line.startswith(" ")]
    assert len(starts) == 3  # --show's default
    prompts = {row["prompt"] for row in rows}
    for first, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        assert lines[first].endswith(" …") and lines[first][: -len(" …")] in prompts  # a prompt of the data
        labels = [line.split()[0] for line in lines[first + 1 : end] if not line.startswith(" " * 6)]
        assert labels[0] == "base" and labels[1].startswith("α=") and len(labels) == 2

    quiet = run_cli(
        "train", "-m", base, "--data", data, "-o", tmp_path / "arm", "--max-steps", 2, "--batch-size", 8,
        "--export", tmp_path / "arm.gguf", "--outtype", "f32", "--no-progress", "--force", "--show", 0, cwd=tmp_path,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    assert "\n\n" not in quiet.stdout and "continued by" not in quiet.stdout
    assert "held out 4 pairs" in quiet.stdout  # the default hold-out of 24 pairs: a fifth of them


def test_chat_rows_train_on_the_prompt_the_engine_renders(gguf_model):
    """Chat data is rendered for training exactly as GuidedModel.chat renders it at run time."""
    from genarm_local.core.chat_template import resolve_template
    from genarm_local.core.native import Model
    from genarm_local.train.data import chat_renderer, load_tokenizer, pairs_from_rows, tokenize_pairs

    base = gguf_model("llama_small", "f32")
    tokenizer = load_tokenizer(base)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about the sea."}]
    reply = [{"role": "assistant", "content": "The sea is lovely."}]
    data = pairs_from_rows(
        [{"prompt": messages, "chosen": reply, "rejected": [{"role": "assistant", "content": "No."}]}]
    )
    (pair,) = tokenize_pairs(data, tokenizer, 128, 64, chat_renderer(tokenizer))
    with Model(base) as model:
        template = resolve_template(None, model)
        prompt = template.render(model, messages)
        assert pair.prompt == model.tokenize(prompt.text, add_special=prompt.add_bos, parse_special=True)
        full = template.render(model, messages + reply, add_generation_prompt=False)
        assert pair.prompt + pair.chosen == model.tokenize(full.text, add_special=full.add_bos, parse_special=True)


def test_merged_export_matches_peft(hf_model, gguf_model, tmp_path):
    """--export --merge: the adapter merged into a full GGUF model reproduces the PEFT model's logits."""
    import torch
    from fixture_models import FIDELITY_TEXT
    from helpers import F32_BOUND, hf_logits, llama_logits, relative_max_error
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train_small(
        hf_model,
        tmp_path / "arm",
        max_steps=4,
        lr=1e-2,
        export=str(tmp_path / "merged.gguf"),
        merge=True,
        outtype="f32",
    )
    ids = AutoTokenizer.from_pretrained(hf_model("llama_small"))(FIDELITY_TEXT)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(hf_model("llama_small"), dtype=torch.float32)
    plain = hf_logits(None, ids, model=base)
    reference = hf_logits(None, ids, model=PeftModel.from_pretrained(base, result.output).eval())
    assert relative_max_error(reference, plain) > 10 * F32_BOUND
    assert relative_max_error(reference, llama_logits(result.export, ids)) < F32_BOUND


# ---- resume --------------------------------------------------------------------------------------------------


def small_config(hf_model, out, **overrides):
    from genarm_local.train import TrainConfig

    settings = dict(
        model=str(hf_model("llama_small")),
        data=marker_rows(60, seed=1),
        output=str(out),
        lr=2e-3,
        epochs=2,
        min_steps=0,
        batch_size=8,
        eval_split=0.1,
        eval_every=4,
        save_every=3,
        lora_dropout=0.1,
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def train_small(hf_model, out, **overrides):
    from genarm_local.train import train

    return train(small_config(hf_model, out, **overrides))


def test_crash_then_resume_equals_uninterrupted_run(hf_model, tmp_path):
    """A run that dies at step 8 (last checkpoint: step 6) and is resumed takes the same optimizer steps and ends
    with the same weights as a run that never stopped (data order, dropout RNG and optimizer state restored)."""
    from genarm_local.train import train

    whole = train(small_config(hf_model, tmp_path / "whole"))

    class Crash(Exception):
        pass

    def crash_at_8(record):
        if record["step"] == 8:
            raise Crash

    with pytest.raises(Crash):
        train(small_config(hf_model, tmp_path / "crashed"), on_step=crash_at_8)
    assert sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()) == [
        "step-00000003.pt",
        "step-00000006.pt",
    ]
    resumed = train(small_config(hf_model, tmp_path / "crashed", resume=True))
    assert resumed.steps == whole.steps == 14
    expected, got = adapter_weights(whole.output), adapter_weights(resumed.output)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)
    steps = [r["step"] for r in log_records(resumed.output) if "loss" in r]
    assert steps == list(range(1, 15))  # steps 7 and 8 of the crashed attempt were dropped and trained again
    assert resumed.eval == pytest.approx(whole.eval, rel=1e-4)


def test_sigkill_and_ctrl_c_then_resume_through_the_cli(hf_model, tmp_path):
    """The real command: Ctrl-C saves a checkpoint and exits 130; SIGKILL mid-run loses at most the steps since
    the last checkpoint; --resume finishes with the step count of an uninterrupted run."""
    import torch

    data = write_jsonl(tmp_path / "prefs.jsonl", marker_rows(80, seed=2))
    out = tmp_path / "arm"
    args = [
        sys.executable,
        "-m",
        "genarm_local.cli",
        "train",
        "--model",
        hf_model("llama_small"),
        "--data",
        data,
        "-o",
        out,
        "--batch-size",
        "4",
        "--max-steps",
        "40",
        "--save-every",
        "5",
        "--eval-every",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(*extra):
        return subprocess.Popen([*map(str, args), *extra], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)

    def wait_for(proc, condition):
        while not condition():
            assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr.read()}"
            time.sleep(0.02)

    def logged_steps():
        log = out / "train_log.jsonl"
        return len(log.read_text().splitlines()) if log.exists() else 0

    proc = start("--no-progress")
    wait_for(proc, lambda: logged_steps() >= 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    interrupted_at = int(stderr.split(" at step ")[1].split("/")[0])  # said even with --no-progress
    assert max(int(p.stem[5:]) for p in (out / "checkpoints").glob("step-*.pt")) == interrupted_at >= 2

    proc = start("--resume", "--no-progress")
    wait_for(proc, lambda: any(int(p.stem[5:]) > interrupted_at for p in (out / "checkpoints").glob("step-*.pt")))
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    for checkpoint in (out / "checkpoints").glob("step-*.pt"):  # complete, whenever the kill came
        torch.load(checkpoint, weights_only=True)
    with (out / "train_log.jsonl").open("a") as log:
        log.write('{"step": 99, "lo')  # as if the kill had torn a line

    done = subprocess.run(
        [*map(str, args), "--resume", "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "trained 40 steps" in done.stdout
    steps = [r["step"] for r in log_records(out) if "loss" in r]
    assert steps == list(range(1, 41))
    assert json.loads((out / "train_config.json").read_text())["steps"] == 40


# ---- bad input through the real CLI ----------------------------------------------------------------------------


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "setup, extra, words",
    [
        ("missing", [], ["nope.jsonl", "no such data file"]),
        ("empty", [], ["prefs.jsonl", "empty"]),
        ("wrong_format", [], ["prefs.jsonl:1", "unrecognized", "TRL"]),
        ("malformed", [], ["prefs.jsonl:2", "malformed JSON"]),
        ("good", ["--beta", "0"], ["--beta", "> 0", "got 0"]),
        ("good", ["--beta", "-0.1"], ["--beta", "> 0"]),
        ("good", ["--export", "x.gguf", "--outtype", "q4_k_m"], ["q4_k_m", "--merge"]),
        ("good", ["--select", "worst"], ["--select", "best or last", "worst"]),
        ("good", ["--early-stopping-patience", "-1"], ["--early-stopping-patience", "≥ 0"]),
        ("good", ["--show", "-2"], ["--show", "≥ 0"]),
        ("gemma_markup", [], ["<start_of_turn>", "another model's chat template"]),
    ],
)
def test_bad_input_is_one_line_exit_2(hf_model, tmp_path, setup, extra, words):
    data = tmp_path / ("nope.jsonl" if setup == "missing" else "prefs.jsonl")
    lines = {
        "empty": [],
        "wrong_format": ['{"question": "a", "answer": "b"}'],
        "malformed": ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a",'],
        "good": [json.dumps(r) for r in marker_rows(4, seed=3)],
        "gemma_markup": [
            json.dumps(
                {
                    "prompt": "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
                    "chosen": "Hello<end_of_turn>",
                    "rejected": "Go<end_of_turn>",
                }
            )
        ],
    }.get(setup)
    if lines is not None:
        data.write_text("".join(line + "\n" for line in lines))
    result = run_cli(
        "train", "--model", hf_model("llama_small"), "--data", data, "-o", tmp_path / "out", *extra, cwd=tmp_path
    )
    assert_one_line_error(result, *words)
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_existing_run_needs_resume_or_force(hf_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_log.jsonl").write_text("")
    data = write_jsonl(tmp_path / "prefs.jsonl", marker_rows(4, seed=3))
    result = run_cli("train", "--model", hf_model("llama_small"), "--data", data, "-o", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, "--resume", "--force")


def test_cli_flags_are_generated_from_train_config(capsys):
    import argparse
    import dataclasses

    from genarm_local.cli.flags import add_config_arguments
    from genarm_local.train.config import TrainConfig

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    args = parser.parse_args(
        ["-m", "base.gguf", "--data", "p.jsonl", "-o", "out", "--target-modules", "q_proj", "v_proj"]
    )
    config = TrainConfig(**vars(args))
    # every field has a flag; fields that default to True have --no-X flags
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(vars(args))
    assert config.target_modules == ["q_proj", "v_proj"] and config.beta == 0.05 and config.lr == 5e-4
    assert config.progress and not parser.parse_args(["-m", "b", "--data", "d", "-o", "o", "--no-progress"]).progress
    assert config.eos and not parser.parse_args(["-m", "b", "--data", "d", "-o", "o", "--no-eos"]).eos
    assert parser.parse_args(["--data", "d", "-o", "o"]).model is None  # train() then uses the embedded base
    # the bounded anchor by default; "off" asks for the plain one
    assert config.anchor_over_base == 2.0
    assert parser.parse_args(["--data", "d", "-o", "o", "--anchor-over-base", "off"]).anchor_over_base is None
    assert parser.parse_args(["--data", "d", "-o", "o", "--anchor-over-base", "0.5"]).anchor_over_base == 0.5
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--data", "d", "-o", "o", "--anchor-over-base", "abc"])
    assert exit_info.value.code == 2 and "expected M in nats/token or off, got 'abc'" in capsys.readouterr().err


def test_schedule_warmup_then_cosine_and_split():
    from genarm_local.train.config import lr_factor, split, warmup_steps

    assert warmup_steps(0.1, 100) == 10 and warmup_steps(3, 100) == 3 and warmup_steps(0, 100) == 0
    factors = [lr_factor(step, 2, 10) for step in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warmup reaching the peak
    assert (
        all(a > b for a, b in zip(factors[2:-1], factors[3:], strict=True)) and 0 < factors[-1] < 0.05
    )  # cosine decay
    pairs = list(range(100))
    train_part, held = split(pairs, 0.05, seed=0)  # an explicit fraction is taken as given
    assert len(held) == 5 and sorted(train_part + held) == pairs
    assert split(pairs, 0.05, seed=0) == (train_part, held) and split(pairs, 0.05, seed=1)[1] != held
    assert split(pairs, 0.0, seed=0) == (pairs, [])
    assert len(split(pairs, None, seed=0)[1]) == 8  # the default: at least 8 (tests/train/test_selection.py)


def test_gradient_checkpointing_changes_nothing(hf_model, tmp_path):
    plain = train_small(hf_model, tmp_path / "plain", max_steps=3)
    recomputed = train_small(hf_model, tmp_path / "recomputed", max_steps=3, gradient_checkpointing=True)
    expected, got = adapter_weights(plain.output), adapter_weights(recomputed.output)
    for name in expected:  # dropout included: the recomputation replays its random numbers
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_the_verb_module_does_not_import_torch(tmp_path):
    """`genarm-local chat` builds every verb's parser: train's must not pull in torch, transformers or peft."""
    code = (
        "import sys, genarm_local.cli as cli; cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def chosen_gain_over_base(run_dir, base_dir, pairs) -> float:
    """Mean over chosen-response tokens of log π_ARM(y_w|x) − log π_base(y_w|x), from the saved PEFT adapter."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    arm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64),
                                         str(run_dir)).eval()  # fmt: skip
    sequences = [(p.prompt, p.chosen) for p in pairs]
    gain = response_logps_torch(arm, sequences) - response_logps_torch(base, sequences)
    return float(gain.sum() / sum(len(p.chosen) for p in pairs))


def test_anchor_over_base_pulls_less_than_the_plain_anchor(hf_model, tmp_path):
    """With a weak preference term (β = 1e-6) and a strong anchor, the plain anchor teaches the ARM its chosen
    responses: their log-prob rises far above the base's. --anchor-over-base M pulls them only to M nats/token above
    the base's: at M = 0 what raises them is the preference term alone (which AdamW's normalised steps still
    follow), well under half as far; at M = 0.5 the anchor adds its pull up to that target: in between."""
    from pathlib import Path

    from genarm_local.train.data import load_preferences, load_tokenizer, tokenize_pairs

    base = hf_model("llama_small")
    settings = dict(save_every=0, beta=1e-6, anchor=1.0, lora_dropout=0.0, eval_split=0.0)
    runs = {over: train_small(hf_model, tmp_path / str(over), anchor_over_base=over, **settings)
            for over in (None, 0.0, 0.5)}  # fmt: skip
    pairs = tokenize_pairs(load_preferences(marker_rows(60, seed=1)), load_tokenizer(Path(base)), 512, 256)
    plain, relative, half = (chosen_gain_over_base(r.output, base, pairs) for r in runs.values())
    print(f"chosen log-prob over the base's, nats/token: {plain:.3f} plain, {relative:.3f} at M 0, {half:.3f} at 0.5")
    assert plain > 1.0
    assert abs(relative) < 0.5 * plain
    assert relative + 0.3 < half < plain - 0.3


def test_resume_takes_a_setting_newer_than_the_checkpoint_at_its_value_then(tmp_path):
    """A checkpoint made before a setting existed resumes when the run uses the value every run had then (the
    setting's default when it was added), and is refused with a one-line reason when it does not: a run made with
    the plain anchor does not go on under today's default bounded one."""
    import dataclasses

    from genarm_local.core.errors import InvalidOptionError
    from genarm_local.train.checkpoints import RUN_SETTINGS, check_same_run
    from genarm_local.train.config import TrainConfig

    config = TrainConfig(data="d.jsonl", output=str(tmp_path))
    settings = {k: getattr(config, k) for k in RUN_SETTINGS}
    older = {"selection": {}, "data": "h", "settings": {k: v for k, v in settings.items() if k != "anchor_over_base"}}
    with pytest.raises(InvalidOptionError, match="--anchor-over-base off, not 2.0"):  # as the flag is spelled
        check_same_run(tmp_path / "step-1.pt", older, settings, "h")
    plain = {k: getattr(dataclasses.replace(config, anchor_over_base=None), k) for k in RUN_SETTINGS}
    check_same_run(tmp_path / "step-1.pt", older, plain, "h")
    newer = {**older, "settings": settings}  # a checkpoint that records the setting: compared as recorded
    check_same_run(tmp_path / "step-1.pt", newer, settings, "h")
    no_beta = {**older, "settings": {k: v for k, v in older["settings"].items() if k != "beta"}}
    check_same_run(tmp_path / "step-1.pt", no_beta, plain, "h")  # a setting whose default never changed: today's
