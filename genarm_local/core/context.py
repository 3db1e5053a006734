"""Owners of llama.cpp's per-sequence state: a context (KV cache, compute buffers, logits) and a batch.

Split from native.py (models and adapters) by concern: contexts are what the scheduler steps (decode_batch, several
sequences), and what scoring reads (decode_outputs, logits_all: one sequence). Each object owns one native handle and
frees it in ``close()`` (also on ``with`` exit).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp as lc
import numpy as np

from .config import KV_CACHE_TYPES, LoadConfig
from .errors import CorruptModelError, InvalidOptionError
from .native import Adapter, Model, last_native_error


class Context:
    """A llama.cpp context (KV cache + compute buffers) over a model, optionally with LoRA adapters set on it."""

    def __init__(
        self,
        model: Model,
        config: LoadConfig | None = None,
        *,
        n_ctx: int | None = None,
        n_batch: int = 512,
        adapters: Sequence[tuple[Adapter, float]] = (),
        n_seq_max: int = 1,
        kv_unified: bool = False,
    ):
        """Settings (KV cache type, flash attention, threads, context size) come from ``config``; ``n_ctx``
        overrides its context size (batched generation sizes its own contexts). With ``n_seq_max`` > 1 each sequence
        has its own KV stream of n_ctx / n_seq_max cells, unless ``kv_unified`` puts all of them in one."""
        self.model = model
        config = config or LoadConfig()
        n_ctx = n_ctx or config.n_ctx
        params = lc.llama_context_default_params()
        params.type_k = params.type_v = KV_CACHE_TYPES[config.kv_cache_type]
        # None keeps llama.cpp's "auto". Off is needed for float32-exact logits: the CPU flash-attention path
        # rounds through F16 (about 0.02 nats on the tiny test models).
        if config.flash_attn is not None:
            params.flash_attn_type = int(config.flash_attn)
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(n_batch, n_ctx)
        params.n_seq_max = n_seq_max
        params.kv_unified = kv_unified
        threads = config.threads
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

        # Single-sequence use (decode, decode_outputs, logits_all): the tokens whose keys and values sit in the cache
        # of sequence 0, in order, which decode_outputs' prefix reuse compares.
        self.tokens: list[int] = []
        # Tokens pushed through llama_decode since creation, and how many calls: how tests and benches see what was
        # decoded.
        self.n_decoded = 0
        self.n_calls = 0

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

    def _keep_prefix(self, tokens: Sequence[int]) -> int:
        """Drop the cached tokens after their common prefix with ``tokens``; returns how many stay cached."""
        keep = 0
        for cached, new in zip(self.tokens, tokens, strict=False):
            if cached != new:
                break
            keep += 1
        if keep < len(self.tokens):
            # A cache that cannot drop a partial sequence (llama.cpp returns false) starts over.
            if not lc.llama_memory_seq_rm(lc.llama_get_memory(self._ptr), 0, keep, -1):
                self.clear()
                keep = 0
            del self.tokens[keep:]
        return keep

    def truncate(self, seq: int, keep: int) -> bool:
        """Drop sequence ``seq``'s cached tokens from position ``keep`` on (llama_memory_seq_rm); False when the
        cache cannot cut a sequence there (the caller then starts that sequence over from position 0)."""
        memory = lc.llama_get_memory(self._ptr)
        if lc.llama_memory_seq_rm(memory, seq, keep, -1):
            return True
        lc.llama_memory_seq_rm(memory, seq, 0, -1)
        return False

    def decode_outputs(self, tokens: Sequence[int], first: int) -> int:
        """Make the cache hold ``tokens`` with a logits row for every position from ``first`` on: output row i is
        the distribution after ``tokens[: first + i + 1]`` (scoring a continuation in one decode, not one per token).

        Cached tokens before ``first`` that match are kept, so scoring several continuations of one prompt decodes
        the prompt once. Returns the number of output rows. The outputs must fit one batch (n_batch tokens).
        """
        if not 0 <= first < len(tokens):
            raise InvalidOptionError(f"output position {first} is outside the {len(tokens)} tokens")
        if len(tokens) - first > self.n_batch:
            raise InvalidOptionError(f"{len(tokens) - first} output rows do not fit one batch of {self.n_batch}")
        keep = self._keep_prefix(tokens[:first])
        if keep < first:
            self.decode(tokens[keep:first])
        with Batch(len(tokens) - first) as batch:
            for pos in range(first, len(tokens)):
                batch.add(tokens[pos], pos, 0, True)
            self._check(lc.llama_decode(self._ptr, batch.batch))
        self.tokens.extend(tokens[first:])
        self.n_decoded += len(tokens) - first
        return len(tokens) - first

    def decode_batch(self, batch: Batch) -> None:
        """Decode a multi-sequence batch (batched generation; ``tokens`` tracks sequence 0 only, so not mixed
        with sync/decode on the same context)."""
        self._check(lc.llama_decode(self._ptr, batch.batch))
        self.n_decoded += batch.batch.n_tokens
        self.n_calls += 1

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Threads for single-token decode and for batches (by default batches keep theirs)."""
        batch = self.n_threads_batch if n_threads_batch is None else n_threads_batch
        lc.llama_set_n_threads(self._ptr, n_threads, batch)

    def logits_address(self, index: int = -1) -> int:
        """Address of the logits row of output ``index`` of the last decode (default: the last one); n_vocab
        float32s, written in place by the mixing."""
        return ctypes.cast(lc.llama_get_logits_ith(self._ptr, index), ctypes.c_void_p).value

    def logits_row(self, index: int = -1) -> np.ndarray:
        """The logits row of output ``index`` as a numpy view (no copy) of llama.cpp's buffer."""
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ptr, index), shape=(self.model.n_vocab,))

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
