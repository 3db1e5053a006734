"""Speculative guided decoding (LoadConfig.draft_max, scheduler.py) is exact: on the tiny fixtures, 20,000 sampled
first tokens and 2-token sequences follow the guided distribution computed here in numpy from each model's own logits
(chi-square, p > 0.01), with and without truncation; next_token_logprobs is the same with speculation on; refused
drafts leave every cache; a seed gives the same text on every run; grammar and stop strings keep working."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from cli_helpers import model_files

PROMPT = "The history of the bicycle"
EXACT = dict(n_ctx=64, n_threads=1, kv_cache_type="f32", flash_attn=False)
N = 20_000


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


@pytest.fixture(scope="module")
def logits(files):
    """Every model's raw logits after the prompt and after each possible first token (numpy, from its own context)."""
    from genarm_local.core.config import LoadConfig
    from genarm_local.core.context import Context
    from genarm_local.core.native import Adapter, Model

    config = LoadConfig(base=str(files["base"]), arms=(), **EXACT)
    out = {}
    with Model(files["base"], config) as base, Model(files["big"], config) as big:
        tokens = base.tokenize(PROMPT)
        with Adapter(base, files["lora"]) as adapter:
            for name, model, adapters in (("base", base, []), ("big", big, []), ("lora", base, [(adapter, 1.0)])):
                with Context(model, config, adapters=adapters) as context:
                    first = context.logits_all(tokens)[-1][: base.n_vocab].astype(np.float64)
                    # after the prompt and token t: the prompt's cache is kept, one row per candidate
                    second = np.empty((base.n_vocab, base.n_vocab))
                    for t in range(base.n_vocab):
                        second[t] = context.logits_all([*tokens, t])[-1][: base.n_vocab]
                    out[name] = (first, second)
    return tokens, out


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def guided(rows: dict, arms: dict[str, float], temperature: float, top_k: int, banned=()) -> np.ndarray:
    """p ∝ base · Π arm^α at T·(1+Σα⁺) (scale_temperature), over the top_k best guided tokens (0: all), the
    ``banned`` tokens left out (ignore_eos)."""
    z = rows["base"] + sum(alpha * log_softmax(rows[name]) for name, alpha in arms.items())
    z[..., list(banned)] = -np.inf
    z = z / (temperature * (1 + sum(a for a in arms.values() if a > 0)))
    if top_k:
        cut = np.sort(z, axis=-1)[..., -top_k][..., None]
        z = np.where(z >= cut, z, -np.inf)
    return np.exp(log_softmax(z))


def chi_square_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """p-value of Pearson's chi-square, cells expected < 5 pooled into one (Wilson–Hilferty approximation)."""
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    wanted = np.append(expected[~small], expected[small].sum())
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    stat = float(((observed - wanted) ** 2 / wanted).sum())
    df = len(wanted) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("top_k", [0, 8], ids=["whole vocabulary", "top-k 8"])
def test_speculative_samples_follow_the_guided_distribution(files, logits, top_k):
    from genarm_local import GuidedModel

    tokens, rows = logits
    arms = {"lora": 1.0, "big": 0.5}
    weights = {str(files["lora"]): 1.0, str(files["big"]): 0.5}
    with GuidedModel(files["base"], weights, draft_max=3, n_parallel=16, **EXACT) as model:
        options = dict(temperature=1.0, top_k=top_k, top_p=1.0, min_p=0.0, max_tokens=2, ignore_eos=True)
        pairs = []
        for start in range(0, N, 1000):
            results = model.generate_batch([tokens] * 1000, seeds=range(start, start + 1000), **options)
            pairs += [tuple(result.tokens) for result in results]
        drafted, refused = model.engine.scheduler.drafted, model.engine.scheduler.refused
        eog = model.engine.base_model.eog_tokens()
    n_vocab = len(rows["base"][0])
    first = guided({name: r[0] for name, r in rows.items()}, arms, 1.0, top_k, eog)
    counts = np.bincount([a for a, _ in pairs], minlength=n_vocab)
    assert chi_square_p(counts, N * first) > 0.01
    # 2-token sequences: P(a, b) = p(a) · p(b | a), over every pair
    second = guided({name: r[1] for name, r in rows.items()}, arms, 1.0, top_k, eog)
    joint = (first[:, None] * second).ravel()
    counts = np.bincount([a * n_vocab + b for a, b in pairs], minlength=n_vocab * n_vocab)
    assert chi_square_p(counts, N * joint) > 0.01
    # every first token was a draft, checked: both branches ran (kept, and refused then drawn from the residual)
    assert drafted == N and 0.05 * N < refused < 0.95 * N


@pytest.fixture(scope="module")
def speculating(files):
    from genarm_local import GuidedModel

    with GuidedModel(files["base"], {str(files["lora"]): 1.0, str(files["big"]): 0.5}, draft_max=4, **EXACT) as model:
        yield model


@pytest.fixture(scope="module")
def plain(files):
    from genarm_local import GuidedModel

    with GuidedModel(files["base"], {str(files["lora"]): 1.0, str(files["big"]): 0.5}, **EXACT) as model:
        yield model


def test_next_token_logprobs_are_the_same_with_speculation(speculating, plain):
    for weights in ({}, {"llama_base-f32": 0.0}, {"llama_base-f32": -0.7}):
        assert np.array_equal(speculating.next_token_logprobs(PROMPT, weights=weights),
                              plain.next_token_logprobs(PROMPT, weights=weights))  # fmt: skip


def test_a_seed_gives_the_same_text_and_refused_drafts_leave_every_cache(speculating):
    scheduler = speculating.engine.scheduler
    before = scheduler.refused
    first = speculating.generate(PROMPT, seed=3, max_tokens=40, ignore_eos=True)
    assert scheduler.refused > before  # some drafts were refused and dropped along the way
    second = speculating.generate(PROMPT, seed=3, max_tokens=40, ignore_eos=True)
    assert first.tokens == second.tokens and len(first.tokens) == 40
    # what every context caches for the slot is the prompt and the reply but its last token, nothing refused
    slot = 0 if scheduler._cached[0][0][-1:] == first.tokens[-2:-1] else 1
    prompt = speculating.tokenize(PROMPT)
    for index in (0, 1, 2):
        assert scheduler._cached[index][slot] == prompt + first.tokens[:-1]


def test_reported_logprobs_stop_strings_and_grammar_act_under_speculation(speculating, plain):
    result = speculating.generate(PROMPT, seed=1, max_tokens=30, logprobs=2, ignore_eos=True)
    # the log-prob of each token is the guided one at its position, as without speculation
    for n, token in enumerate(result.tokens):
        expected = plain.next_token_logprobs(speculating.tokenize(PROMPT) + result.tokens[:n])
        assert result.logprobs[n] == pytest.approx(float(expected[token]), abs=1e-4)
    cut = result.text[len(result.text) // 2 :][:3]
    if cut.strip():
        stopped = speculating.generate(PROMPT, seed=1, max_tokens=30, stop=[cut], ignore_eos=True)
        assert stopped.text == result.text[: result.text.index(cut)] and stopped.finish_reason == "stop"
    for seed in range(3):
        digits = speculating.generate(PROMPT, seed=seed, max_tokens=12, grammar='root ::= [0-9] [0-9]? [0-9]? "."')
        assert re.fullmatch(r"[0-9]{1,3}\.", digits.text) and digits.finish_reason == "stop", digits
