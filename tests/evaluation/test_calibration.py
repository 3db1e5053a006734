"""Calibration: the KL curve against an independent float64 computation from the HF models, the recommendation
rule, an ARM given without a weight running at its recommended α, and `genarm-local calibrate` end to end (the
metadata it writes, bad input leaving the ARM untouched)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from helpers import hf_logits, log_softmax

PROMPTS = ["The history of the bicycle", "Once upon a time", "The weather today is", "My favourite food"]
EXACT = dict(n_ctx=256, n_threads=1, kv_cache_type="f32", flash_attn=False)


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    from genarm_local.convert import convert

    adapter = workdir / "engine-lora-adapter.gguf"
    if not adapter.exists():
        convert(hf_model("llama_small"), adapter, outtype="f32", lora=lora_adapter, adapter_only=True, progress=False)
    return {"base": gguf_model("llama_small", "f32"), "adapter": adapter, "other": gguf_model("qwen3", "f32")}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kl_curve_matches_an_independent_float64_computation(files, hf_model, lora_adapter):
    """Per-position KL(p_α ‖ p_base) on the continuations the calibration sampled, recomputed from the HF models
    (PEFT for the adapter) in float64: log p_α = log_softmax((log_softmax(base) + α·log_softmax(arm)) / (1 + α)), the
    distribution the default sampling draws from at T = 1 (scale_temperature)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from genarm_local import GuidedModel
    from genarm_local.evaluation.calibration import measure_kl

    alphas = [0.25, 1.0, 2.0]
    with GuidedModel(files["base"], {str(files["adapter"]): None}, **EXACT) as model:
        curve = measure_kl(model, "engine-lora-adapter", PROMPTS, alphas, max_tokens=12, seed=3)
        prompts = [model.tokenize(p) for p in PROMPTS]
    load = lambda: AutoModelForCausalLM.from_pretrained(hf_model("llama_small"), dtype=torch.float32).eval()  # noqa: E731
    base, arm = load(), PeftModel.from_pretrained(load(), lora_adapter).eval()
    for a, alpha in enumerate(alphas):
        expected = []
        for prompt, (continuation, ended) in zip(prompts, curve.samples[a], strict=True):
            ids = prompt + continuation
            lb = log_softmax(hf_logits(None, ids, model=base))[len(prompt) - 1 :]
            la = log_softmax(hf_logits(None, ids, model=arm))[len(prompt) - 1 :]
            lq = log_softmax((lb + alpha * la) / (1 + alpha))
            kl = (np.exp(lq) * (lq - lb)).sum(-1)
            # the row after the last token is a sampled choice only when it was end-of-sequence
            expected.append(kl if ended else kl[:-1])
        expected = np.concatenate(expected)
        assert curve.tokens[a] == len(expected) == len(curve.per_token[a]) > 20
        np.testing.assert_allclose(curve.per_token[a], expected, rtol=2e-3, atol=1e-5)
        assert math.isclose(curve.kl[a], expected.mean(), rel_tol=1e-3)
    assert 0 < curve.kl[0] < curve.kl[1] < curve.kl[2]


def test_recommend_alpha_is_where_the_first_measure_leaves_its_bound():
    from genarm_local.core.arm_metadata import recommend_alpha as recommend_of
    from genarm_local.core.arm_metadata import slack as slack_of

    alphas = [0.25, 0.5, 1.0, 2.0]
    base = (0.80, 0.010, 0.03)  # distinct-2, rep-4, degenerate rate of the base's own text
    share = 0.85  # of the base's distinct-2 (the mechanics, whatever DISTINCT_2_SHARE is)

    def slack(distinct_2, rep_4, degenerate, base):  # no empty replies, the base's or the guided text's
        return slack_of(distinct_2, rep_4, degenerate, [0.0] * len(distinct_2), (*base, 0.0), share)

    def recommend_alpha(alphas, slacks):
        return recommend_of(alphas, slacks, share)

    # distinct-2's bound is 0.85 × 0.80 = 0.68: inside at 0.5 (0.72), outside at 1 (0.64), crossed at 0.75
    distinct_2 = [0.78, 0.72, 0.64, 0.50]
    rep_4 = [0.01, 0.02, 0.03, 0.30]  # inside (≤ 0.06) up to 1
    degenerate = [0.0, 0.05, 0.13, 0.5]  # inside (≤ 0.13) up to 1
    fluent = [min(s) >= 0 for s in slack(distinct_2, rep_4, degenerate, base)]
    assert fluent == [True, True, False, False]
    assert math.isclose(recommend_alpha(alphas, slack(distinct_2, rep_4, degenerate, base)), 0.75, rel_tol=1e-6)
    # rep-4 leaves first: 0.02 → 0.10 crosses 0.06 halfway between 0.5 and 1
    rep_first = [0.01, 0.02, 0.10, 0.30]
    assert math.isclose(recommend_alpha(alphas, slack(distinct_2, rep_first, degenerate, base)), 0.75, rel_tol=1e-6)
    rep_first = [0.01, 0.02, 0.14, 0.30]  # crosses a third of the way: before distinct-2 does
    assert math.isclose(recommend_alpha(alphas, slack(distinct_2, rep_first, degenerate, base)), 2 / 3, rel_tol=1e-6)
    # outside already at the first grid point: interpolated from the base itself (α = 0, inside every bound)
    sharp = slack([0.60, 0.5, 0.4, 0.3], rep_4, degenerate, base)  # 0.60/0.80 = 0.75: 0.15 → -0.10
    assert math.isclose(recommend_alpha(alphas, sharp), 0.25 * 0.15 / 0.25, rel_tol=1e-6)
    # the first point outside ends the walk, even when a larger α is inside again (noise)
    noisy = slack([0.78, 0.60, 0.75, 0.75], rep_4, degenerate, base)
    assert recommend_alpha(alphas, noisy) < 0.5
    # inside everywhere: the grid's largest (a weak ARM; guidance is capped at the measured range)
    assert recommend_alpha(alphas, slack([0.8] * 4, [0.01] * 4, [0.03] * 4, base)) == 2.0


