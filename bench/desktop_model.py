"""A synthetic desktop-sized base model and LoRA ARM, built offline, for speed measurements (issue 23).

    python bench/desktop_model.py [--out DIR] [--shape llama-3.2-1b|gemma-3-270m|tiny]

The embedded Gemma-3-270M spends most of a step in its 262k-token output layer; a common desktop model spends it in
its layers. To measure ratios where layers dominate without downloading one, this builds a model with the shapes
of Llama-3.2-1B (hidden 2048, 16 layers, 32 query / 8 KV heads, MLP 8192, 128,256-token vocabulary, tied
embeddings) from random weights, quantized to Q4_K_M by our converter, and a random rank-8 LoRA ARM over it on every
linear layer, as `genarm-local train` makes ARMs (its default target, "all-linear"), written as a GGUF LoRA adapter.
A step's speed depends on the shapes and the quantization types, not on the weights' values.

The tokenizer is the test fixtures' (tests/conftest.py): a byte-level BPE trained on tests/data/corpus.txt
(about 1,000 tokens). The converter pads the GGUF token list to the embedding's rows with unused [PAD] entries, as
for any checkpoint whose embedding is larger than its tokenizer, so llama.cpp's n_vocab is the full 128,256: every
step computes, mixes and samples 128,256 logits, as with the real model. Only tokenization differs (more tokens
per word), which no decode step sees.

``--shape gemma-3-270m`` builds a stand-in for the embedded base with its shapes (a machine that cannot receive the
real file, such as a lent GPU machine, measures on it); ``--shape tiny`` builds in seconds, for tests.

Outputs, in --out: <shape>-random-q4_k_m.gguf and <shape>-random-lora-r8.gguf, each written to a temporary file
and renamed when complete and loaded back by llama.cpp; existing outputs are kept (nothing is rebuilt). The last
line printed is a JSON object with both paths. Llama-3.2-1B: about 1.24 billion parameters, a 0.8 GB Q4_K_M file;
the build needs about 7 GB of free disk beside it while it runs (a bf16 checkpoint and the converter's bf16
intermediate) and about 8 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# torch's OpenMP workers spin after every parallel region by default and starve llama.cpp's quantizer threads in
# the same process (see tests/conftest.py); passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fixture_models import CONFIG_CLASSES, build_tokenizer  # noqa: E402

# name -> (HF class, vocabulary rows, config kwargs): the published configs' shapes.
SHAPES = {
    "llama-3.2-1b": (
        "LlamaForCausalLM",
        128256,
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=8192,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
        ),
    ),
    "gemma-3-270m": (
        "Gemma3ForCausalLM",
        262144,
        dict(
            hidden_size=640,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            intermediate_size=2048,
            sliding_window=512,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
        ),
    ),
    # widths of 256 so that the K-quants really run (not their fallbacks), as in the test fixtures
    "tiny": (
        "LlamaForCausalLM",
        2048,
        dict(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
    ),
}
DEFAULT_SHAPE = "llama-3.2-1b"
LORA_RANK = 8


def output_paths(out: Path, shape: str) -> tuple[Path, Path]:
    """Where the base model and the ARM adapter of ``shape`` are written."""
    return out / f"{shape}-random-q4_k_m.gguf", out / f"{shape}-random-lora-r{LORA_RANK}.gguf"


def fixture_tokenizer(out: Path):
    """The test fixtures' tokenizer (tests/fixture_models.build_tokenizer), saved to ``out``."""
    fast = build_tokenizer()
    fast.save_pretrained(out)
    return fast


def random_model(shape: str, tokenizer, seed: int = 0):
    """An HF model of ``shape`` with transformers' random initialisation, in bf16 (the real models' dtype)."""
    import torch
    import transformers

    hf_class, vocab_size, spec = SHAPES[shape]
    config = getattr(transformers, CONFIG_CLASSES[hf_class])(
        vocab_size=vocab_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **spec,
    )
    torch.manual_seed(seed)
    return getattr(transformers, hf_class)(config).eval().to(torch.bfloat16)


def save_random_lora(model, out: Path, seed: int = 1) -> Path:
    """A PEFT LoRA adapter of rank LORA_RANK with random A and B (the tests' lora_adapter recipe) on every linear
    layer but the output head, as `genarm-local train` targets by default. Wraps ``model`` in place."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, init_lora_weights=False, target_modules="all-linear")
    get_peft_model(model, config).save_pretrained(out)
    return out


def check_free_disk(directory: Path, n_params: int) -> None:
    """Fail before minutes of work when the checkpoint, the converter's intermediate and the output cannot fit."""
    need = int(n_params * (2 + 2 + 0.7))  # bf16 checkpoint + bf16 intermediate GGUF + Q4_K_M output
    free = shutil.disk_usage(directory).free
    if free < need:
        raise SystemExit(f"{directory}: {free / 2**30:.1f} GiB free, the build needs about {need / 2**30:.1f} GiB")


def build(out: Path, shape: str = DEFAULT_SHAPE, progress: bool = True) -> dict:
    """Build ``shape``'s base model and ARM adapter into ``out`` unless both exist; returns their paths."""
    from genarm_local.convert import convert, test_load_adapter

    base, arm = output_paths(out, shape)
    report = {"shape": shape, "base": str(base), "arm": str(arm)}
    if base.exists() and arm.exists():
        return {**report, "built": False}
    out.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {text}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    # The checkpoint and the adapter's intermediate live beside the outputs (same filesystem: renames are atomic)
    # and go when the build ends, whether it succeeds or not.
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{shape}-build-") as work:
        hf_dir = Path(work) / "hf"
        tokenizer = fixture_tokenizer(hf_dir)
        model = random_model(shape, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"random {shape}: {n_params / 1e9:.3f} billion parameters")
        check_free_disk(out, n_params)
        model.save_pretrained(hf_dir)
        lora_dir = save_random_lora(model, Path(work) / "lora")
        del model  # the converter reads the checkpoint back tensor by tensor; free the memory first
        say("checkpoint and PEFT adapter saved")
        if not base.exists():
            convert(hf_dir, base, outtype="q4_k_m", progress=progress)  # atomic, loaded back by llama.cpp
            say(f"{base.name}: {base.stat().st_size / 2**20:.0f} MiB")
        if not arm.exists():
            staged = Path(work) / arm.name
            convert(hf_dir, staged, outtype="f16", lora=lora_dir, adapter_only=True, progress=progress)
            test_load_adapter(base, staged)  # an HF source checks names and shapes; llama.cpp checks the rest
            os.replace(staged, arm)
            say(f"{arm.name}: {arm.stat().st_size / 2**20:.1f} MiB")
    return {**report, "built": True, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "genarm-desktop", help="output directory"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE, help="model shape to build")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.shape, progress=not args.quiet)), flush=True)


if __name__ == "__main__":
    main()
