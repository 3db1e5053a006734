"""Where converted weights come from: an HF checkpoint directory (read lazily, tensor by tensor) or a model that
transformers has loaded (a GGUF-only base, or a base with a PEFT adapter merged in)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from genarm_local.core.errors import (
    AdapterMismatchError,
    InputNotFoundError,
    NotACheckpointError,
    UnsupportedArchitectureError,
    require,
)

from .architectures import HF_CLASS_FOR_GGUF_ARCH, Architecture, architecture_for
from .vocab import copy_vocab_from_gguf, write_vocab


@dataclass
class Checkpoint:
    """A model to export: its config, its tensors by HF name, and how to write its tokenizer."""

    source: Path
    config: dict
    hf_arch: str
    arch: Architecture
    shapes: dict[str, tuple[int, ...]]
    load: Callable[[str], np.ndarray]  # HF tensor name -> float32 array
    write_vocab: Callable[[gguf.GGUFWriter, int], None]
    source_dtype: str = "float32"
    # For a GGUF source: the architecture keys of the original file, carried over unchanged.
    gguf_reader: gguf.GGUFReader | None = None
    # The weights differ from the source's (a LoRA merged in): metadata that describes the source's weights, such
    # as an ARM's calibration (genarm.calibration.*), is not carried over.
    weights_changed: bool = False
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_numpy(tensor) -> np.ndarray:
    torch = require("torch", "train")
    return tensor.detach().to(torch.float32).cpu().numpy()


# safetensors' dtype names -> torch's
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _weight_files(model_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).exists():
            return [model_dir / name]
    return []


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise NotACheckpointError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NotACheckpointError(f"{path} is not valid JSON: {exc}") from exc


def open_hf_dir(model_dir: Path) -> Checkpoint:
    """Open an HF checkpoint directory without loading its weights: tensors are read one at a time on demand."""
    config = read_config(model_dir)
    hf_arch, arch = architecture_for(config, str(model_dir))
    files = _weight_files(model_dir)
    if not files:
        raise NotACheckpointError(f"{model_dir} has a config.json but no model.safetensors or pytorch_model.bin")
    torch = require("torch", "train")
    safetensors = require("safetensors", "train")
    shapes: dict[str, tuple[int, ...]] = {}
    readers: dict[str, Callable[[], object]] = {}
    closers: list[Callable[[], None]] = []
    dtypes: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            handle = safetensors.safe_open(str(path), framework="pt")
            closers.append(lambda h=handle: h.__exit__(None, None, None))
            for name in handle.keys():
                view = handle.get_slice(name)
                shapes[name] = tuple(view.get_shape())
                dtypes.add(_DTYPE_NAMES.get(view.get_dtype(), "float32"))
                readers[name] = lambda h=handle, n=name: h.get_tensor(n)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                shapes[name] = tuple(tensor.shape)
                dtypes.add(str(tensor.dtype).removeprefix("torch."))
                readers[name] = lambda t=tensor: t
    # The widest float type present decides the precision a quantized export passes through.
    source_dtype = next((d for d in ("float32", "bfloat16", "float16") if d in dtypes), "float32")
    return Checkpoint(
        source=model_dir,
        config=config,
        hf_arch=hf_arch,
        arch=arch,
        shapes=shapes,
        load=lambda name: _to_numpy(readers[name]()),
        write_vocab=lambda writer, n_vocab: write_vocab(writer, model_dir, n_vocab, arch.name),
        source_dtype=source_dtype,
        _closers=closers,
    )


def checkpoint_from_model(model, source: Path, reader: gguf.GGUFReader | None) -> Checkpoint:
    """A Checkpoint over a loaded transformers model; the tokenizer comes from the source GGUF or HF directory."""
    config = model.config.to_dict()
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    hf_arch, arch = architecture_for(config, str(source))
    state = model.state_dict()
    if reader is not None:
        vocab = lambda writer, n_vocab: copy_vocab_from_gguf(writer, reader)  # noqa: E731
    else:
        vocab = lambda writer, n_vocab: write_vocab(writer, source, n_vocab, arch.name)  # noqa: E731
    return Checkpoint(
        source=source,
        config=config,
        hf_arch=hf_arch,
        arch=arch,
        shapes={name: tuple(t.shape) for name, t in state.items()},
        load=lambda name: _to_numpy(state[name]),
        write_vocab=vocab,
        source_dtype=str(model.dtype).removeprefix("torch."),
        gguf_reader=reader,
    )


def gguf_architecture(path: Path) -> tuple[gguf.GGUFReader, str]:
    """The reader and architecture of a GGUF file, refusing an architecture transformers cannot load."""
    from genarm_local.core.native import check_gguf_path

    check_gguf_path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise NotACheckpointError(f"{path}: cannot read GGUF ({exc})") from exc
    field_ = reader.fields.get("general.architecture")
    arch = field_.contents() if field_ else None
    if arch not in HF_CLASS_FOR_GGUF_ARCH:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(HF_CLASS_FOR_GGUF_ARCH)}"
        )
    return reader, arch


def load_transformers_model(source: Path, progress: bool = True):
    """Load a GGUF file (dequantized to float32, trainable) or an HF directory with transformers.

    Returns (model, gguf_reader or None). Used when weights must pass through transformers: merging an adapter
    with PEFT, or a GGUF-only base. ``progress`` False silences transformers' own GGUF loading bar too.
    """
    transformers = require("transformers", "train")
    torch = require("torch", "train")
    # Our own progress bar covers the export; transformers' bars and notices would bury a one-line error.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if source.is_file():
        reader, _ = gguf_architecture(source)
        with _gguf_loading_bar(progress):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(source.parent),
                gguf_file=source.name,
                quantization_config=transformers.GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
        return model, reader
    read_config(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    return model, None


@contextlib.contextmanager
def _gguf_loading_bar(enabled: bool) -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar and ignores disable_progress_bar() (transformers 5.x:
    modeling_gguf_pytorch_utils calls tqdm.auto.tqdm directly); with progress off, hand it a disabled bar."""
    try:
        module = None if enabled else importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        module = None
    if module is None or not hasattr(module, "tqdm"):
        yield
        return
    original = module.tqdm
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


