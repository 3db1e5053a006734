"""LoadConfig.merge_arms (approximate): the LoRA ARMs a request weights positively run in one context of the base,
adapter i at scale α_i/Σα, mixed once at Σα. Checked against llama.cpp contexts built here with those adapters and
numpy's formula; with one adapter given twice the approximation is exact; negative weights and full-model ARMs stay
exact; each ratio of weights gets its context, and idle ones are reused for new ratios."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from cli_helpers import model_files

PROMPT = "The history of the bicycle"
EXACT = dict(n_ctx=64, n_threads=1, kv_cache_type="f32", flash_attn=False)


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, second_lora_adapter, workdir):
    from genarm_local.convert import convert

    files = model_files(gguf_model, hf_model, lora_adapter, workdir)
    files["lora2"] = workdir / "engine-lora-adapter-2.gguf"
    if not files["lora2"].exists():
        convert(hf_model("llama_small"), files["lora2"], outtype="f32", lora=second_lora_adapter,
                adapter_only=True, progress=False)  # fmt: skip
    files["lora_copy"] = workdir / "engine-lora-adapter-copy.gguf"
    shutil.copyfile(files["lora"], files["lora_copy"])
    return files


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max()
    return z - np.log(np.exp(z).sum())


def model(files, *names, merge=True, **options):
    from genarm_local import GuidedModel

    return GuidedModel(files["base"], {str(files[name]): None for name in names}, merge_arms=merge, **EXACT, **options)


def test_two_adapters_follow_the_merged_formula(files):
    from genarm_local.core.config import LoadConfig
    from genarm_local.core.context import Context
    from genarm_local.core.native import Adapter, Model

    weights = {"engine-lora-adapter": 0.4, "engine-lora-adapter-2": 1.2}
    with model(files, "lora", "lora2") as merged, model(files, "lora", "lora2", merge=False) as exact:
        got = merged.next_token_logprobs(PROMPT, weights=weights)
        plain = exact.next_token_logprobs(PROMPT, weights=weights)
    config = LoadConfig(base=str(files["base"]), arms=(), **EXACT)
    with Model(files["base"], config) as base, Adapter(base, files["lora"]) as a, Adapter(base, files["lora2"]) as b:
        tokens = base.tokenize(PROMPT)
        with Context(base, config) as context:
            base_row = context.logits_all(tokens)[-1][: base.n_vocab]
        with Context(base, config, adapters=[(a, 0.25), (b, 0.75)]) as context:
            merged_row = context.logits_all(tokens)[-1][: base.n_vocab]
    expected = log_softmax(base_row + 1.6 * log_softmax(merged_row))
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert np.abs(plain - got).max() > 0.01  # an approximation: not the exact product


def test_one_adapter_given_twice_merges_exactly(files):
    weights = {"engine-lora-adapter": 0.3, "engine-lora-adapter-copy": 0.5}
    with model(files, "lora", "lora_copy") as merged, model(files, "lora", "lora_copy", merge=False) as exact:
        np.testing.assert_allclose(
            merged.next_token_logprobs(PROMPT, weights=weights), exact.next_token_logprobs(PROMPT, weights=weights),
            atol=2e-4,
        )  # fmt: skip
        assert len(merged.engine.scheduler.contexts) == 4  # base, two ARMs (never made), one merged


@pytest.mark.parametrize(
    "weights",
    [
        {"engine-lora-adapter": 0.5, "engine-lora-adapter-2": -0.5, "llama_base-f32": 0.3},
        {"engine-lora-adapter": 0.5, "engine-lora-adapter-2": 0, "llama_base-f32": 0.3},
    ],
)
# fmt: skip
def test_negative_weights_and_full_models_stay_exact(files, weights):
    with model(files, "lora", "lora2", "big") as merged, model(files, "lora", "lora2", "big", merge=False) as exact:
        assert np.array_equal(merged.next_token_logprobs(PROMPT, weights=weights),
                              exact.next_token_logprobs(PROMPT, weights=weights))  # fmt: skip
        assert len(merged.engine.scheduler.contexts) == 4  # no merged context


def test_each_ratio_gets_a_context_and_idle_ones_are_reused(files):
    from genarm_local.core.scheduler import MERGED_CONTEXTS

    ratios = [{"engine-lora-adapter": a, "engine-lora-adapter-2": 1.0 - a} for a in (0.2, 0.5, 0.7, 0.9)]
    with model(files, "lora", "lora2", seed=3) as merged:
        first = [merged.generate(PROMPT, weights=w, max_tokens=12).text for w in ratios]
        assert len(merged.engine.scheduler.contexts) == 3 + MERGED_CONTEXTS
        again = [merged.generate(PROMPT, weights=w, max_tokens=12).text for w in ratios]
        both = merged.generate_batch([PROMPT] * 2, weights=ratios[0], max_tokens=12, seeds=[3, 3])
    assert again == first and [r.text for r in both] == first[:1] * 2
    with model(files, "lora", "lora2", seed=3, draft_max=3) as speculating:
        result = speculating.generate(PROMPT, weights=ratios[1], max_tokens=12)
        assert result.finish_reason == "length" and len(result.tokens) == 12
