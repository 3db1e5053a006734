"""The llama.cpp sampler chain built from a SamplingConfig (config.py; settings named as llama.cpp names them).

The guided engine only mixes: it writes the guided logits (mixing.guide: the base's logits plus α·log p_arm, on the
base's own scale) into the base context's logits row, and llama.cpp's own samplers (logit bias, penalties, grammar,
top-k, top-p, min-p, temperature, seeded RNG) pick the token from that row, so every option acts under guidance as it
acts on the base alone, the way llama.cpp users know.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping, Sequence

import llama_cpp as lc
import numpy as np
from llama_cpp import llama_grammar

from .config import SamplingConfig
from .errors import InvalidOptionError
from .native import Model, last_native_error


class SamplerChain:
    """Owner of one llama.cpp sampler chain (llama_sampler_chain_init), in llama.cpp's common order:
    logit bias → penalties → grammar → top-k → top-p → min-p → temperature → dist(seed), or greedy at temperature ≤ 0.

    ``temperature_factor`` multiplies T (``scale_temperature`` samples at T·(1+Σα⁺)). ``history``: the tokens
    before the first sampled one (the prompt); the penalties count the last ``repeat_last_n`` of them, as llama.cpp's
    own programs do. ``n_ctx``: what repeat_last_n = -1 means.

    ``picks=False`` leaves the last step out (dist or greedy): ``probabilities`` then gives the distribution the
    chain would draw from, which speculative decoding (scheduler.py) draws from with its own generator, and
    ``accept`` moves the grammar and the penalties on by the token it chose.
    """

    def __init__(
        self,
        config: SamplingConfig,
        model: Model,
        temperature_factor: float = 1.0,
        history: Sequence[int] = (),
        n_ctx: int = 0,
        picks: bool = True,
    ):
        params = lc.llama_sampler_chain_default_params()
        self._ptr = lc.llama_sampler_chain_init(params)
        self.greedy = config.temperature <= 0.0
        self._data: np.ndarray | None = None
        try:
            self._build(config, model, temperature_factor, history, n_ctx, picks)
        except BaseException:
            self.close()
            raise

    def _build(
        self,
        config: SamplingConfig,
        model: Model,
        temperature_factor: float,
        history: Sequence[int],
        n_ctx: int,
        picks: bool,
    ) -> None:
        add = lambda sampler: lc.llama_sampler_chain_add(self._ptr, sampler)  # noqa: E731
        bias = dict(config.logit_bias or {})
        bad = sorted(token for token in bias if not 0 <= token < model.n_vocab)
        if bad:
            raise InvalidOptionError(f"logit_bias: token id {bad[0]} is not in the vocabulary [0, {model.n_vocab})")
        if config.ignore_eos:  # as llama.cpp's --ignore-eos: the end-of-generation tokens can never be sampled
            bias.update(dict.fromkeys(model.eog_tokens(), float("-inf")))
        if bias:
            biases = (lc.llama_logit_bias * len(bias))(*bias.items())
            add(lc.llama_sampler_init_logit_bias(model.n_vocab, len(biases), biases))
        if config.repeat_penalty != 1.0 or config.frequency_penalty != 0.0 or config.presence_penalty != 0.0:
            last_n = n_ctx if config.repeat_last_n == -1 else config.repeat_last_n
            penalties = lc.llama_sampler_init_penalties(
                model.n_vocab, last_n, config.repeat_penalty, config.frequency_penalty, config.presence_penalty
            )
            for token in history[-last_n:] if last_n > 0 else ():
                lc.llama_sampler_accept(penalties, token)
            add(penalties)
        if config.grammar:
            grammar = lc.llama_sampler_init_grammar(model.vocab, config.grammar.encode("utf-8"), b"root")
            if not grammar:
                raise InvalidOptionError(f"llama.cpp could not parse the grammar: {last_native_error()}")
            add(grammar)
        if config.temperature <= 0.0:
            if picks:
                add(lc.llama_sampler_init_greedy())
            return
        if config.top_k > 0:
            add(lc.llama_sampler_init_top_k(config.top_k))
        if config.top_p < 1.0:
            add(lc.llama_sampler_init_top_p(config.top_p, 1))
        if config.min_p > 0.0:
            add(lc.llama_sampler_init_min_p(config.min_p, 1))
        add(lc.llama_sampler_init_temp(config.temperature * temperature_factor))
        if picks:
            seed = lc.LLAMA_DEFAULT_SEED if config.seed is None else config.seed & 0xFFFFFFFF
            add(lc.llama_sampler_init_dist(seed))

    def sample(self, context, index: int = -1) -> int:
        """Pick a token from the logits row of output ``index`` and accept it (llama_sampler_sample does both)."""
        return lc.llama_sampler_sample(self._ptr, context.ptr, index)

    def probabilities(self, row: np.ndarray) -> np.ndarray:
        """The distribution a chain built with ``picks=False`` leaves of the logits ``row``: float64 probabilities
        over the whole vocabulary, zero where biases, penalties, grammar, top-k/top-p/min-p left a token out, after
        temperature; one-hot on the best token when greedy. Accepts nothing (``accept``)."""
        n = len(row)
        if self._data is None or len(self._data) != n:
            self._data = np.empty(n, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
        data = self._data
        data["id"] = np.arange(n, dtype=np.int32)
        data["logit"] = row
        data["p"] = 0.0
        array = lc.llama_token_data_array(
            data=data.ctypes.data_as(lc.llama_token_data_p), size=n, selected=-1, sorted=False
        )
        lc.llama_sampler_apply(self._ptr, ctypes.byref(array))
        left = np.frombuffer(
            (lc.llama_token_data * array.size).from_address(ctypes.cast(array.data, ctypes.c_void_p).value),
            dtype=data.dtype,
        )
        ids, logits = left["id"].astype(np.int64), left["logit"].astype(np.float64)
        probs = np.zeros(n)
        finite = np.isfinite(logits)
        if not finite.any():
            raise InvalidOptionError("the sampling options leave no token that can be sampled")
        if self.greedy:
            probs[ids[finite][np.argmax(logits[finite])]] = 1.0
            return probs
        weights = np.exp(logits[finite] - logits[finite].max())
        probs[ids[finite]] = weights / weights.sum()
        return probs

    def accept(self, token: int) -> None:
        """Tell the chain ``token`` was chosen (the grammar and the penalties move on)."""
        lc.llama_sampler_accept(self._ptr, token)

    def clone(self) -> SamplerChain:
        """An independent copy in the same state (grammar position, penalty history)."""
        copy = object.__new__(SamplerChain)
        copy.greedy, copy._data = self.greedy, None
        copy._ptr = lc.llama_sampler_clone(self._ptr)
        return copy

    def close(self) -> None:
        if self._ptr is not None:
            lc.llama_sampler_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> SamplerChain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_grammar(grammar: str, model: Model) -> None:
    """Refuse a GBNF grammar llama.cpp cannot parse (InvalidOptionError), before any request runs with it."""
    sampler = lc.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidOptionError(f"llama.cpp could not parse the grammar: {last_native_error()}")
    lc.llama_sampler_free(sampler)


def json_grammar(schema: Mapping | None = None) -> str:
    """A GBNF grammar for JSON output: any JSON object (``schema`` None), or JSON that follows ``schema`` (a JSON
    Schema, converted by llama-cpp-python's port of llama.cpp's json-schema-to-grammar)."""
    if schema is None:
        return llama_grammar.JSON_GBNF
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises ValueError, KeyError, TypeError... on schemas it cannot handle
        raise InvalidOptionError(f"cannot turn this JSON schema into a grammar: {exc!r}") from None
