"""Which weights `train` keeps and when it stops (genarm_local/train/selection.py, run.py): the default hold-out,
the evaluation cadence, best-checkpoint selection and early stopping on the held-out loss, the report of saturation,
and a resumed run keeping what an uninterrupted one keeps. Most runs overfit on purpose: a quarter of the held-out
pairs' labels are swapped, so the held-out loss has its minimum at a finite margin, which training on clean pairs
passes: the loss falls, then rises."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_train import adapter_weights, log_records, marker_rows

pytestmark = pytest.mark.slow


def noisy_rows() -> list[dict]:
    """40 marker pairs, 2 of the 8 held out (the default split, seed 0) with chosen and rejected swapped, the 32
    trained on clean. The marker is learnable, so the held-out loss falls at first; but its optimum is a finite
    margin (ln 3, for 6 right pairs against 2 swapped), which the ARM passes as its clean training pairs drive the
    margin on, and the loss rises again (linearly in the margin, through the swapped pairs)."""
    from genarm_local.train.config import split

    rows = marker_rows(40, seed=4)
    _, held = split(list(range(len(rows))), None, seed=0)
    swapped = set(held[:2])
    return [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i in swapped else r for i, r in enumerate(rows)]


def noisy_config(hf_model, out, **overrides):
    from genarm_local.train import TrainConfig

    settings = dict(
        model=str(hf_model("llama_small")),
        data=noisy_rows(),  # 40 pairs: 8 held out by default, 32 trained on, 8 steps an epoch at batch 4
        output=str(out),
        lr=1e-2,
        batch_size=4,
        epochs=2,
        eval_every=1,
        anchor=0.0,
        lora_dropout=0.0,
        early_stopping_patience=0,
        save_every=1,
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def checkpoint_adapter(path) -> dict[str, np.ndarray]:
    """A checkpoint's LoRA weights, named as the saved adapter names them."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name.replace(".default", ""): tensor.numpy() for name, tensor in state["adapter"].items()}


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def same_evaluations(got: list[dict], expected: list[dict]) -> bool:
    if len(got) != len(expected):
        return False
    return all(g == pytest.approx(e, rel=1e-4) for g, e in zip(got, expected, strict=True))


@pytest.fixture(scope="module")
def full_run(hf_model, tmp_path_factory):
    """The whole run without early stopping, and the weights after every step but the last (read from the
    checkpoint of step s - 1, which exists when step s is reported)."""
    from genarm_local.train import train

    out = tmp_path_factory.mktemp("full") / "arm"
    weights = {}

    def collect(record):
        if record["step"] > 1:
            weights[record["step"] - 1] = checkpoint_adapter(out / "checkpoints" / f"step-{record['step'] - 1:08d}.pt")

    result = train(noisy_config(hf_model, out), on_step=collect)
    losses = {e["step"]: e["loss"] for e in result.evaluations}
    best = min(losses, key=losses.get)
    print("held-out loss by step:", {step: round(loss, 3) for step, loss in losses.items()})
    # the construction: the loss falls, then rises (noisy_rows)
    assert 1 < best < result.steps - 2, losses
    return result, weights, best


def test_default_hold_out_and_evaluation_cadence():
    from genarm_local.train.config import held_out_count, split
    from genarm_local.train.selection import eval_interval

    # None: 5%, but at least 8 pairs while that is at most a fifth of them
    assert [held_out_count(n, None) for n in (1, 2, 4, 10, 20, 48, 50, 160, 200, 1000)] == [
        0, 1, 1, 2, 4, 8, 8, 8, 10, 50,
    ]  # fmt: skip
    assert held_out_count(50, 0.05) == 2 and held_out_count(50, 0.0) == 0 and held_out_count(3, 0.9) == 2
    pairs = list(range(48))
    train_part, held = split(pairs, None, seed=0)
    assert len(held) == 8 and sorted(train_part + held) == pairs and split(pairs, None, seed=0)[1] == held
    assert split(pairs, None, seed=1)[1] != held
    # several evaluations even on a short run; every N steps when given
    assert [eval_interval(None, total) for total in (1, 5, 8, 9, 36, 1000)] == [1, 1, 1, 2, 5, 125]
    assert eval_interval(3, 36) == 3 and eval_interval(0, 36) == 0