def test_empty_replies_have_a_bound_of_their_own():
    """An empty reply counts as degenerate (whose margin is 10 points) and has its own bound, the base's share + 3
    points: one empty reply of 48 more than the base passes, two do not."""
    from genarm_local.core.arm_metadata import EMPTY_MARGIN, recommend_alpha, slack

    alphas = [1.0, 2.0, 3.0]
    base = (0.80, 0.010, 0.03, 0.0)  # ... and the base's share of empty replies
    fluent, rep_4 = [0.8, 0.8, 0.8], [0.01] * 3
    degenerate = [0.03, 0.03 + 2 / 48, 0.03 + 4 / 48]  # inside the degenerate bound (0.13) throughout
    none = [0.0] * 3
    assert [min(s) >= 0 for s in slack(fluent, rep_4, degenerate, none, base)] == [True, True, True]
    for empties, inside in ((1, True), (2, False)):
        empty = [0.0, empties / 48, 4 / 48]
        assert (min(slack(fluent, rep_4, degenerate, empty, base)[1]) >= 0) is inside
    empty = [0.0, 0.0, 4 / 48]  # none at 2, 4 of 48 at 3: crossed an EMPTY_MARGIN / (4/48) of the way
    alpha = recommend_alpha(alphas, slack(fluent, rep_4, degenerate, empty, base))
    assert alpha == pytest.approx(2 + EMPTY_MARGIN / (4 / 48), abs=1e-6)
    assert recommend_alpha(alphas, slack(fluent, rep_4, degenerate, none, base)) == 3.0  # the same texts, none empty


