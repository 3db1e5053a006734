"""Small owners of llama.cpp's native resources: the backend, models and LoRA adapters (contexts: context.py).

Each object owns exactly one native handle and frees it in ``close()`` (also on ``with`` exit); nothing relies on
``__del__`` alone. The wrappers go through llama-cpp-python's low-level ctypes bindings, not the high-level
``Llama`` class, so the decode path does no per-token Python work beyond the call itself.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as lc

from .config import LoadConfig
from .errors import CorruptModelError, InputNotFoundError, InvalidOptionError, NotACheckpointError
from .gguf_metadata import read_metadata

GGUF_MAGIC = b"GGUF"

_backend_lock = threading.Lock()
_backend_ready = False
# llama.cpp logs to stderr by default; we keep the recent lines to quote them in error messages instead.
_recent_log: collections.deque[str] = collections.deque(maxlen=20)


@lc.llama_log_callback
def _log_to_buffer(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace").strip()
    if line:
        _recent_log.append(line)


def backend_init() -> None:
    """Initialise llama.cpp once per process and route its log into a ring buffer (GENARM_LOG=1 keeps stderr)."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        if not os.environ.get("GENARM_LOG"):
            lc.llama_log_set(_log_to_buffer, ctypes.c_void_p())
        lc.llama_backend_init()
        _backend_ready = True


def block_signals() -> None:
    """Block the signals Python handles (Ctrl-C, termination) in the calling thread: the initializer of our worker
    threads. The kernel delivers a process-wide signal to any thread that does not block it; one delivered to a worker
    sets Python's flag but leaves the main thread asleep in a blocking read (the chat prompt), so Ctrl-C there would
    do nothing until the next line of input."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def last_native_error() -> str:
    """The most recent llama.cpp log line that looks like a failure, for error messages."""
    for line in reversed(_recent_log):
        if any(word in line.lower() for word in ("error", "failed", "invalid", "unable")):
            return line
    return _recent_log[-1] if _recent_log else "no details from llama.cpp"


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU (CUDA, Metal, ...)."""
    return bool(lc.llama_supports_gpu_offload())