def test_selection_keeps_the_lowest_loss_and_counts_patience():
    from genarm_local.train.selection import Selection, saturation, summary

    snapshots = []

    def snapshot():
        snapshots.append(len(snapshots))
        return {"w": len(snapshots)}

    def run(selection, metrics):
        return [selection.update(step, {"loss": loss, "accuracy": acc, "margin": step}, snapshot)
                for step, (loss, acc) in enumerate(metrics, start=1)]  # fmt: skip

    selection = Selection("best", patience=2)
    stops = run(selection, [(math.nan, 0.5), (0.7, 0.5), (0.5, 0.5), (0.6, 1.0), (0.5, 0.5)])  # NaN is never best
    assert stops == [None, None, None, None, "loss"]  # a tie is no improvement
    assert selection.best_step == 3 and selection.best_weights == {"w": 3} and len(snapshots) == 3
    restored = Selection("best", patience=2)
    restored.load_state_dict(selection.state_dict())
    assert restored == selection
    lines = summary(selection.evaluations, 3, 5, 10, "best", "loss")
    assert lines == ["held-out loss stopped improving at step 3 (0.5000): stopped at step 5 of 10, kept step 3"]

    # saturated: accuracy 1.0 from some evaluation on is reported, and the run goes on while the loss falls
    saturated = Selection("best", patience=3)
    stops = run(saturated, [(0.9, 0.5), (0.7, 1.0), (0.5, 0.75), (0.4, 1.0), (0.3, 1.0), (0.2, 1.0), (0.1, 1.0)])
    assert stops == [None] * 7 and saturated.best_step == 7
    assert saturation(saturated.evaluations)["step"] == 4
    assert saturation(saturated.evaluations[:4]) is None  # accuracy 1.0 at the last evaluation only
    lines = summary(saturated.evaluations[:6], 6, 6, 6, "best", None)
    assert "accuracy 1.00 from step 4: saturated; margin" in lines[0]
    assert lines[1] == "held-out loss lowest at the last step, 6: kept it"

    last = Selection("last", patience=0)
    assert not any(run(last, [(1.0 / s, 1.0) for s in range(1, 20)]))
    assert last.best_weights is None and last.best_step == 19


def test_the_best_evaluation_s_weights_are_saved_and_exported(full_run, tmp_path):
    result, weights, best = full_run
    assert result.selected_step == best and result.steps == result.total_steps == 16 and not result.stopped_early
    assert_same_weights(adapter_weights(result.output), weights[best])
    last_known = max(weights)
    assert any(not np.allclose(weights[last_known][n], weights[best][n]) for n in weights[best])  # it matters
    assert result.eval == {k: v for k, v in result.evaluations[best - 1].items() if k != "step"}
    (choice,) = [r for r in log_records(result.output) if "selected_step" in r]
    assert choice["selected_step"] == best and choice["select"] == "best" and choice["stopped_early"] is None
    saved = json.loads((result.output / "train_config.json").read_text())
    assert saved["selected_step"] == best and saved["steps"] == 16 and saved["select"] == "best"


def test_select_last_keeps_the_last_step_and_trains_the_same(full_run, hf_model, tmp_path):
    from genarm_local.train import train

    result, _, best = full_run
    last = train(noisy_config(hf_model, tmp_path / "last", select="last", save_every=0))
    assert last.selected_step == 16 and last.select == "last"
    assert same_evaluations(last.evaluations, result.evaluations)  # choosing changes nothing in the training
    assert last.eval == pytest.approx({k: v for k, v in last.evaluations[-1].items() if k != "step"})
    got, best_weights = adapter_weights(last.output), adapter_weights(result.output)
    assert any(not np.allclose(got[n], best_weights[n]) for n in got)


def patience_run(evaluations: list[dict], patience: int) -> tuple[int, int]:
    """(last step, step kept) of a run evaluated after every step that stops after ``patience`` evaluations in a row
    without a lower loss than the best so far: the rule, written out as a reference."""
    kept, since = 0, 0
    for step, evaluation in enumerate(evaluations, start=1):
        kept, since = (step, 0) if not kept or evaluation["loss"] < evaluations[kept - 1]["loss"] else (kept, since + 1)
        if since == patience:
            return step, kept
    return len(evaluations), kept


