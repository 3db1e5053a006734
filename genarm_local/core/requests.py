"""One generation request, checked the same way wherever it comes from: a batch row, an HTTP body, a Ray row.

A request is a prompt (text or token ids) or chat messages, per-ARM weights, sampling options and a seed.
``prepare`` validates it against a loaded model — option names and types, ARM names, the chat template, the context
window, the grammar — and returns what the engine needs: prompt tokens, a SamplingConfig with the template's stop
rule, every ARM's α. Requests with any settings can share the decode loop's steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .api import GuidedModel
from .config import SamplingConfig
from .errors import InvalidOptionError
from .sampling import check_grammar

_JSON_KINDS = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "tuple": lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(s, str) for s in v),
    "dict": lambda v: isinstance(v, Mapping),
}


def check_option_types(options: Mapping[str, object]) -> None:
    """Options from JSON (a batch row, a request body): each value must have its SamplingConfig field's type."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(SamplingConfig)}
    for name, value in options.items():
        if name not in kinds:
            raise InvalidOptionError(f"unknown sampling option {name!r}; known: {', '.join(sorted(kinds))}")
        kind = kinds[name]
        if value is None and "None" in kind:
            continue
        if not _JSON_KINDS[kind.split("|")[0].strip().split("[")[0]](value):
            raise InvalidOptionError(f"{name} must be of type {kind}, got {value!r}")


def check_weights(weights: object) -> dict[str, float | None]:
    """Per-request ARM weights from JSON: an object of ARM name → number, or null for the ARM's recommended α."""
    if weights is None:
        return {}
    if not isinstance(weights, Mapping) or not all(
        alpha is None or (isinstance(alpha, int | float) and not isinstance(alpha, bool)) for alpha in weights.values()
    ):
        raise InvalidOptionError('"weights" must be an object of ARM name → number (or null: its recommended α)')
    return {str(name): None if alpha is None else float(alpha) for name, alpha in weights.items()}


@dataclass
class Prepared:
    """A request ready for the engine."""

    tokens: list[int]
    config: SamplingConfig
    weights: dict[str, float]  # every loaded ARM's α by name, defaults filled in

    @property
    def options(self) -> dict:
        """The sampling options as keyword arguments (JSON types), without seed and logprobs."""
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}
        del options["seed"], options["logprobs"]
        return options


def prepare(
    model: GuidedModel,
    *,
    prompt: str | Sequence[int] | None = None,
    messages: Sequence[Mapping] | None = None,
    weights: Mapping[str, float] | None = None,
    options: Mapping[str, object] | None = None,
) -> Prepared:
    """Validate one request against ``model`` (see the module docstring); errors are GenArmErrors naming the
    problem. ``options`` are SamplingConfig options (seed included); unset ones take the model's defaults."""
    if (prompt is None) == (messages is None):
        raise InvalidOptionError('a request needs either "prompt" or "messages"')
    config = SamplingConfig.from_options(dict(options or {}), seed=model.seed)
    alphas = model.arm_weights(weights)  # unknown ARM names are refused here
    if config.grammar:
        check_grammar(config.grammar, model.engine.base_model)
    if messages is not None:
        if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
            raise InvalidOptionError('"messages" must be a non-empty list of {"role", "content"} objects')
        chat = model.chat_prompt(messages)
        tokens = chat.tokens
        config = dataclasses.replace(config, stop_at_turns=config.stop_at_turns or chat.stop_at_turns)
    elif isinstance(prompt, str):
        tokens = model.tokenize(prompt)
    else:
        tokens = [int(t) for t in prompt]
        if any(t < 0 or t >= model.engine.n_vocab for t in tokens):
            raise InvalidOptionError(f"prompt token ids must be in [0, {model.engine.n_vocab})")
    if not tokens:
        raise InvalidOptionError("the prompt is empty")
    model.engine.check_prompt(len(tokens))
    return Prepared(tokens, config, alphas)