def check_gguf_path(path: str | os.PathLike) -> Path:
    """Fail early, with a clear message, on a missing path or a file that is not GGUF at all."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise NotACheckpointError(f"{path} is a directory, expected a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:  # e.g. no permission: one clear error, not a traceback
        raise NotACheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if magic != GGUF_MAGIC:
        raise NotACheckpointError(f"{path} is not a GGUF file (bad magic bytes)")
    return path


def gguf_header(path: str | os.PathLike) -> dict[str, str]:
    """general.type and general.architecture of a GGUF file, read without loading it ("model" when unset).

    An ARM file is either a full model or a LoRA adapter (general.type = "adapter"); this tells which.
    """
    path = check_gguf_path(path)
    keys = {"general.type": "model", "general.architecture": ""}
    fields = read_metadata(path, lambda key: key in keys)
    return {key.split(".")[1]: str(fields.get(key, default)) for key, default in keys.items()}


# llama.cpp's CPU weight repacking (its "extra buffer types"); off: see Model.__init__. bench/repack.py measures both.
CPU_REPACK = False


class Model:
    """One loaded GGUF model (weights shared by every context created over it)."""

    def __init__(self, path: str | os.PathLike, config: LoadConfig | None = None, vocab_only: bool = False):
        self.path = check_gguf_path(path)
        backend_init()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = (config or LoadConfig()).n_gpu_layers
        params.vocab_only = vocab_only
        # No CPU repacking of the weights (llama.cpp's "extra buffer types": Q4_K rows interleaved for its gemm
        # kernels): with it, a row decoded among 3 or more others rounds differently from the same row alone, so a
        # request's text depended on what else was running (measured on Gemma-3-270M Q4_K_M, AVX-512: the first
        # token's log-prob -2.4702 alone, -2.4690 among 3 others). Without it the base's rows are bit-identical
        # alone and among up to 7 others, and decoding is as fast on 2 cores (README, "Same input, same text").
        params.use_extra_bufts = CPU_REPACK
        self._ptr = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._ptr:
            raise CorruptModelError(f"llama.cpp could not load {self.path}: {last_native_error()}")
        self.vocab = lc.llama_model_get_vocab(self._ptr)
        self._eog_tokens: tuple[int, ...] | None = None
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)

    @property
    def ptr(self):
        if self._ptr is None:
            raise InvalidOptionError(f"model {self.path} is closed")
        return self._ptr

    @property
    def n_params(self) -> int:
        """The model's parameter count, as llama.cpp counts it."""
        return int(lc.llama_model_n_params(self.ptr))

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp sees it (as a string), or None if absent."""
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        tokens = (lc.llama_token * capacity)()
        n = lc.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp returns minus the needed size
            capacity = -n
            tokens = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token's piece (may be part of a UTF-8 character)."""
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_raw_text(self, token: int) -> bytes | None:
        """The vocabulary entry of a token as raw bytes, None past the end of the vocabulary."""
        return lc.llama_vocab_get_text(self.vocab, token) if 0 <= token < self.n_vocab else None

    def token_text(self, token: int) -> str:
        """The vocabulary entry of a token as stored in the GGUF (used to compare vocabularies)."""
        return lc.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the other tokens llama.cpp treats as the end of a turn."""
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token of the vocabulary (looked up once per model)."""
        if self._eog_tokens is None:
            self._eog_tokens = tuple(t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self.vocab, t))
        return self._eog_tokens

    @property
    def chat_template(self) -> str | None:
        """The GGUF's own tokenizer.chat_template, if it has one."""
        raw = lc.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

    @property
    def add_bos(self) -> bool:
        return bool(lc.llama_vocab_get_add_bos(self.vocab))

    def special_token_text(self, token: int) -> str:
        return self.token_text(token) if 0 <= token < self.n_vocab else ""

    @property
    def bos_text(self) -> str:
        return self.special_token_text(lc.llama_vocab_bos(self.vocab))

    @property
    def eos_text(self) -> str:
        return self.special_token_text(lc.llama_vocab_eos(self.vocab))

    def close(self) -> None:
        if self._ptr is not None:
            lc.llama_model_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Adapter:
    """A GGUF LoRA adapter loaded against one model; applied per context with a scale."""

    def __init__(self, model: Model, path: str | os.PathLike):
        self.path = check_gguf_path(path)
        self.model = model
        self._ptr = lc.llama_adapter_lora_init(model.ptr, str(self.path).encode())
        if not self._ptr:
            raise CorruptModelError(
                f"llama.cpp could not apply adapter {self.path} to {model.path}: {last_native_error()}"
            )

    @property
    def ptr(self):
        return self._ptr

    def close(self) -> None:
        if self._ptr is not None:
            lc.llama_adapter_lora_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def builtin_chat_templates() -> list[str]:
    """The chat templates llama.cpp knows by name (llama_chat_builtin_templates)."""
    count = lc.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * count)()
    lc.llama_chat_builtin_templates(names, count)
    return sorted(name.decode() for name in names)


def apply_builtin_chat_template(name: str, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    """llama.cpp's own rendering of (role, content) messages with the built-in template ``name``."""
    chat = (lc.llama_chat_message * len(messages))()
    keep = []  # the encoded strings must outlive the call
    for slot, (role, content) in zip(chat, messages, strict=True):
        role, content = role.encode("utf-8"), content.encode("utf-8")
        keep += [role, content]
        slot.role, slot.content = role, content
    size = 1024 + 2 * sum(len(text) for text in keep)
    buf = ctypes.create_string_buffer(size)
    n = lc.llama_chat_apply_template(name.encode(), chat, len(messages), add_generation_prompt, buf, size)
    if n > size:
        buf = ctypes.create_string_buffer(n)
        n = lc.llama_chat_apply_template(name.encode(), chat, len(messages), add_generation_prompt, buf, n)
    if n < 0:
        raise InvalidOptionError(f"llama.cpp has no built-in chat template {name!r}")
    return buf.raw[:n].decode("utf-8")


def quantize_file(src: Path, dst: Path, file_type: int, allow_requantize: bool = False) -> None:
    """llama.cpp's quantizer (llama_model_quantize) from ``src`` to ``dst``, on every core."""
    backend_init()
    params = lc.llama_model_quantize_default_params()  # a zeroed struct would mean F32 output/embedding types
    params.ftype = int(file_type)
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise CorruptModelError(f"llama.cpp could not quantize {src}: {last_native_error()}")
