"""What the README promises of the Python API on the real embedded model (Gemma-3-270M Q4_K_M, the shipped default
ARMs, default settings: f16 KV cache, llama.cpp's flash attention, every core):

- a request alone gives the same text for the same prompt, settings and seed, whatever ran before it;
- among other requests, an unguided one (short) gives the text it gives alone;
- close() with a stream open returns at once; dropped models free their memory;
- repeat_penalty acts under guidance as it does on the base alone.
"""

from __future__ import annotations

import gc
import re
import time

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["The hotel we stayed at was", "Honestly, the doctor's appointment made me feel", "The bus to work"]
SAMPLING = dict(max_tokens=32, seed=7)


@pytest.fixture(scope="module")
def model():
    from genarm_local import GuidedModel

    with GuidedModel() as guided:
        yield guided


def test_the_defaults_are_the_shipped_arms(model):
    from genarm_local.core.config import default_arms

    assert set(model.arm_weights()) == set(default_arms())
    positive = next(arm for arm in model.engine.arms if arm.name == "positive")
    assert positive.calibration is not None  # shipped calibrated, and run at that weight
    assert model.arm_weights()["positive"] == positive.calibration.recommended_alpha


def test_a_request_alone_gives_the_same_text_whatever_ran_before(model):
    first = [model.generate(prompt, **SAMPLING) for prompt in PROMPTS]
    # other work through the same slots: prompts sharing beginnings, other weights, longer outputs
    model.generate_batch([p + " really" for p in PROMPTS] + ["The hotel"], max_tokens=40, seed=1)
    model.generate(PROMPTS[0] + " not", weights={"positive": 2.0}, max_tokens=64)
    again = [model.generate(prompt, **SAMPLING) for prompt in reversed(PROMPTS)][::-1]
    assert [r.text for r in again] == [r.text for r in first]
    assert all(len(r.tokens) > 10 for r in first)


def test_among_other_requests_an_unguided_short_sequence_gets_its_text_alone(model):
    """What the README says holds among other requests: the base's rows are computed the same in any batch (under
    256 cached tokens, where llama.cpp's flash attention splits a lone row differently). A LoRA ARM's rows are not
    (llama.cpp's adapter matmuls round differently from one batch to another), so guided text among others is not
    promised to be the text alone; in a batch run it is fixed by the rows' positions instead."""
    off = {"positive": 0.0, "concise": 0.0}
    alone = [model.generate(prompt, seed=10 + i, max_tokens=24, weights=off) for i, prompt in enumerate(PROMPTS)]
    together = model.generate_batch(PROMPTS, seeds=[10, 11, 12], max_tokens=24, weights=off)
    assert [r.text for r in together] == [r.text for r in alone]
    # and beside a guided request in the same steps
    streams = [model.stream(PROMPTS[0], seed=10, max_tokens=24), model.stream(PROMPTS[1], seed=11, max_tokens=24,
                                                                              weights=off)]  # fmt: skip
    assert [s.drain().text for s in streams][1] == alone[1].text


def test_the_server_s_four_slots_give_each_unguided_request_its_text_alone():
    """`serve` decodes up to 4 requests together (-np 4): each unguided one still gets its text alone. llama.cpp's
    CPU weight repacking, on by default there, broke this from 4 rows on (native.Model turns it off)."""
    from genarm_local import GuidedModel

    prompts = [*PROMPTS, "My neighbour's dog"]
    off = {"positive": 0.0, "concise": 0.0}
    with GuidedModel(n_parallel=4) as model:
        alone = [
            model.generate(prompt, seed=20 + i, max_tokens=24, weights=off).text for i, prompt in enumerate(prompts)
        ]
        together = model.generate_batch(prompts, seeds=[20, 21, 22, 23], max_tokens=24, weights=off)
    assert [r.text for r in together] == alone


def test_close_with_an_open_stream_returns_within_a_second():
    from genarm_local import GuidedModel

    with GuidedModel() as guided:
        stream = guided.stream(PROMPTS[0], max_tokens=500)
        next(stream)
        start = time.perf_counter()
    assert time.perf_counter() - start < 1.0
    assert stream.drain().finish_reason == "cancelled"


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_models_dropped_without_close_free_their_memory():
    from genarm_local import GuidedModel

    def use_and_drop():
        model = GuidedModel()
        model.generate(PROMPTS[0], max_tokens=4)
        # dropped here, without close(), its engine thread idle

    use_and_drop()  # the first load maps the file and warms the allocator: measure from after it
    gc.collect()
    before = rss_mib()
    held = GuidedModel()
    held.generate(PROMPTS[0], max_tokens=4)
    one_model = rss_mib() - before  # what a model that is not freed keeps (its contexts, caches and buffers)
    held.close()
    del held
    for _ in range(4):
        use_and_drop()
    gc.collect()
    grown = rss_mib() - before
    # a leak keeps about one_model per drop (4x in all); the allocator's own slack is a small fraction of one
    assert grown < 0.5 * one_model, f"{grown:.0f} MiB more after 4 dropped models (one model holds {one_model:.0f})"


def repeated_trigrams(text: str) -> float:
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def test_repeat_penalty_cuts_loops_under_guidance_as_on_the_base(model):
    loop = "I like the sea. I like the sun. I like the sea. I like the sun. I like the sea. I like the sun. I like"
    share = {}
    for name, weights in (("base", {"positive": 0.0}), ("guided", None)):
        for penalty in (1.0, 1.6):
            result = model.generate(loop, weights=weights, temperature=0.0, max_tokens=48, repeat_penalty=penalty)
            share[name, penalty] = repeated_trigrams(result.text)
    base_cut = share["base", 1.0] - share["base", 1.6]
    guided_cut = share["guided", 1.0] - share["guided", 1.6]
    assert share["base", 1.0] > 0.5 and share["guided", 1.0] > 0.5, share  # the prompt loops without a penalty
    assert base_cut > 0.3 and guided_cut >= 0.5 * base_cut, share
