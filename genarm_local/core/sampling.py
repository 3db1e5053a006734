"""The llama.cpp sampler chain built from a SamplingConfig (config.py; settings named as llama.cpp names them).

The guided engine only mixes: it writes the GenARM log-probabilities into the base context's logits row, and
llama.cpp's own samplers (penalties, grammar, top-k, top-p, min-p, temperature, seeded RNG) pick the token from that
row, so sampling behaves the way llama.cpp users know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import llama_cpp as lc
from llama_cpp import llama_grammar

from .config import SamplingConfig
from .errors import InvalidOptionError
from .native import Model, last_native_error


class SamplerChain:
    """Owner of one llama.cpp sampler chain (llama_sampler_chain_init), in llama.cpp's common order:
    penalties → grammar → top-k → top-p → min-p → temperature → dist(seed), or greedy at temperature ≤ 0.

    ``temperature_scale`` divides T (the paper's normalized form samples at T/(1+Σα)).
    """

    def __init__(self, config: SamplingConfig, model: Model, temperature_scale: float = 1.0):
        params = lc.llama_sampler_chain_default_params()
        self._ptr = lc.llama_sampler_chain_init(params)
        try:
            self._build(config, model, temperature_scale)
        except BaseException:
            self.close()
            raise

    def _build(self, config: SamplingConfig, model: Model, temperature_scale: float) -> None:
        add = lambda sampler: lc.llama_sampler_chain_add(self._ptr, sampler)  # noqa: E731
        if config.repeat_penalty != 1.0:
            add(lc.llama_sampler_init_penalties(model.n_vocab, config.repeat_last_n, config.repeat_penalty, 0.0, 0.0))
        if config.grammar:
            grammar = lc.llama_sampler_init_grammar(model.vocab, config.grammar.encode("utf-8"), b"root")
            if not grammar:
                raise InvalidOptionError(f"llama.cpp could not parse the grammar: {last_native_error()}")
            add(grammar)
        if config.temperature <= 0.0:
            add(lc.llama_sampler_init_greedy())
            return
        if config.top_k > 0:
            add(lc.llama_sampler_init_top_k(config.top_k))
        if config.top_p < 1.0:
            add(lc.llama_sampler_init_top_p(config.top_p, 1))
        if config.min_p > 0.0:
            add(lc.llama_sampler_init_min_p(config.min_p, 1))
        add(lc.llama_sampler_init_temp(config.temperature / temperature_scale))
        seed = lc.LLAMA_DEFAULT_SEED if config.seed is None else config.seed & 0xFFFFFFFF
        add(lc.llama_sampler_init_dist(seed))

    def sample(self, context, index: int = -1) -> int:
        """Pick a token from the logits row of output ``index`` and accept it (llama_sampler_sample does both)."""
        return lc.llama_sampler_sample(self._ptr, context.ptr, index)

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
