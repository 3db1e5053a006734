"""bench/desktop_model.py and bench/batch_cost.py on the tiny shape (issue 23's desktop-sized measurements): the
synthetic base and its random LoRA ARM, built through our converter, load in GuidedModel, the ARM changes the mixed
distribution, a second build reuses the outputs, and batch_cost measures its curve on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_json(*command) -> dict:
    """Run a bench script; its last line of output is a JSON object."""
    done = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tiny_desktop_model_guides_and_measures(tmp_path):
    from genarm_local import GuidedModel

    built = run_json(BENCH / "desktop_model.py", "--shape", "tiny", "--out", tmp_path, "--quiet")
    assert built["built"]
    base, arm = Path(built["base"]), Path(built["arm"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([base.name, arm.name])  # no temporaries left

    with GuidedModel(base, arms={str(arm): 0.5}, n_ctx=128, n_threads=1, seed=0) as model:
        result = model.generate("Once upon a time", max_tokens=4, seed=1)
        guided = model.next_token_logprobs("Once upon a time")
        unguided = model.next_token_logprobs("Once upon a time", weights={str(arm): 0.0})
        assert model.engine.base_model.n_vocab == 2048  # the tokenizer padded to the embedding's rows
    assert 1 <= result.timings.generated_tokens <= 4
    assert np.abs(np.asarray(guided) - np.asarray(unguided)).max() > 1e-3  # the random ARM really steers

    assert run_json(BENCH / "desktop_model.py", "--shape", "tiny", "--out", tmp_path, "--quiet")["built"] is False

    report = run_json(
        BENCH / "batch_cost.py", "--model", base, "--lora", arm, "--max-k", "3", "--repeats", "2", "--threads", "1"
    )
    assert [point["k"] for point in report["curve"]] == [1, 2, 3]
    assert report["curve"][0]["ratio"] == 1.0 and all(point["ms"] > 0 for point in report["curve"])
    assert report["n_vocab"] == 2048 and report["lora"] == arm.name
