"""Show, don't tell (genarm_local/evaluation/showcase.py): the base's and the guided continuation of the same prompts
with the same seeds, their layout, and `genarm-local calibrate` ending with some of its prompts continued at the
recommended α."""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import assert_one_line_error, run_cli

PROMPTS = ["The history of the bicycle", "Once upon a time", "The weather today is"]


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    from genarm_local.convert import convert

    adapter = workdir / "showcase-lora-adapter.gguf"
    if not adapter.exists():
        convert(hf_model("llama_small"), adapter, outtype="f32", lora=lora_adapter, adapter_only=True, progress=False)
    return {"base": gguf_model("llama_small", "f32"), "adapter": adapter}


def test_the_arm_is_the_only_difference(files):
    """At α = 0 the guided continuation is the base's, token for token (same prompt, same seed); at α = 2 the ARM
    changes some of them. Token-id prompts are shown as given."""
    from genarm_local import GuidedModel
    from genarm_local.evaluation.showcase import side_by_side

    with GuidedModel(files["base"], {str(files["adapter"]): 1.0}, n_ctx=256, n_threads=1) as model:
        name = next(iter(model.arm_weights()))
        same = side_by_side(model, name, 0.0, PROMPTS, max_tokens=12, seed=5)
        guided = side_by_side(model, name, 2.0, PROMPTS, max_tokens=12, seed=5)
        ids = [model.tokenize(p) for p in PROMPTS]
        shown = side_by_side(model, name, 2.0, ids, shown=["a", "b", "c"], max_tokens=12, seed=5)
    assert [s.prompt for s in same] == PROMPTS and all(s.base and s.guided == s.base for s in same)
    assert [s.base for s in guided] == [s.base for s in same]  # the base's side does not depend on α
    assert any(s.guided != s.base for s in guided)
    assert [s.prompt for s in shown] == ["a", "b", "c"] and [s.guided for s in shown] == [s.guided for s in guided]


def test_sample_lines_wrap_under_their_labels():
    from genarm_local.evaluation.showcase import SideBySide, sample_lines

    long_prompt = "word " * 40 + "and the end"
    samples = [
        SideBySide("Once upon\na  time", "the base " * 20, "the guided\n\nreply"),
        SideBySide(long_prompt, "", "x"),
    ]
    lines = sample_lines(samples, 0.4, width=60)
    assert lines[0] == "Once upon a time …"
    assert lines[1].startswith("  base   the base") and all(len(line) <= 60 for line in lines)
    continuation = [line for line in lines[2:] if line.startswith(" " * 9)]
    assert continuation and lines[1 + 1 + len(continuation)] == "  α=0.4  the guided reply"
    prompt_line = lines[2 + len(continuation) + 1]
    assert prompt_line.startswith("…") and prompt_line.endswith("and the end …") and len(prompt_line) <= 60
    assert lines[-2:] == ["  base   (nothing: it ended)", "  α=0.4  x"]


def test_calibrate_ends_with_samples_at_the_recommended_alpha(files, tmp_path):
    from genarm_local.core.arm_metadata import read_calibration

    arm = tmp_path / "arm.gguf"
    shutil.copy(files["adapter"], arm)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["calibrate", arm, "--base", files["base"], "--prompts", prompts, "--max-tokens", 6, "-t", 1]
    result = run_cli(*common, "--show", 2, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    curve, samples = result.stdout.split("\n\n")
    alpha = read_calibration(arm).recommended_alpha
    assert "recommended α" in curve and "wrote the calibration" in curve
    header, *lines = samples.splitlines()
    assert header == f"calibration prompts, continued by the base and by the ARM at its recommended α {alpha:.3g}:"
    shown = [line[: -len(" …")] for line in lines if not line.startswith(" ")]
    assert len(shown) == 2 and set(shown) <= set(PROMPTS)
    assert [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")] == [
        "base", f"α={alpha:.2g}", "base", f"α={alpha:.2g}",
    ]  # fmt: skip
    quiet = run_cli(*common, "--show", 0, "--no-write", cwd=tmp_path, timeout=300)
    assert quiet.returncode == 0 and "continued by" not in quiet.stdout, quiet.stderr
    assert_one_line_error(run_cli(*common, "--show", -1, cwd=tmp_path), "--show", "≥ 0")
