"""The guided stepping loop against independent references: the HF models' own logits, plain llama.cpp sampling,
and the loading checks (vocabulary, adapters, bad files)."""

from __future__ import annotations

import llama_cpp as lc
import numpy as np
import pytest
from helpers import hf_logits, last_logits, log_softmax, swapped_vocabulary

PROMPT = "The history of the bicycle"
EXACT = 1e-3


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    from genarm_local.convert import convert

    adapter = workdir / "engine-lora-adapter.gguf"
    if not adapter.exists():
        convert(hf_model("llama_small"), adapter, outtype="f32", lora=lora_adapter, adapter_only=True, progress=False)
    return {
        "small": gguf_model("llama_small", "f32"),
        "base": gguf_model("llama_base", "f32"),
        "adapter": adapter,
    }


@pytest.fixture(scope="module")
def hf(hf_model, lora_adapter):
    """The HF models the GGUF files came from (the PEFT model for the adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    load = lambda name: AutoModelForCausalLM.from_pretrained(hf_model(name), dtype=torch.float32).eval()  # noqa: E731
    return {
        "small": load("llama_small"),
        "base": load("llama_base"),
        "adapter": PeftModel.from_pretrained(load("llama_small"), lora_adapter).eval(),
    }


def reference_logprobs(hf_models, weights, ids, n_vocab):
    """log_softmax(log p_base + Σ_i w_i · term_i) at every position, from full-sequence HF forward passes, where
    term_i is log p_arm_i for w_i > 0 and max(0, log p_arm_i − log p_base) for w_i < 0 (steering away one-sidedly);
    ``hf_models[0]`` is the base (weight 1)."""
    rows = [log_softmax(hf_logits(None, ids, model=model)[:, :n_vocab]) for model in hf_models]
    mixed = weights[0] * rows[0]
    for row, w in zip(rows[1:], weights[1:], strict=True):
        mixed = mixed + w * (row if w > 0 else np.maximum(0.0, row - rows[0]))
    return log_softmax(mixed)


@pytest.mark.parametrize(
    "base, arms",
    [
        ("small", {"base": 1.0}),  # one full-model ARM (a stronger one, any size works)
        ("base", {"small": 0.7}),  # weak-to-strong: a smaller ARM guides the base
        ("small", {"adapter": 1.5}),  # a LoRA adapter ARM over the base's own model
        ("small", {"adapter": 0.8, "base": -0.4}),  # two ARMs, one steering away
    ],
    ids=["one-arm", "weak-to-strong", "lora-arm", "two-arms"],
)
def test_next_token_logprobs_match_the_formula_at_every_step(files, hf, base, arms):
    from genarm_local import GuidedModel

    arm_paths = {str(files[name]): alpha for name, alpha in arms.items()}
    # F32 cache and no flash attention (which rounds through F16 on CPU): float32-exact logits.
    options = dict(n_ctx=256, n_threads=1, kv_cache_type="f32", flash_attn=False, seed=11)
    with GuidedModel(files[base], arm_paths, **options) as model:
        prompt = model.tokenize(PROMPT)
        result = model.generate(prompt, max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
        ids = prompt + result.tokens
        # Walking forward one token at a time also exercises the KV-cache prefix reuse.
        ours = np.stack([model.next_token_logprobs(ids[:n]) for n in range(len(prompt), len(ids) + 1)])
        n_vocab = model.engine.n_vocab
    expected = reference_logprobs([hf[base]] + [hf[name] for name in arms], [1.0, *arms.values()], ids, n_vocab)
    expected = expected[len(prompt) - 1 :]
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < EXACT


def plain_llama_cpp_tokens(path, prompt, n, seed, top_k, top_p, min_p, temperature, repeat_penalty):
    """Sampling the base with llama.cpp alone, written as examples/simple does it."""
    from genarm_local.core.config import LoadConfig
    from genarm_local.core.context import Context
    from genarm_local.core.native import Model

    with Model(path) as model, Context(model, LoadConfig(n_threads=1), n_ctx=256) as context:
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        penalties = lc.llama_sampler_init_penalties(model.n_vocab, 64, repeat_penalty, 0.0, 0.0)
        for token in prompt[-64:]:  # llama.cpp's programs count the prompt's tokens too (common_sampler_accept)
            lc.llama_sampler_accept(penalties, token)
        for sampler in (
            penalties,
            lc.llama_sampler_init_top_k(top_k),
            lc.llama_sampler_init_top_p(top_p, 1),
            lc.llama_sampler_init_min_p(min_p, 1),
            lc.llama_sampler_init_temp(temperature),
            lc.llama_sampler_init_dist(seed),
        ):
            lc.llama_sampler_chain_add(chain, sampler)
        try:
            tokens, batch = list(prompt), prompt
            out = []
            for _ in range(n):
                array = (lc.llama_token * len(batch))(*batch)
                assert lc.llama_decode(context.ptr, lc.llama_batch_get_one(array, len(batch))) == 0
                token = lc.llama_sampler_sample(chain, context.ptr, -1)
                if model.is_eog(token):
                    break
                out.append(token)
                tokens.append(token)
                batch = [token]
            return out
        finally:
            lc.llama_sampler_free(chain)


def test_all_alphas_zero_is_plain_llama_cpp_sampling(files):
    from genarm_local import GuidedModel

    settings = dict(seed=1234, top_k=20, top_p=0.9, min_p=0.02, temperature=1.3, repeat_penalty=1.2)
    arms = {str(files["base"]): 0.0, str(files["adapter"]): 0.0}
    with GuidedModel(files["small"], arms, n_ctx=256, n_threads=1) as model:
        prompt = model.tokenize(PROMPT)
        ours = model.generate(prompt, max_tokens=40, **settings)
        # α = 0 skips the ARMs' decode altogether: their contexts are not even created
        assert model.engine.scheduler.contexts[1:] == [None, None]
    plain = plain_llama_cpp_tokens(files["small"], prompt, 40, **settings)
    assert len(plain) > 5
    assert ours.tokens == plain


def test_prefix_reuse_is_exact_and_in_whole_chunks(files):
    from genarm_local import GuidedModel
    from genarm_local.core.scheduler import PREFILL_CHUNK

    with GuidedModel(files["small"], {str(files["adapter"]): 1.0}, n_ctx=512, n_threads=1, n_parallel=1) as model:
        ids = model.tokenize((PROMPT + " begins in the early nineteenth century. ") * 20)[: PREFILL_CHUNK + 30]
        first = model.next_token_logprobs(ids)
        contexts = model.engine.scheduler.contexts
        before = [c.n_decoded for c in contexts]
        again = model.next_token_logprobs(ids)
        # the same prompt: only its last token is decoded again (its row was mixed in place)
        assert [c.n_decoded - b for c, b in zip(contexts, before, strict=True)] == [1, 1]
        np.testing.assert_array_equal(again, first)
        before = [c.n_decoded for c in contexts]
        other = ids[:-3] + ids[-2:]  # diverges 3 from the end, inside the second chunk: the first chunk is kept
        diverged = model.next_token_logprobs(other)
        assert [c.n_decoded - b for c, b in zip(contexts, before, strict=True)] == [len(other) - PREFILL_CHUNK] * 2
        with GuidedModel(files["small"], {str(files["adapter"]): 1.0}, n_ctx=512, n_threads=1) as fresh:
            np.testing.assert_array_equal(fresh.next_token_logprobs(other), diverged)  # bit for bit


def test_same_prompt_same_logits_whether_cached_or_not(gguf_model):
    """llama.cpp's numbers depend on how a sequence's tokens were grouped into decodes; a cached prompt is reused
    only where a fresh decode groups them the same way, so it gives the logits (and, with the same seed, the text) of
    a fresh one, also after other prompts sharing its beginning went through the same slots."""
    from genarm_local import GuidedModel

    with GuidedModel(gguf_model("llama_base", "q4_k_m"), n_ctx=256, n_threads=2) as model:
        ids = model.tokenize(PROMPT + " begins in the early nineteenth century")
        fresh = model.next_token_logprobs(ids)
        first = model.generate(ids, max_tokens=12, seed=3, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
        cached = model.next_token_logprobs(ids)  # the cache holds the prompt and the text generated after it
        np.testing.assert_array_equal(cached, fresh)
        again = model.generate(ids, max_tokens=12, seed=3, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
        assert again.tokens == first.tokens
        others = [ids[:n] + model.tokenize(" and then", add_special=False) for n in (3, 5, 7, 9)]
        model.generate_batch(others, max_tokens=4)  # every slot now holds a prompt that shares a prefix with ids
        np.testing.assert_array_equal(model.next_token_logprobs(ids), fresh)


# ---- loading errors ----------------------------------------------------------------------------------------------


def test_missing_file_and_non_gguf(files, tmp_path):
    from genarm_local import GuidedModel
    from genarm_local.core.errors import InputNotFoundError, NotACheckpointError

    with pytest.raises(InputNotFoundError, match="nope.gguf"):
        GuidedModel(tmp_path / "nope.gguf")
    with pytest.raises(InputNotFoundError, match="missing-arm.gguf"):
        GuidedModel(files["small"], {str(tmp_path / "missing-arm.gguf"): 1.0})
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(NotACheckpointError, match="junk.gguf"):
        GuidedModel(files["small"], {str(junk): 1.0})
    with pytest.raises(NotACheckpointError, match="adapter"):
        GuidedModel(files["adapter"])


def test_vocabulary_mismatch_names_the_first_differing_token(files, tmp_path, monkeypatch):
    from genarm_local import GuidedModel
    from genarm_local.core.context import Context
    from genarm_local.core.errors import VocabularyMismatchError
    from genarm_local.core.native import Adapter, Model

    opened = []

    def recording(init):
        def wrapped(self, *args, **kwargs):
            opened.append(self)
            init(self, *args, **kwargs)

        return wrapped

    for owner in (Model, Adapter, Context):
        monkeypatch.setattr(owner, "__init__", recording(owner.__init__))
    token, base_text, arm_text = swapped_vocabulary(files["base"], tmp_path / "other-vocab.gguf")
    arms = {str(files["adapter"]): 1.0, str(tmp_path / "other-vocab.gguf"): 1.0}
    with pytest.raises(VocabularyMismatchError) as info:
        GuidedModel(files["small"], arms, n_threads=1)
    message = str(info.value)
    assert f"token {token} " in message and repr(base_text) in message and repr(arm_text) in message
    # nothing half-loaded: the base model, the adapter and the refused model are all freed (contexts come after)
    assert len(opened) == 3 and all(owner._ptr is None for owner in opened)


def test_padded_arm_vocabulary_is_accepted(gguf_model):
    """qwen2's fixture pads its vocabulary: an ARM may have extra tokens past the base's."""
    from genarm_local import GuidedModel

    small, padded = gguf_model("llama_small", "f32"), gguf_model("qwen2", "f32")
    with GuidedModel(small, {str(padded): 1.0}, n_ctx=256, n_threads=1) as model:
        n_vocab = model.engine.n_vocab
        assert model.engine.arms[0].model.n_vocab > n_vocab
        ids = model.tokenize(PROMPT)
        logprobs = model.next_token_logprobs(ids)
    # Independent reference: each model's logits from a plain context, the ARM's padding rows dropped, the mix in
    # float64.
    base_logits = last_logits(small, ids, n_ctx=256, n_threads=1)
    arm_logits = last_logits(padded, ids, n_ctx=256, n_threads=1)
    assert len(arm_logits) > n_vocab
    expected = log_softmax(log_softmax(base_logits) + log_softmax(arm_logits[:n_vocab]))
    assert np.abs(expected - log_softmax(base_logits)).max() > 0.1  # the ARM moves the mix
    np.testing.assert_allclose(logprobs, expected, atol=EXACT)


def test_adapter_for_another_architecture(files, gguf_model):
    from genarm_local import GuidedModel
    from genarm_local.core.errors import AdapterMismatchError

    with pytest.raises(AdapterMismatchError, match="architecture"):
        GuidedModel(gguf_model("qwen3", "f32"), {str(files["adapter"]): 1.0})
    with pytest.raises(AdapterMismatchError):  # same architecture, other shapes
        GuidedModel(files["base"], {str(files["adapter"]): 1.0})


def test_every_sampling_option_at_alpha_zero_is_the_base_alone(files):
    """With its only ARM at α = 0 the guided model samples what the base alone samples, option by option; the
    guidance-only options (the guard, the paper's normalised form) do nothing then (the guard once masked the base
    row at α = 0 and changed the text)."""
    from genarm_local import GuidedModel

    options = dict(n_ctx=256, n_threads=1, kv_cache_type="f32", flash_attn=False)
    full = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}  # every token in play: a guard at α = 0 would show
    sampling = [
        {}, {"temperature": 0.0}, {"top_k": 5}, {"top_p": 0.5}, {"min_p": 0.2}, {"repeat_penalty": 1.5},
        {"frequency_penalty": 1.0}, {"presence_penalty": 1.0}, {"logit_bias": {260: 5.0}},
        {"guard_min_p": 0.5, **full}, {"normalized": True}, {"grammar": "root ::= [a-z ]+"},
    ]  # fmt: skip
    with (
        GuidedModel(files["small"], **options) as base,
        GuidedModel(files["small"], {str(files["adapter"]): 0.0}, **options) as guided,
    ):
        for extra in sampling:
            asked = {"max_tokens": 12, "temperature": 1.0, "seed": 3, **extra}
            plain = {k: v for k, v in asked.items() if k not in ("guard_min_p", "normalized")}
            assert guided.generate(PROMPT, **asked).tokens == base.generate(PROMPT, **plain).tokens, extra


def test_guard_masks_what_the_base_finds_implausible(files):
    """guard_min_p through the engine (the kernel's arithmetic is tested against float64 in test_kernel.py): the
    guided distribution keeps exactly the tokens with p_base ≥ τ · max p_base, is the unguarded mix renormalised over
    them, sampling never leaves them, and with every ARM off the guard changes nothing."""
    from genarm_local import GuidedModel

    options = dict(n_ctx=256, n_threads=1, kv_cache_type="f32", flash_attn=False)
    with GuidedModel(files["small"], {str(files["adapter"]): 1.5}, **options) as model:
        ids = model.tokenize(PROMPT)
        base = log_softmax(model.next_token_logprobs(ids, weights={"engine-lora-adapter": 0.0}).astype(np.float64))
        unguarded = model.next_token_logprobs(ids).astype(np.float64)
        tau = 0.05
        guarded = model.next_token_logprobs(ids, guard_min_p=tau).astype(np.float64)
        keep = base >= base.max() + np.log(tau)
        assert 1 < keep.sum() < len(keep)
        assert np.all(np.isneginf(guarded[~keep]))
        expected = unguarded[keep] - np.logaddexp.reduce(unguarded[keep])
        assert np.abs(guarded[keep] - expected).max() < 1e-4
        assert np.array_equal(model.next_token_logprobs(ids, guard_min_p=0.0), model.next_token_logprobs(ids))
        for seed in range(8):
            result = model.generate(ids, max_tokens=1, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                                    guard_min_p=tau, seed=seed)  # fmt: skip
            assert keep[result.tokens[0]]
        # with every ARM off the guard does nothing: α = 0 is the base's own output
        off = dict(weights={"engine-lora-adapter": 0.0}, max_tokens=12, temperature=1.0, seed=3)
        assert model.generate(ids, guard_min_p=tau, **off).tokens == model.generate(ids, **off).tokens
