"""Offline fixtures: a byte-level BPE tokenizer trained on tests/data/corpus.txt and tiny random-weight HF models
of every supported architecture, built once per session with fixed seeds. Nothing is downloaded.

Widths are multiples of 256 so the K-quants really run (not their fallbacks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP workers spin after every parallel region by default; in a process that also runs llama.cpp's
# threads on 2 cores that starves llama.cpp (steps ~100x slower). Passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fixture_models import COMMON, CONFIG_CLASSES, DATA, MODEL_SPECS, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("genarm")


@pytest.fixture(scope="session")
def tokenizer_dir(workdir) -> Path:
    """Byte-level BPE (qwen2 pre-tokenizer regex) trained on the test corpus, saved as an HF fast tokenizer."""
    out = workdir / "tokenizer"
    build_tokenizer().save_pretrained(out)
    return out


def build_model(name: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer

    hf_class, spec = MODEL_SPECS[name]
    spec = dict(spec)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab_size = len(tokenizer) + spec.pop("vocab_pad", 0)
    config = getattr(transformers, CONFIG_CLASSES[hf_class])(
        vocab_size=vocab_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **COMMON,
        **spec,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, hf_class)(config).eval()
    with torch.no_grad():  # norms away from their init so a mistake in handling them shows
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.copy_(param + 0.2 * torch.randn_like(param))
            elif pname.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    _fit_to_corpus(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _fit_to_corpus(model, tokenizer, steps: int = int(os.environ.get("FIT_STEPS", 40)), block: int = 128) -> None:
    """A few optimizer steps on the corpus: purely random models have near-flat, tie-prone next-token
    distributions, unlike real ones; a briefly trained model has confident predictions whose top-1 is meaningful
    to compare across quantization types."""
    import torch

    ids = tokenizer((DATA / "corpus.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor([ids[i : i + block] for i in range(0, len(ids) - block + 1, block // 2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(os.environ.get("FIT_LR", 1e-2)))
    model.train()
    for _ in range(steps):
        loss = model(blocks, labels=blocks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def hf_model(workdir, tokenizer_dir):
    """Factory: the checkpoint directory of a tiny model by name (built on first use, then cached)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_model(name, tokenizer_dir, workdir / name, seed=len(cache) + 1)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def gguf_model(workdir, hf_model):
    """Factory: (name, outtype) -> converted GGUF path, cached for the session."""
    from genarm_local.convert import convert

    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str = "f32") -> Path:
        key = (name, outtype)
        if key not in cache:
            cache[key] = convert(hf_model(name), workdir / f"{name}-{outtype}.gguf", outtype=outtype, progress=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def lora_adapter(workdir, hf_model) -> Path:
    """A PEFT LoRA adapter on llama_small with random (non-zero) A and B on every linear layer."""
    return random_lora(workdir / "lora_small", hf_model, seed=7)


@pytest.fixture(scope="session")
def second_lora_adapter(workdir, hf_model) -> Path:
    """Another, as lora_adapter with other random weights."""
    return random_lora(workdir / "lora_small_2", hf_model, seed=8)


def random_lora(out: Path, hf_model, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_model("llama_small"), dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # init_lora_weights=False is random but small; make the effect clearly visible
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.mul_(4.0)
    peft_model.save_pretrained(out)
    (out / "note.json").write_text(json.dumps({"base": "llama_small"}))
    return out