@pytest.fixture(scope="module")
def calibrated(files, tmp_path_factory):
    """The adapter calibrated through the real CLI (a copy: the fixture's adapter is shared)."""
    work = tmp_path_factory.mktemp("calibrate")
    arm = work / "arm.gguf"
    shutil.copy(files["adapter"], arm)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "chosen": " a", "rejected": " b"}) + "\n" for p in PROMPTS))
    result = run_cli(
        "calibrate", arm, "--base", files["base"], "--prompts", prompts, "--max-tokens", 8, "--alphas", 0.25, 1, 2,
        "-t", 1, cwd=work, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return arm, result.stdout, work


def test_calibrate_writes_the_curve_into_the_arm(calibrated, files):
    from genarm_local.core.arm_metadata import read_calibration, recommend_alpha
    from genarm_local.evaluation.calibration import CalibrationConfig, file_sha256

    arm, stdout, _ = calibrated
    calibration = read_calibration(arm)
    # the grid, walked up to its first point whose text is less fluent than the base's
    fluent = calibration.fluent()
    assert calibration.alphas == pytest.approx((0.25, 1.0, 2.0)[: len(fluent)])
    assert all(fluent[:-1]) and (len(fluent) == 3 or not fluent[-1])
    assert calibration.prompts == len(PROMPTS) and calibration.max_tokens == 8
    assert calibration.samples == CalibrationConfig.samples  # each prompt continued several times
    assert all(n > 0 for n in calibration.tokens) and 0 < calibration.kl[0] <= calibration.kl[-1]
    for name in ("distinct_2", "rep_4", "degenerate", "empty"):
        values = (*getattr(calibration, name), getattr(calibration, f"base_{name}"))
        assert len(values) == len(fluent) + 1 and all(0 <= v <= 1 for v in values)
    assert calibration.recommended_alpha == pytest.approx(recommend_alpha(calibration.alphas, calibration.slack()))
    assert 0 < calibration.recommended_alpha <= 2
    assert calibration.base_sha256 == file_sha256(files["base"]) and calibration.base_file == files["base"].name
    assert f"recommended α {calibration.recommended_alpha:.3g}:" in stdout
    assert stdout.count("\n") >= 5 and "base" in stdout  # the base's row, then one row per α
    assert read_calibration(files["adapter"]) is None  # the original was not touched


def test_the_base_yardstick_is_the_mean_of_several_sets(calibrated, files):
    """The base's fluency measures that every α is judged against are the mean over BASE_DRAWS sets of continuations,
    set d seeded seed + d·n + i: computed here from the base alone, with fluency.py directly."""
    from genarm_local import GuidedModel
    from genarm_local.core.arm_metadata import read_calibration
    from genarm_local.evaluation.calibration import BASE_DRAWS, CalibrationConfig, continued
    from genarm_local.evaluation.fluency import fluency_summary, reply

    calibration = read_calibration(calibrated[0])
    n = CalibrationConfig.samples
    prompts = continued(PROMPTS, n, 0)
    per_draw = []
    with GuidedModel(files["base"], n_threads=1) as model:
        for draw in range(BASE_DRAWS):
            results = model.generate_batch(prompts, max_tokens=8, seeds=[draw * n + i for i in range(n)])
            texts = [reply(model.detokenize(r.tokens), p) for r, p in zip(results, prompts, strict=True)]
            summary = fluency_summary(texts)
            per_draw.append([summary["distinct_2"], summary["rep_4"], summary["degenerate"], summary["empty"]])
    assert BASE_DRAWS > 1 and len({d2 for d2, *_ in per_draw}) > 1  # several sets, and they differ
    got = (calibration.base_distinct_2, calibration.base_rep_4, calibration.base_degenerate, calibration.base_empty)
    assert got == pytest.approx(tuple(np.mean(per_draw, axis=0)), abs=1e-6)


def test_an_arm_without_a_weight_runs_at_its_recommended_alpha(calibrated, files):
    from genarm_local import GuidedModel
    from genarm_local.core.arm_metadata import read_calibration

    arm, _, _ = calibrated
    recommended = read_calibration(arm).recommended_alpha
    with GuidedModel(files["base"], {str(arm): None, str(files["adapter"]): None}, **EXACT) as model:
        # calibrated: its recommendation; uncalibrated: the paper's α = 1
        assert model.arm_weights() == {"arm": pytest.approx(recommended), "engine-lora-adapter": 1.0}
    with GuidedModel(files["base"], {str(arm): 0.3}, **EXACT) as model:
        assert model.arm_weights() == {"arm": 0.3}  # a weight given is the paper's α, whatever the calibration


def test_calibrated_adapter_still_guides_identically(calibrated, files):
    """The rewrite changes metadata only: the calibrated adapter's guided distribution is the original's."""
    from genarm_local import GuidedModel

    arm, _, _ = calibrated
    rows = []
    for path in (files["adapter"], arm):
        with GuidedModel(files["base"], {str(path): 1.0}, **EXACT) as model:
            rows.append(model.next_token_logprobs(model.tokenize(PROMPTS[0])))
    np.testing.assert_array_equal(rows[0], rows[1])


def test_calibrating_against_the_wrong_base_fails_and_leaves_the_arm(calibrated, files):
    arm, _, work = calibrated
    before = digest(arm)
    result = run_cli("calibrate", arm, "--base", files["other"], "--max-tokens", 4, cwd=work)
    assert_one_line_error(result, str(arm))
    assert digest(arm) == before


def test_an_empty_prompt_file_fails_and_leaves_the_arm(calibrated, files):
    arm, _, work = calibrated
    before = digest(arm)
    empty = work / "empty.txt"
    empty.write_text("\n  \n")
    result = run_cli("calibrate", arm, "--base", files["base"], "--prompts", empty, cwd=work)
    assert_one_line_error(result, "empty.txt", "no prompts")
    assert digest(arm) == before
    missing = run_cli("calibrate", arm, "--base", files["base"], "--prompts", work / "nope.txt", cwd=work)
    assert_one_line_error(missing, "nope.txt")
    bad_alphas = run_cli("calibrate", arm, "--base", files["base"], "--alphas", "0", "1", cwd=work)
    assert_one_line_error(bad_alphas, "--alphas")
    assert digest(arm) == before


def test_chat_shows_the_recommended_alpha_and_its_kl(calibrated, files):
    from genarm_local.core.arm_metadata import read_calibration

    arm, _, work = calibrated
    calibration = read_calibration(arm)
    result = run_cli("chat", "-m", files["base"], "--arm", arm, "--verbose", "-t", 1, cwd=work, input="/weights\n")
    assert result.returncode == 0, result.stderr
    recommended = f"recommended α={calibration.recommended_alpha:.3g} (the largest as fluent as the base)"
    # --verbose at the start and /weights: the ARM runs at its recommended α, and the KL there is the curve's
    shown = [line for line in result.stderr.splitlines() if recommended in line]
    assert len(shown) == 2, result.stderr
    alpha = calibration.recommended_alpha
    assert f"arm: α={alpha:.3g}, KL {calibration.kl_at(alpha):.3g} nats/token" in shown[0]
