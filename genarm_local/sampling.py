"""Sampling settings (named as llama.cpp names them) and the llama.cpp sampler chain built from them.

The guided engine only mixes: it writes the GenARM log-probabilities into the base context's logits row, and
llama.cpp's own samplers (penalties, grammar, top-k, top-p, min-p, temperature, seeded RNG) pick the token from that
row, so sampling behaves the way llama.cpp users know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import llama_cpp as lc

from .errors import InvalidOptionError
from .native import Model, last_native_error


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token; defaults are llama.cpp's (llama-cli) defaults."""

    temperature: float = field(default=0.8, metadata={"help": "softmax temperature T; 0 or less: greedy"})
    top_k: int = field(default=40, metadata={"help": "keep the k most likely tokens; 0: off"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus: smallest set with this much mass; 1: off"})
    min_p: float = field(default=0.05, metadata={"help": "drop tokens below min_p × the top probability; 0: off"})
    repeat_penalty: float = field(default=1.0, metadata={"help": "llama.cpp repeat penalty on recent tokens; 1: off"})
    repeat_last_n: int = field(default=64, metadata={"help": "how many recent tokens the penalty looks at"})
    seed: int | None = field(default=None, metadata={"help": "RNG seed; None: the model's seed, else random"})
    max_tokens: int = field(default=256, metadata={"help": "stop after this many generated tokens"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "strings that end generation (never emitted)"})
    grammar: str | None = field(default=None, metadata={"help": "GBNF grammar the output must follow (root rule)"})
    logprobs: int | None = field(
        default=None, metadata={"help": "report each token's mixed log-prob and this many top alternatives"}
    )
    normalized: bool = field(
        default=False,
        metadata={"help": "paper form: mix (base + Σα·arm)/(1+Σα), sampled at T/(1+Σα); same tokens, other logprobs"},
    )

    @classmethod
    def from_options(cls, options: Mapping[str, object], seed: int | None = None) -> SamplingConfig:
        """Build from keyword options; an unknown name is an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidOptionError(
                f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = dict(options)
        if isinstance(values.get("stop"), str):
            values["stop"] = (values["stop"],)
        elif values.get("stop") is not None:
            values["stop"] = tuple(values["stop"])
        else:
            values.pop("stop", None)
        if values.get("seed") is None and seed is not None:
            values["seed"] = seed
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        checks = {
            "top_k": self.top_k >= 0,
            "top_p": 0.0 < self.top_p <= 1.0,
            "min_p": 0.0 <= self.min_p <= 1.0,
            "repeat_penalty": self.repeat_penalty > 0.0,
            "repeat_last_n": self.repeat_last_n >= -1,
            "max_tokens": self.max_tokens >= 1,
            "logprobs": self.logprobs is None or self.logprobs >= 0,
            "stop": all(isinstance(s, str) and s for s in self.stop),
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidOptionError(f"sampling option {name}={getattr(self, name)!r} is out of range")


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
