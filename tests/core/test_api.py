"""GuidedModel end to end on the tiny fixtures: sampling options, weights per call, grammar, stop strings and
streaming, logprobs, cancellation, threads, errors."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
from helpers import last_logits, log_softmax

PROMPT = "The history of the bicycle"
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def paths(gguf_model, hf_model, lora_adapter, workdir):
    from genarm_local.convert import convert

    adapter = workdir / "engine-lora-adapter.gguf"
    if not adapter.exists():
        convert(hf_model("llama_small"), adapter, outtype="f32", lora=lora_adapter, adapter_only=True, progress=False)
    return gguf_model("llama_small", "f32"), adapter


@pytest.fixture(scope="module")
def model(paths):
    from genarm_local import GuidedModel

    base, adapter = paths
    with GuidedModel(base, {str(adapter): 1.0}, n_ctx=256, n_threads=1, seed=5) as guided:
        yield guided


def test_same_seed_same_tokens(model):
    first = model.generate(PROMPT, max_tokens=20, seed=42, **SAMPLED)
    again = model.generate(PROMPT, max_tokens=20, seed=42, **SAMPLED)
    other = model.generate(PROMPT, max_tokens=20, seed=43, **SAMPLED)
    assert first.tokens == again.tokens and first.text == again.text
    assert other.tokens != first.tokens
    assert (
        model.generate(PROMPT, max_tokens=20, **SAMPLED).tokens
        == model.generate(PROMPT, max_tokens=20, **SAMPLED).tokens
    )


def test_weights_per_call_without_reload(model, paths):
    from genarm_local import GuidedModel

    base, adapter = paths
    ids = model.tokenize(PROMPT)
    with GuidedModel(base, {str(adapter): 2.5}, n_ctx=256, n_threads=1) as loaded_at_2_5:
        expected = loaded_at_2_5.next_token_logprobs(ids)
    np.testing.assert_allclose(model.next_token_logprobs(ids, weights={adapter.stem: 2.5}), expected, atol=1e-3)
    at_one = model.next_token_logprobs(ids)
    assert np.abs(at_one - expected).max() > 0.1
    with GuidedModel(base, n_ctx=256, n_threads=1) as plain:
        np.testing.assert_allclose(
            model.next_token_logprobs(ids, weights={str(adapter): 0}), plain.next_token_logprobs(ids), atol=1e-3
        )
        unguided = plain.generate(PROMPT, max_tokens=15, seed=9, **SAMPLED).tokens
    assert model.generate(PROMPT, max_tokens=15, seed=9, weights={str(adapter): 0.0}, **SAMPLED).tokens == unguided


def test_logprobs_are_the_mixed_distribution(model):
    result = model.generate(PROMPT, max_tokens=8, seed=3, logprobs=3, **SAMPLED)
    ids = model.tokenize(PROMPT)
    assert len(result.logprobs) == len(result.tokens) == len(result.top_logprobs)
    for n, (token, logprob, top) in enumerate(zip(result.tokens, result.logprobs, result.top_logprobs, strict=True)):
        # decoded afresh as a prompt, not one token per step: llama.cpp rounds the two groupings differently
        expected = model.next_token_logprobs(ids + result.tokens[:n])
        assert logprob == pytest.approx(float(expected[token]), abs=2e-3)
        assert list(top) == [int(t) for t in np.argsort(expected)[::-1][:3]]


def test_normalized_form_is_the_papers(model, paths):
    base, adapter = paths
    ids = model.tokenize(PROMPT)
    alpha = 1.0
    # Independent of the engine: two plain llama.cpp contexts (base, base + adapter) and the paper's formula in
    # float64, (log p_base + α·log p_arm) / (1 + α), renormalized.
    options = dict(n_ctx=256, n_threads=1)
    base_logprobs = log_softmax(last_logits(base, ids, **options))
    arm_logprobs = log_softmax(last_logits(base, ids, adapter, **options))
    expected = log_softmax((base_logprobs + alpha * arm_logprobs) / (1 + alpha))
    assert np.abs(expected - log_softmax(base_logprobs / (1 + alpha))).max() > 0.1  # the ARM moves the mix
    np.testing.assert_allclose(model.next_token_logprobs(ids, normalized=True), expected, atol=1e-3)
    # (base + α·arm)/(1+α) sampled at T/(1+α) is our mix at T: the same tokens
    paper = model.generate(PROMPT, max_tokens=15, seed=8, normalized=True, **SAMPLED)
    assert paper.tokens == model.generate(PROMPT, max_tokens=15, seed=8, **SAMPLED).tokens


def test_scaled_temperature_samples_the_normalised_mix_at_t(model):
    """scale_temperature (the default) samples base·arm^α at T·(1+Σα⁺): the same tokens as the paper's
    product at that temperature, whichever row form (normalized or not) the mix is written in; it leaves the base
    alone (α = 0) and a negative weight (which sharpens nothing) as they are."""

    def tokens(weight: float, **options) -> list[int]:
        options = {**SAMPLED, **options}
        return model.generate(PROMPT, max_tokens=15, seed=9, weights={"engine-lora-adapter": weight}, **options).tokens

    scaled = tokens(1.0, temperature=0.7)
    assert scaled == tokens(1.0, temperature=1.4, scale_temperature=False)
    assert scaled != tokens(1.0, temperature=0.7, scale_temperature=False)
    assert scaled == tokens(1.0, temperature=0.7, normalized=True)
    assert tokens(0.0, temperature=0.7) == tokens(0.0, temperature=0.7, scale_temperature=False)
    assert tokens(-0.5, temperature=0.7) == tokens(-0.5, temperature=0.7, scale_temperature=False)


def test_grammar_constrains_guided_output(model):
    grammar = 'root ::= "yes" | "no" | "maybe"'
    for seed in range(4):
        result = model.generate(PROMPT, max_tokens=10, seed=seed, grammar=grammar, **SAMPLED)
        assert result.text in {"yes", "no", "maybe"}
        assert result.finish_reason == "stop"
    # A grammar that must end within the token budget: the output is complete, then the grammar allows only EOS.
    bounded = 'root ::= [0-9] [0-9]? [0-9]? " km"'
    for seed in range(3):
        digits = model.generate(PROMPT, max_tokens=16, seed=seed, grammar=bounded, **SAMPLED)
        assert re.fullmatch(r"[0-9]{1,3} km", digits.text), digits.text
        assert digits.finish_reason == "stop"


def test_stop_strings_spanning_tokens_are_never_emitted(model):
    full = model.generate(PROMPT, max_tokens=40, temperature=0.0)
    pieces = [model.detokenize([t]) for t in full.tokens]
    # a stop string that starts inside one token and ends inside a later one
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = full.text[start : start + len(pieces[2]) + 2]
    assert len(stop) >= 3
    result = model.generate(PROMPT, max_tokens=40, temperature=0.0, stop=["\x00never", stop])
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.find(stop)]
    stream = model.stream(PROMPT, max_tokens=40, temperature=0.0, stop=stop)
    assert "".join(r.text for r in stream) == result.text
    assert stream.result.finish_reason == "stop" and stream.result.text == result.text


def test_stream_equals_generate(model):
    result = model.generate(PROMPT, max_tokens=30, seed=4, **SAMPLED)
    assert "".join(r.text for r in model.stream(PROMPT, max_tokens=30, seed=4, **SAMPLED)) == result.text
    assert result.finish_reason in {"length", "stop"}
    assert result.timings.generated_tokens >= len(result.tokens)
    assert result.timings.generated_tokens_per_s > 0


def test_split_utf8_characters_are_held_back():
    from genarm_local.core.text import StopText

    chunks = {1: "é".encode()[:1], 2: "é".encode()[1:] + b"x", 3: "€".encode()[:2], 4: "€".encode()[2:]}
    text = StopText(chunks.__getitem__, ["x€"])
    assert text.push(1) == ("", False)
    assert text.push(2) == ("é", False)  # "x" is held: it may begin the stop string
    assert text.push(3) == ("", False)
    assert text.push(4) == ("", True)


def test_a_new_speakers_label_ends_a_plain_transcript_reply():
    """stop_at_turns: a new line opening with "Name:" ends the reply (never emitted); a new line that cannot become
    a label is released as soon as that is clear."""
    from genarm_local.core.text import StopText

    def feed(pieces):
        chunks = {i: piece.encode() for i, piece in enumerate(pieces)}
        text, out = StopText(chunks.__getitem__, [], turn_labels=True), []
        for i in chunks:
            piece, stopped = text.push(i)
            out.append(piece)
            if stopped:
                return out, True
        return out + [text.flush()], False

    assert feed([" Fine, thanks.", "\n", "Stu", "dent", ":", " and you?"]) == ([" Fine, thanks.", "", "", "", ""], True)
    assert feed([" Sure.", "\n", "Dr Smith", ": hello"]) == ([" Sure.", "", "", ""], True)
    assert feed([" One", "\n", "two", " three"]) == ([" One", "", "\ntwo", " three", ""], False)
    assert feed([" It is 10:30", " now"]) == ([" It is 10:30", " now", ""], False)
    plain = StopText({0: b"A\nUser: x"}.__getitem__, [])
    assert plain.push(0) == ("A\nUser: x", False)  # off unless asked for


def test_cancellation(model):
    event = threading.Event()
    event.set()
    assert model.generate(PROMPT, max_tokens=20, cancel=event).finish_reason == "cancelled"
    calls = []  # a function is polled while the caller waits: the generation ends soon after it says so
    result = model.generate(PROMPT, max_tokens=200, temperature=0.0, cancel=lambda: calls.append(1) or len(calls) > 3)
    assert result.finish_reason == "cancelled" and len(result.tokens) < 200


def test_threads_share_the_decode_loops_steps(model):
    """Four threads generating at once run in the same steps (one batch), and each gets the tokens it gets alone."""
    expected = {seed: model.generate(PROMPT, max_tokens=12, seed=seed, **SAMPLED).tokens for seed in range(4)}
    got, running = {}, []
    scheduler = model.engine.scheduler
    model.engine.after_step.append(lambda: running.append(len(scheduler.running)))
    start = threading.Barrier(4)

    def run(seed):
        start.wait()
        got[seed] = model.generate(PROMPT, max_tokens=12, seed=seed, **SAMPLED).tokens

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        model.engine.after_step.clear()
    assert got == expected
    assert max(running) > 1  # they shared steps rather than queueing one after another


def test_stream_yields_a_response_per_step_with_the_finish_and_timings_on_the_last(model):
    from genarm_local import GenerationResponse

    result = model.generate(PROMPT, max_tokens=12, seed=5, logprobs=2, **SAMPLED)
    responses = list(model.stream(PROMPT, max_tokens=12, seed=5, logprobs=2, **SAMPLED))
    assert all(isinstance(r, GenerationResponse) for r in responses)
    assert [r.token for r in responses if r.token is not None] == result.tokens
    assert "".join(r.text for r in responses) == result.text
    assert [r.logprob for r in responses if r.token is not None] == result.logprobs
    assert [r.top_logprobs for r in responses if r.token is not None] == result.top_logprobs
    assert all(len(r.top_logprobs) == 2 for r in responses if r.token is not None)
    assert all(r.finish_reason is None and r.timings is None for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == result.finish_reason and last.finish_reason in {"length", "stop"}
    assert last.timings.generated_tokens == len(result.tokens)
    plain = list(model.stream(PROMPT, max_tokens=4, seed=5, **SAMPLED))  # log-probs only when asked
    assert all(r.logprob is None and r.top_logprobs is None for r in plain) and plain[-1].finish_reason


def test_two_threads_streaming_at_once_each_get_their_own_results(model):
    alone = {seed: model.generate(PROMPT, max_tokens=16, seed=seed, logprobs=1, **SAMPLED) for seed in (21, 22)}
    got = {}
    start = threading.Barrier(2)

    def run(seed):
        stream = model.stream(PROMPT, max_tokens=16, seed=seed, logprobs=1, **SAMPLED)
        start.wait()
        responses = list(stream)
        got[seed] = ([r.token for r in responses if r.token is not None], stream.result)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in alone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, (tokens, result) in got.items():
        assert tokens == result.tokens == alone[seed].tokens
        np.testing.assert_allclose(result.logprobs, alone[seed].logprobs, atol=2e-3)  # batched: rounded apart
    assert got[21][0] != got[22][0]


def test_streams_in_one_thread_interleave_each_with_its_own_result(model):
    first = model.stream(PROMPT, max_tokens=10, seed=1, **SAMPLED)
    second = model.stream(PROMPT, max_tokens=10, seed=2, **SAMPLED)
    pieces = [next(first).text, next(second).text]
    pieces[0] += "".join(r.text for r in first)
    pieces[1] += "".join(r.text for r in second)
    assert pieces == [first.result.text, second.result.text]
    alone = [model.generate(PROMPT, max_tokens=10, seed=seed, **SAMPLED) for seed in (1, 2)]
    assert [first.result.tokens, second.result.tokens] == [r.tokens for r in alone]
    assert first.result.tokens != second.result.tokens


def test_bad_options(model):
    from genarm_local.core.errors import ContextOverflowError, InvalidOptionError

    with pytest.raises(InvalidOptionError, match="top_q"):
        model.generate(PROMPT, top_q=0.5)
    with pytest.raises(InvalidOptionError, match="top_p"):
        model.generate(PROMPT, top_p=1.5)
    with pytest.raises(InvalidOptionError, match="unknown ARM"):
        model.generate(PROMPT, weights={"nonexistent": 1.0})
    with pytest.raises(InvalidOptionError, match="grammar"):
        model.generate(PROMPT, max_tokens=5, grammar='root ::= "unterminated')
    base = model.engine.scheduler.contexts[0]
    decoded = base.n_decoded
    with pytest.raises(ContextOverflowError, match="context"):
        model.generate(list(range(300)))
    with pytest.raises(ContextOverflowError, match="context"):
        model.next_token_logprobs(list(range(256)))
    assert base.n_decoded == decoded  # refused before any decoding
    assert model.generate(PROMPT, max_tokens=3).tokens  # still usable


def test_close_frees_and_refuses_further_calls(paths):
    from genarm_local import GuidedModel
    from genarm_local.core.errors import ModelClosedError

    guided = GuidedModel(paths[0], {str(paths[1]): 1.0}, n_ctx=256, n_threads=1)
    assert guided.generate(PROMPT, max_tokens=3).tokens
    guided.close()
    guided.close()
    with pytest.raises(ModelClosedError, match="closed"):
        guided.generate(PROMPT)
    engine = guided._engine
    assert not engine._thread.is_alive() and engine._pool is None  # no thread of this model is left running


def test_close_with_a_stream_open_in_the_same_thread_returns_at_once(paths):
    """The README's `with GuidedModel(...) as m:` block, left with a stream still open: close() ends the stream (its
    finish reason says so) instead of waiting for it."""
    from genarm_local import GuidedModel

    with GuidedModel(paths[0], {str(paths[1]): 1.0}, n_ctx=256, n_threads=1) as guided:
        stream = guided.stream(PROMPT, max_tokens=200, **SAMPLED)
        first = next(stream).text
        start = time.perf_counter()
    assert time.perf_counter() - start < 1.0
    rest = "".join(r.text for r in stream)  # what was generated before the close, then the end
    assert stream.result.finish_reason == "cancelled" and stream.result.text == first + rest
    assert len(stream.result.tokens) < 200


def test_close_from_another_thread_cancels_what_runs(paths):
    from genarm_local import GuidedModel

    guided = GuidedModel(paths[0], {str(paths[1]): 1.0}, n_ctx=256, n_threads=1)
    stream = guided.stream(PROMPT, max_tokens=200, **SAMPLED)
    next(stream)
    closer = threading.Thread(target=guided.close)
    closer.start()
    result = stream.drain()
    closer.join(timeout=1.0)
    assert not closer.is_alive() and result.finish_reason == "cancelled" and len(result.tokens) < 200


# ---- chat --------------------------------------------------------------------------------------------------------


def test_chat_renders_the_gguf_template_and_reuses_the_cache(paths):
    from genarm_local import GuidedModel
    from genarm_local.core.scheduler import PREFILL_CHUNK

    with GuidedModel(paths[0], {str(paths[1]): 1.0}, n_ctx=1024, n_threads=1) as model:
        chat_turns(model, PREFILL_CHUNK)


def chat_turns(model, chunk: int) -> None:
    messages = [{"role": "system", "content": "You answer questions about bicycles. " * 8}]
    messages += [{"role": "user", "content": "Tell me about the bicycle."}]
    rendered = model.chat_template.render(model.engine.base_model, messages[1:])
    assert rendered.text == "<|im_start|>user\nTell me about the bicycle.<|im_end|>\n<|im_start|>assistant\n"
    decoded, prompt_lengths = [], []
    for turn in range(3):
        reply = model.chat(messages, max_tokens=12, seed=turn, **SAMPLED)
        decoded.append(reply.timings.prompt_decoded)
        prompt_lengths.append(reply.timings.prompt_tokens)
        messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And then?"}]
    # a turn decodes what follows the last whole chunk of the previous prompt: the history before it is reused
    assert prompt_lengths[0] > chunk
    for turn in (1, 2):
        assert decoded[turn] < prompt_lengths[turn] - prompt_lengths[turn - 1] + chunk
        assert decoded[turn] <= prompt_lengths[turn] - chunk
    streamed = "".join(r.text for r in model.chat(messages, max_tokens=12, seed=7, stream=True, **SAMPLED))
    assert streamed == model.chat(messages, max_tokens=12, seed=7, **SAMPLED).text


def test_concurrent_decoding_gives_the_same_tokens(model, paths):
    from genarm_local import GuidedModel

    with GuidedModel(paths[0], {str(paths[1]): 1.0}, n_ctx=256, n_threads=2, concurrent=True) as concurrent:
        tokens = concurrent.generate(PROMPT, max_tokens=20, temperature=0.0).tokens
        assert all(context.n_decoded > 0 for context in concurrent.engine.scheduler.contexts)
    assert tokens == model.generate(PROMPT, max_tokens=20, temperature=0.0).tokens


def test_generate_batch_matches_one_at_a_time(paths):
    from genarm_local import GuidedModel

    prompts = [PROMPT, "Early designs had no pedals", "Cycling became popular with people of all ages, and"]
    options = dict(n_ctx=256, n_threads=1, kv_cache_type="f32", flash_attn=False)
    with GuidedModel(paths[0], {str(paths[1]): 0.8}, **options) as model:
        batched = model.generate_batch(prompts, max_tokens=10, seed=21, **SAMPLED)
        single = [model.generate(p, max_tokens=10, seed=21 + i, **SAMPLED) for i, p in enumerate(prompts)]
        assert [r.tokens for r in batched] == [r.tokens for r in single]
        assert [r.text for r in batched] == [r.text for r in single]
        alone = model.generate(prompts[1], max_tokens=10, temperature=0.0).text
        stop = alone[3:6]
        assert len(stop) == 3
        greedy = model.generate_batch(prompts, max_tokens=10, temperature=0.0, stop=stop)
        assert greedy[1].finish_reason == "stop" and greedy[1].text == alone[: alone.find(stop)]
        assert greedy[0].finish_reason in {"length", "stop"}
        unguided = model.generate_batch(prompts[:2], max_tokens=6, seed=2, weights={paths[1].stem: 0}, **SAMPLED)
        assert [r.tokens for r in unguided] == [
            model.generate(p, max_tokens=6, seed=2 + i, weights={paths[1].stem: 0}, **SAMPLED).tokens
            for i, p in enumerate(prompts[:2])
        ]


def test_no_memory_growth_over_1000_calls(model):
    def rss_kib() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    for _ in range(100):  # warm-up: allocator pools, lazily built tables
        model.generate(PROMPT, max_tokens=2, logprobs=2, stop="zz")
    before = rss_kib()
    for _ in range(1000):
        model.generate(PROMPT, max_tokens=2, logprobs=2, stop="zz")
    assert rss_kib() - before < 4096


def test_generate_batch_returns_log_probs_when_asked(model):
    prompts = [PROMPT, PROMPT + " It"]
    batch = model.generate_batch(prompts, max_tokens=8, seeds=[3, 4], logprobs=2, **SAMPLED)
    for prompt, seed, result in zip(prompts, (3, 4), batch, strict=True):
        alone = model.generate(prompt, max_tokens=8, seed=seed, logprobs=2, **SAMPLED)
        assert result.tokens == alone.tokens and len(result.logprobs) == len(result.tokens)
        np.testing.assert_allclose(result.logprobs, alone.logprobs, atol=2e-3)  # batched: rounded apart
        assert [set(t) for t in result.top_logprobs] == [set(t) for t in alone.top_logprobs]
    assert model.generate_batch(prompts, max_tokens=2, **SAMPLED)[0].logprobs is None
