"""The cost of decoding k tokens of one sequence in one llama.cpp decode, against one token (k = 1…8; issue 23).

    python bench/batch_cost.py [--model GGUF] [--lora ADAPTER] [--max-k 8] [--threads N] [--n-gpu-layers 0]
                               [--json OUT]

Speculative guided decoding verifies k draft tokens in an ARM's context with one decode of k tokens, every
position's logits requested (each draft token's acceptance needs its row); plain guided decoding spends k
single-token decodes on the same tokens. So ms(k) / ms(1), measured here, bounds what speculation can gain on this
machine: well below k where a step is bound by reading the weights (one pass serves k tokens), near k where it is
bound by arithmetic (the output layer's k rows of n_vocab logits on a CPU, say).

Method: one context, one sequence; the fixed prompt (bench_engine.PROMPT) decoded once; then for each k the block of
k tokens after it is decoded, timed from the call to llama_decode until llama_synchronize returns (a GPU backend
returns from llama_decode before its work is done), and removed from the cache again, so every block starts at the
same position. Each k's figure is the best of --repeats such decodes after one untimed warm-up. With --lora the
adapter is set on the context at scale 1, as an ARM's context has it. Default model: the embedded base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_engine import PROMPT, prompt_batch  # noqa: E402
from stamp import measurement_stamp, write_stamped  # noqa: E402


def block_batch(batch, prompt: list[int], k: int):
    """``batch`` refilled with k tokens of sequence 0 right after the prompt (the prompt's tokens again, cycled:
    the values do not change the cost), every logits row requested."""
    batch.clear()
    for i in range(k):
        batch.add(prompt[i % len(prompt)], len(prompt) + i, 0, True)
    return batch


def block_decode_s(context, batch, prompt: list[int], k: int, repeats: int) -> float:
    """Best of ``repeats`` timed decodes of the k-token block after the cached prompt (one untimed warm-up)."""
    import llama_cpp as lc

    best = float("inf")
    for attempt in range(repeats + 1):
        block_batch(batch, prompt, k)
        start = time.perf_counter()
        context.decode_batch(batch)
        lc.llama_synchronize(context.ptr)
        elapsed = time.perf_counter() - start
        if attempt:
            best = min(best, elapsed)
        context.truncate(0, len(prompt))  # the next block starts at the same position
    return best


def batch_cost(
    model: str | os.PathLike | None = None,
    lora: str | os.PathLike | None = None,
    max_k: int = 8,
    repeats: int = 7,
    threads: int | None = None,
    n_gpu_layers: int = 0,
) -> dict:
    """ms per decode of a k-token block and its ratio to k = 1, for k = 1…max_k (see the module's docstring)."""
    from genarm_local.core.config import LoadConfig, resolve_base
    from genarm_local.core.context import Batch, Context
    from genarm_local.core.native import Adapter, Model, supports_gpu_offload

    if n_gpu_layers != 0 and not supports_gpu_offload():
        raise SystemExit(
            f"--n-gpu-layers {n_gpu_layers}: this llama.cpp build has no GPU backend (llama_supports_gpu_offload is "
            "false); build llama-cpp-python with CUDA (bench/gpu_bench.sh) or Metal"
        )
    path = resolve_base(model)
    config = LoadConfig(n_threads=threads, n_gpu_layers=n_gpu_layers)
    curve = []
    with Model(path, config) as base:
        prompt = base.tokenize(PROMPT)
        adapter = Adapter(base, lora) if lora else None
        adapters = [(adapter, 1.0)] if adapter else []
        try:
            with (
                Context(base, config, n_ctx=len(prompt) + max_k + 16, adapters=adapters) as context,
                Batch(max(len(prompt), max_k)) as batch,
            ):
                context.decode_batch(prompt_batch(batch, prompt, 1))
                for k in range(1, max_k + 1):
                    seconds = block_decode_s(context, batch, prompt, k, repeats)
                    curve.append({"k": k, "ms": 1e3 * seconds})
        finally:
            if adapter:
                adapter.close()
        n_vocab, n_params = base.n_vocab, base.n_params
    for point in curve:
        point["ratio"] = point["ms"] / curve[0]["ms"]  # cost of k tokens in units of one single-token decode
        point["ms_per_token"] = point["ms"] / point["k"]
    return {
        "model": path.name,  # the file name only: no path of this machine in the results
        "model_bytes": path.stat().st_size,
        "n_params": n_params,
        "n_vocab": n_vocab,
        "lora": lora.name if lora else None,
        "threads": config.threads,
        "n_gpu_layers": n_gpu_layers,
        "gpu_offload": supports_gpu_offload(),
        "prompt_tokens": len(prompt),
        "repeats": repeats,
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF model; default: the embedded base")
    parser.add_argument("--lora", type=Path, default=None, help="GGUF LoRA adapter set on the context (an ARM's)")
    parser.add_argument("--max-k", type=int, default=8, help="largest block measured (k = 1 … max-k)")
    parser.add_argument("--repeats", type=int, default=7, help="timed decodes per k; the best counts")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (99: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here, stamped")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    if args.max_k < 1 or args.repeats < 1:
        parser.error("--max-k and --repeats must be at least 1")
    stamp = measurement_stamp(args.allow_dirty) if args.json else None  # refuse a dirty tree before measuring
    report = batch_cost(args.model, args.lora, args.max_k, args.repeats, args.threads, args.n_gpu_layers)
    print(f"{Path(report['model']).name}: {report['n_params'] / 1e9:.3f} B parameters, n_vocab {report['n_vocab']}")
    print(f"threads {report['threads']}, n_gpu_layers {report['n_gpu_layers']}, lora {report['lora']}")
    print(f"{'k':>3} {'ms/decode':>10} {'ratio to k=1':>13} {'ms/token':>9}")
    for point in report["curve"]:
        print(f"{point['k']:>3} {point['ms']:>10.3f} {point['ratio']:>13.2f} {point['ms_per_token']:>9.3f}")
    print(json.dumps(report))
    if args.json:
        write_stamped(args.json, report, stamp)


if __name__ == "__main__":
    main()