def open_source(source: Path, lora: Path | None = None, progress: bool = True) -> Checkpoint:
    """The model to export from ``source`` (HF directory or GGUF file), with ``lora`` merged in if given."""
    if not source.exists():
        raise InputNotFoundError(f"{source}: no such file or directory")
    if source.is_dir() and lora is None:
        return open_hf_dir(source)
    if source.is_dir():
        architecture_for(read_config(source), str(source))  # fail on an unsupported arch before loading weights
    else:
        gguf_architecture(source)
    if lora is not None:
        read_adapter(lora)  # fail on a bad adapter before the slow model load
    model, reader = load_transformers_model(source, progress)
    if lora is not None:
        model = merge_adapter(model, lora)
    ckpt = checkpoint_from_model(model, source, reader)
    ckpt.weights_changed = lora is not None
    return ckpt


# ---- PEFT adapters ----------------------------------------------------------------------------------------


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    tensors: dict[str, np.ndarray]  # PEFT key -> float32 array

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        """The factor PEFT multiplies B·A by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        alpha = float(self.config.get("lora_alpha", self.rank))
        return alpha / (self.rank**0.5 if self.config.get("use_rslora") else self.rank)

    def pairs(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(base HF weight name, A [r, in], B [out, r]) for every adapted linear layer."""
        for key, a in self.tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            b = self.tensors[key.replace(".lora_A.", ".lora_B.")]
            yield base_weight_name(module), a, b


def base_weight_name(peft_module: str) -> str:
    """base_model.model.model.layers.0.self_attn.q_proj -> model.layers.0.self_attn.q_proj.weight"""
    return peft_module.removeprefix("base_model.model.") + ".weight"


def read_adapter(path: Path) -> LoraAdapter:
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such adapter directory")
    config_path = path / "adapter_config.json"
    if not config_path.exists():
        raise NotACheckpointError(f"{path} is not a PEFT adapter (no adapter_config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedArchitectureError(f"{path}: adapter type {config.get('peft_type')} is not LoRA")
    if config.get("use_dora"):
        raise UnsupportedArchitectureError(f"{path}: DoRA adapters are not supported; merge them with PEFT first")
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        safetensors_torch = require("safetensors.torch", "train")
        state = safetensors_torch.load_file(str(weights))
    elif (path / "adapter_model.bin").exists():
        torch = require("torch", "train")
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise NotACheckpointError(f"{path} has adapter_config.json but no adapter_model.safetensors")
    tensors = {key: _to_numpy(value) for key, value in state.items()}
    return LoraAdapter(path, config, tensors)


def check_adapter_fits(
    adapter: LoraAdapter, base_shapes: dict[str, tuple[int, ...]], base: Path, lora_only: bool = True
) -> None:
    """Every adapted layer must exist in the base with [out, in] == [B rows, A columns].

    ``lora_only``: refuse tensors that are not LoRA pairs (a GGUF LoRA adapter cannot carry them; a merge can).
    """
    unsupported = [k for k in adapter.tensors if ".lora_A." not in k and ".lora_B." not in k]
    if unsupported and lora_only:
        raise UnsupportedArchitectureError(
            f"{adapter.path}: adapter holds non-LoRA tensors ({unsupported[0]}, ...; e.g. modules_to_save or "
            "embedding LoRA); merge it instead of --adapter-only"
        )
    for name, a, b in adapter.pairs():
        if name not in base_shapes:
            raise AdapterMismatchError(f"{adapter.path}: adapted layer {name} does not exist in base {base}")
        out_dim, in_dim = base_shapes[name]
        if a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
            raise AdapterMismatchError(
                f"{adapter.path}: {name} is [{out_dim}, {in_dim}] in the base but the adapter has "
                f"A {list(a.shape)}, B {list(b.shape)}; was it trained on another model?"
            )


def merge_adapter(model, path: Path):
    """Merge a PEFT LoRA adapter into a transformers model with PEFT itself (W += scale · B·A)."""
    peft = require("peft", "train")
    adapter = read_adapter(path)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    check_adapter_fits(adapter, shapes, path, lora_only=False)
    with warnings.catch_warnings():  # peft reads a transformers attribute that warns it is deprecated (5.x)
        warnings.simplefilter("ignore", FutureWarning)
        return peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload()
