"""Small owners of llama.cpp's native resources: model, LoRA adapter, context.

Each object owns exactly one native handle and frees it in ``close()`` (also on ``with`` exit); nothing relies on
``__del__`` alone. The wrappers go through llama-cpp-python's low-level ctypes bindings, not the high-level
``Llama`` class, so the decode path does no per-token Python work beyond the call itself.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as lc
import numpy as np

from .errors import CorruptModelError, InputNotFoundError, InvalidOptionError, NotACheckpointError

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


def last_native_error() -> str:
    """The most recent llama.cpp log line that looks like a failure, for error messages."""
    for line in reversed(_recent_log):
        if any(word in line.lower() for word in ("error", "failed", "invalid", "unable")):
            return line
    return _recent_log[-1] if _recent_log else "no details from llama.cpp"


def check_gguf_path(path: str | os.PathLike) -> Path:
    """Fail early, with a clear message, on a missing path or a file that is not GGUF at all."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise NotACheckpointError(f"{path} is a directory, expected a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise NotACheckpointError(f"{path} is not a GGUF file (bad magic bytes)")
    return path


def gguf_header(path: str | os.PathLike) -> dict[str, str]:
    """general.type and general.architecture of a GGUF file, read without loading it ("model" when unset).

    An ARM file is either a full model or a LoRA adapter (general.type = "adapter"); this tells which.
    """
    from gguf import GGUFReader

    path = check_gguf_path(path)
    try:
        fields = GGUFReader(path).fields
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError... on damaged headers
        raise CorruptModelError(f"{path}: unreadable GGUF header ({exc})") from exc

    def text(key: str, default: str) -> str:
        field = fields.get(key)
        return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else default

    return {"type": text("general.type", "model"), "architecture": text("general.architecture", "")}


class Model:
    """One loaded GGUF model (weights shared by every context created over it)."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, vocab_only: bool = False):
        self.path = check_gguf_path(path)
        backend_init()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        self._ptr = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._ptr:
            raise CorruptModelError(f"llama.cpp could not load {self.path}: {last_native_error()}")
        self.vocab = lc.llama_model_get_vocab(self._ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)

    @property
    def ptr(self):
        if self._ptr is None:
            raise InvalidOptionError(f"model {self.path} is closed")
        return self._ptr

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

    def token_text(self, token: int) -> str:
        """The vocabulary entry of a token as stored in the GGUF (used to compare vocabularies)."""
        return lc.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the other tokens llama.cpp treats as the end of a turn."""
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

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


# llama.cpp's --cache-type-k/-v names → ggml types (GGML_TYPE_F32 0, F16 1, Q8_0 8).
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