def test_early_stopping_stops_after_patience_and_keeps_the_best(full_run, hf_model, tmp_path):
    from genarm_local.cli.train import report
    from genarm_local.train import train

    result, weights, _ = full_run
    stop, kept = patience_run(result.evaluations, patience=2)
    stopped = train(noisy_config(hf_model, tmp_path / "stopped", early_stopping_patience=2))
    assert stopped.stopped_early == "loss" and stopped.steps == stop < 16 and stopped.total_steps == 16
    assert stopped.selected_step == kept == stop - 2
    assert_same_weights(adapter_weights(stopped.output), weights[kept])
    assert [r["step"] for r in log_records(stopped.output) if "loss" in r] == list(range(1, stop + 1))
    text = "\n".join(report(stopped))
    assert f"trained {stop} steps (of 16: stopped early)" in text
    assert f"held-out loss stopped improving at step {kept}" in text and f"kept step {kept}" in text


def test_a_resumed_run_keeps_what_an_uninterrupted_one_keeps(full_run, hf_model, tmp_path):
    """Crashed two steps after the best evaluation, resumed from the checkpoint one step after it: the best weights
    and the count of evaluations since come from the checkpoint, so the resumed run stops where an uninterrupted
    one stops and keeps the same weights."""
    from genarm_local.train import train

    result, weights, _ = full_run
    stop, kept = patience_run(result.evaluations, patience=3)
    assert kept + 2 < stop  # the crash comes before the stop
    settings = dict(early_stopping_patience=3)
    whole = train(noisy_config(hf_model, tmp_path / "whole", **settings))
    assert (whole.steps, whole.selected_step) == (stop, kept)

    class Crash(Exception):
        pass

    def crash(record):
        if record["step"] == kept + 2:
            raise Crash

    with pytest.raises(Crash):
        train(noisy_config(hf_model, tmp_path / "crashed", **settings), on_step=crash)
    resumed = train(noisy_config(hf_model, tmp_path / "crashed", resume=True, **settings))
    assert (resumed.steps, resumed.selected_step, resumed.stopped_early) == (stop, kept, "loss")
    assert_same_weights(adapter_weights(resumed.output), weights[kept])
    assert same_evaluations(resumed.evaluations, whole.evaluations)


def test_a_saturated_run_is_reported_and_goes_on(hf_model, tmp_path):
    """Clean labels: the held-out accuracy reaches 1.0 and stays while the loss keeps falling; the report says where
    it saturated, and the run takes every step (only the loss's patience stops it)."""
    from genarm_local.cli.train import report
    from genarm_local.train import train

    clean = dict(data=marker_rows(40, seed=4), lr=5e-3)
    run = train(noisy_config(hf_model, tmp_path / "run", early_stopping_patience=2, save_every=0, **clean))
    first = next(e["step"] for e in run.evaluations if all(later["accuracy"] == 1.0 for later in
                 run.evaluations[e["step"] - 1 :]))  # fmt: skip
    assert first < 14 and patience_run(run.evaluations, patience=2)[0] == 16
    assert (run.steps, run.stopped_early) == (16, None)
    text = "\n".join(report(run))
    assert f"held-out accuracy 1.00 from step {first}: saturated" in text


def test_a_small_set_gets_min_steps(hf_model, tmp_path):
    """One epoch of 32 training pairs at batch 4 is 8 steps; --min-steps 12 passes over the set again, and
    --max-steps still overrides both."""
    from genarm_local.train import train

    longer = train(noisy_config(hf_model, tmp_path / "min", epochs=1, min_steps=12, eval_every=0, save_every=0))
    assert (longer.steps, longer.total_steps) == (12, 12)
    epochs = [r["epoch"] for r in log_records(longer.output) if "loss" in r]
    assert epochs[7] == 1.0 and epochs[-1] == 1.5
    exact = train(noisy_config(hf_model, tmp_path / "max", min_steps=12, max_steps=3, eval_every=0, save_every=0))
    assert exact.steps == exact.total_steps == 3
