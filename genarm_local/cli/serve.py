"""`genarm-local serve`: the OpenAI-compatible server (serve/), with the model, ARM and sampling flags of `chat`.

The sampling flags set the server's default sampling; each request may override them. Without -m and --arm the
embedded base is served with the shipped default ARMs, as `chat` does.
"""

from __future__ import annotations

import argparse

from ..core.config import find_arm
from ..serve.config import ServeConfig
from .flags import (
    add_config_arguments,
    add_model_arguments,
    add_sampling_arguments,
    config_options,
    load_config,
    sampling_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser.add_argument_group("server"), ServeConfig)
    add_model_arguments(parser, defaults={"n_parallel": 4})  # concurrent clients, as llama-server's default
    # the server's defaults; logprobs are per request; a request without max_tokens runs until EOS, a stop string or
    # the end of its context, as OpenAI's API and llama-server do
    add_sampling_arguments(parser, defaults={"max_tokens": None}, exclude=("logprobs",))


def main(args: argparse.Namespace) -> None:
    from ..core.errors import require

    for module in ("fastapi", "uvicorn", "pydantic"):  # the HTTP stack is an extra: say so before anything loads
        require(module, "serve")
    settings = ServeConfig(**config_options(ServeConfig, args))
    settings.key()  # a missing key file fails now
    sampling = sampling_options(args)
    load = load_config(args)
    for weights in settings.presets().values():
        for arm in weights:
            find_arm(load.arms, arm)  # a preset naming an ARM that is not loaded fails before the model loads
    load.base_path(announce=load.base is None)
    from ..serve.app import serve

    serve(settings, load, sampling)