class Context:
    """A llama.cpp context (KV cache + compute buffers) over a model, optionally with LoRA adapters set on it."""

    def __init__(
        self,
        model: Model,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_threads: int | None = None,
        adapters: Sequence[tuple[Adapter, float]] = (),
        n_seq_max: int = 1,
        kv_cache_type: str = "f16",
        flash_attn: bool | None = None,
    ):
        self.model = model
        if kv_cache_type not in KV_CACHE_TYPES:
            choices = ", ".join(KV_CACHE_TYPES)
            raise InvalidOptionError(f"unknown KV cache type {kv_cache_type!r}; choose one of {choices}")
        params = lc.llama_context_default_params()
        params.type_k = params.type_v = KV_CACHE_TYPES[kv_cache_type]
        # None keeps llama.cpp's "auto". Off is needed for float32-exact logits: the CPU flash-attention path
        # rounds through F16 (about 0.02 nats on the tiny test models).
        if flash_attn is not None:
            params.flash_attn_type = int(flash_attn)
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(n_batch, n_ctx)
        params.n_seq_max = n_seq_max
        threads = n_threads or max(1, os.cpu_count() or 1)
        params.n_threads = params.n_threads_batch = threads
        self._ptr = lc.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise CorruptModelError(f"llama.cpp could not create a context for {model.path}: {last_native_error()}")
        self.n_ctx = lc.llama_n_ctx(self._ptr)
        self.n_threads_batch = threads
        self.n_batch = params.n_batch
        if adapters:
            handles = (lc.llama_adapter_lora_p_ctypes * len(adapters))(*(a.ptr for a, _ in adapters))
            scales = (ctypes.c_float * len(adapters))(*(s for _, s in adapters))
            if lc.llama_set_adapters_lora(self._ptr, handles, len(adapters), scales) != 0:
                self.close()
                raise CorruptModelError(f"llama.cpp refused the adapters for {model.path}: {last_native_error()}")

        # The tokens whose keys and values sit in the cache (sequence 0), in order: what prefix reuse compares.
        self.tokens: list[int] = []
        # Tokens pushed through llama_decode since creation: how tests see that a prefix was reused.
        self.n_decoded = 0
        self._one = (lc.llama_token * 1)()
        self._one_batch = lc.llama_batch_get_one(self._one, 1)

    @property
    def ptr(self):
        return self._ptr

    def clear(self) -> None:
        """Forget every cached token (all sequences)."""
        lc.llama_memory_clear(lc.llama_get_memory(self._ptr), True)
        self.tokens = []

    def decode(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to sequence 0 in chunks of n_batch; afterwards the last token's logits are readable.

        llama_batch_get_one lets llama.cpp place the tokens after the cached ones and output only the last row,
        as in llama.cpp's examples/simple.
        """
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise InvalidOptionError(f"{len(self.tokens) + len(tokens)} tokens do not fit the context of {self.n_ctx}")
        array = (lc.llama_token * len(tokens))(*tokens)
        for start in range(0, len(tokens), self.n_batch):
            count = min(self.n_batch, len(tokens) - start)
            chunk = ctypes.cast(ctypes.addressof(array) + start * ctypes.sizeof(lc.llama_token), lc.llama_token_p)
            self._check(lc.llama_decode(self._ptr, lc.llama_batch_get_one(chunk, count)))
            self.tokens.extend(tokens[start : start + count])
            self.n_decoded += count

    def decode_one(self, token: int) -> None:
        """Append one token, reusing a preallocated one-token batch (the per-step path of generation)."""
        if len(self.tokens) >= self.n_ctx:
            raise InvalidOptionError(f"the context of {self.n_ctx} tokens is full")
        self._one[0] = token
        self._check(lc.llama_decode(self._ptr, self._one_batch))
        self.tokens.append(token)
        self.n_decoded += 1

    def sync(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly ``tokens`` with the last one's logits fresh; returns how many were decoded.

        Only the tokens after the common prefix with the cache are decoded (llama_memory_seq_rm drops the rest).
        The last token is always decoded again: its logits row may have been overwritten (mixing works in place).
        """
        if not tokens:
            raise InvalidOptionError("empty prompt: give at least one token")
        keep = 0
        for cached, new in zip(self.tokens, tokens[:-1], strict=False):
            if cached != new:
                break
            keep += 1
        if keep < len(self.tokens):
            # A cache that cannot drop a partial sequence (llama.cpp returns false) starts over.
            if not lc.llama_memory_seq_rm(lc.llama_get_memory(self._ptr), 0, keep, -1):
                self.clear()
                keep = 0
            del self.tokens[keep:]
        before = self.n_decoded
        self.decode(tokens[keep:])
        return self.n_decoded - before

    def decode_batch(self, batch: Batch) -> None:
        """Decode a multi-sequence batch (batched generation; ``tokens`` tracks sequence 0 only, so not mixed
        with sync/decode on the same context)."""
        self._check(lc.llama_decode(self._ptr, batch.batch))
        self.n_decoded += batch.batch.n_tokens

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Threads for single-token decode and for batches (by default batches keep theirs)."""
        batch = self.n_threads_batch if n_threads_batch is None else n_threads_batch
        lc.llama_set_n_threads(self._ptr, n_threads, batch)

    def logits_address(self, index: int = -1) -> int:
        """Address of the logits row of output ``index`` of the last decode (default: the last one); n_vocab
        float32s, written in place by the mixing."""
        return ctypes.cast(lc.llama_get_logits_ith(self._ptr, index), ctypes.c_void_p).value

    def _check(self, rc: int) -> None:
        if rc != 0:
            # A failed decode leaves the cache in an unknown state: forget it rather than trust it.
            self.clear()
            raise CorruptModelError(f"llama_decode failed ({rc}) on {self.model.path}: {last_native_error()}")

    def logits_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Decode ``tokens`` from an empty cache and return a copy of the logits at every position, (n, n_vocab).

        For evaluation and tests (fidelity, exactness checks); generation reads single rows in place instead.
        """
        if len(tokens) > self.n_ctx:
            raise InvalidOptionError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        self.clear()
        n_vocab = self.model.n_vocab
        out = np.empty((len(tokens), n_vocab), dtype=np.float32)
        batch = lc.llama_batch_init(self.n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start : start + self.n_batch]
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True
                rc = lc.llama_decode(self._ptr, batch)
                if rc != 0:
                    raise CorruptModelError(f"llama_decode failed ({rc}): {last_native_error()}")
                for i in range(len(chunk)):
                    row = lc.llama_get_logits_ith(self._ptr, i)
                    out[start + i] = np.ctypeslib.as_array(row, shape=(n_vocab,))
        finally:
            lc.llama_batch_free(batch)
        self.tokens = list(tokens)
        return out

    def close(self) -> None:
        if self._ptr is not None:
            lc.llama_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Batch:
    """A llama_batch of up to ``capacity`` tokens, each tagged with its position and sequence."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.batch = lc.llama_batch_init(capacity, 0, 1)
        self._open = True

    def clear(self) -> None:
        self.batch.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> None:
        i = self.batch.n_tokens
        if i >= self.capacity:
            raise InvalidOptionError(f"batch of {self.capacity} tokens is full")
        self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = token, pos, 1
        self.batch.seq_id[i][0], self.batch.logits[i] = seq, logits
        self.batch.n_tokens = i + 1

    def close(self) -> None:
        if self._open:
            lc.llama_batch_free(self.batch)
            self._open = False

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
