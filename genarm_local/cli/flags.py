"""Command-line flags generated from the configuration dataclasses, and the model the flags describe.

``add_config_arguments`` is the one dataclass → argparse generator: LoadConfig, SamplingConfig and TrainConfig fields
become flags with the field's default and help text (and its ``flags``, ``metavar``, ``choices`` metadata), so the
command line and the Python API cannot drift apart. Nothing here loads llama.cpp: building a parser stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.config import ArmSpec, LoadConfig, SamplingConfig, arm_specs
from ..core.errors import InputNotFoundError, InvalidOptionError

_SCALARS = {"int": int, "float": float, "str": str}
_TRISTATE = {"on": True, "off": False, "auto": None}


def _kind(field: dataclasses.Field) -> str:
    """The field's base type name: "int | None" → "int", "tuple[str, ...]" → "tuple"."""
    return str(field.type).split("|")[0].strip().split("[")[0]


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_class: type,
    defaults: Mapping[str, object] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    """One flag per field of ``config_class`` (minus ``exclude`` and fields marked cli=False).

    The flags are the field's ``flags`` metadata or --field-name (a name without dashes: a positional argument
    named after the field). bool fields are switches (a True default gets
    the negative flag from its metadata), ``bool | None`` fields take on/off/auto, tuple fields are repeatable.
    """
    for f in dataclasses.fields(config_class):
        meta = dict(f.metadata)
        if f.name in exclude or meta.pop("cli", True) is False:
            continue
        flags = meta.pop("flags", ("--" + f.name.replace("_", "-"),))
        kind, optional = _kind(f), "None" in str(f.type)
        default = (defaults or {}).get(f.name, f.default)
        kwargs = dict(meta) if not flags[0].startswith("-") else dict(meta, dest=f.name)  # a positional names its dest
        if "choices" in kwargs:  # listed in the help; the config itself refuses other values with a one-line error
            kwargs["help"] += f" (one of: {', '.join(kwargs.pop('choices'))})"
        if kwargs.get("required"):
            kwargs["default"] = argparse.SUPPRESS  # no "(default: None)" in --help
        elif kind == "bool" and optional:
            kwargs.update(choices=list(_TRISTATE), default=next(k for k, v in _TRISTATE.items() if v is default))
        elif kind == "bool":
            kwargs.update(action="store_false" if default else "store_true", default=default)
        elif kind in ("tuple", "list") and "nargs" not in kwargs:
            kwargs.update(action="append", default=list(default))
            kwargs["help"] += "; repeatable"
        else:
            kwargs["default"] = default
            kwargs.setdefault("type", _SCALARS.get(kind, str))
        parser.add_argument(*flags, **kwargs)


def config_options(config_class: type, args: argparse.Namespace) -> dict:
    """The fields of ``config_class`` that ``args`` holds, as keyword options (on/off/auto → True/False/None)."""
    options = {}
    for f in dataclasses.fields(config_class):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if _kind(f) == "bool" and "None" in str(f.type):
            value = _TRISTATE[value]
        elif _kind(f) == "tuple":
            value = tuple(value)
        options[f.name] = value
    return options


# ---- sampling --------------------------------------------------------------------------------------------------


def add_sampling_arguments(
    parser: argparse.ArgumentParser, defaults: Mapping[str, object] | None = None, exclude: Sequence[str] = ()
) -> None:
    group = parser.add_argument_group("sampling (llama.cpp's sampler chain)")
    add_config_arguments(group, SamplingConfig, defaults, exclude)
    if "grammar" not in exclude:
        group.add_argument("--grammar-file", metavar="FILE", help="read the GBNF grammar from FILE")
        group.add_argument(
            "-j", "--json-schema", metavar="SCHEMA",
            help='output JSON that follows this JSON Schema (e.g. \'{"type": "object"}\'; {} for any JSON object), '
            "turned into a grammar",
        )  # fmt: skip


def sampling_options(args: argparse.Namespace) -> dict:
    """The SamplingConfig keyword options given on the command line, checked before any model is loaded."""
    options = config_options(SamplingConfig, args)
    grammar_file = getattr(args, "grammar_file", None)
    if grammar_file:
        path = Path(grammar_file)
        if not path.is_file():
            raise InputNotFoundError(f"--grammar-file {path}: no such file")
        options["grammar"] = path.read_text(encoding="utf-8")
    schema = getattr(args, "json_schema", None)
    if schema is not None:
        import json

        from ..core.sampling import json_grammar

        if options.get("grammar"):
            raise InvalidOptionError("give a grammar or --json-schema, not both")
        try:
            parsed = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidOptionError(f"--json-schema is not JSON: {exc.msg} (at character {exc.pos})") from None
        options["grammar"] = json_grammar(parsed or None)
    SamplingConfig.from_options(options)  # range checks now, not after loading
    return options


# ---- model and ARMs --------------------------------------------------------------------------------------------


class _ArmAction(argparse.Action):
    """--arm and --arm-name append to one ordered list, so that --arm-name can name the --arm before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), (self.const, value)])


def add_model_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, object] | None = None) -> None:
    """The base, its ARMs, and how llama.cpp runs them: LoadConfig's fields (``defaults`` overrides some, for one
    verb), plus the ARM list."""
    group = parser.add_argument_group("model and ARMs")
    add_config_arguments(group, LoadConfig, defaults)
    group.add_argument(
        "--arm", dest="arms", action=_ArmAction, const="arm", default=[], metavar="[NAME=]PATH[:ALPHA]",
        help="an ARM (GGUF model with the base's vocabulary, or GGUF LoRA adapter of the base) and its weight α "
        "(default: the ARM's recommended α, else 1); PATH may be the name of a shipped ARM; repeatable. Without -m "
        "and --arm: the embedded base with the ARMs of genarm_local/arms/defaults.json (positive on, concise at 0)",
    )  # fmt: skip
    group.add_argument(
        "--arm-name", dest="arms", action=_ArmAction, const="name", metavar="NAME",
        help="name the --arm given just before (default: the file's stem); weights refer to ARMs by name",
    )  # fmt: skip
    group.add_argument("--no-arm", action="store_true", help="run the base alone (ignore --arm), for comparison")


def parse_arms(items: Sequence[tuple[str, str]]) -> tuple[ArmSpec, ...]:
    """The ordered --arm / --arm-name list → ArmSpecs, with unique names and files."""
    arms: list[ArmSpec] = []
    for kind, value in items:
        if kind == "arm":
            arms.append(ArmSpec.parse(value))
        elif not arms:
            raise InvalidOptionError(f"--arm-name {value} must follow the --arm it names")
        else:
            arms[-1] = dataclasses.replace(arms[-1], name=value)
    return arm_specs(arms)


def load_config(args: argparse.Namespace) -> LoadConfig:
    """The LoadConfig the flags describe: without -m and --arm the embedded base with the shipped default ARMs
    (LoadConfig's one default, as the API, chat, generate, batch and serve all load it); --no-arm: none."""
    arms = () if args.no_arm else parse_arms(args.arms) if args.arms else None
    options = config_options(LoadConfig, args)
    return LoadConfig(**dict(options, arms=arms))


def load_model(args: argparse.Namespace | LoadConfig):
    """The GuidedModel the flags (or a LoadConfig) describe; the embedded base, and the ARMs loaded by default with
    it, are announced on stderr."""
    config = args if isinstance(args, LoadConfig) else load_config(args)
    config.base_path(announce=config.base is None)
    from ..core.api import GuidedModel

    model = GuidedModel(config=config)
    if config.base is None and config.arms:
        arms = ", ".join(f"{name} α={alpha:.3g}" for name, alpha in model.arm_weights().items())
        note(f"genarm-local: ARMs: {arms} (weights: --arm NAME:ALPHA; none: --no-arm)")
    if config.merge_arms and len(model.engine.arms) > 1:
        note("genarm-local: --merge-arms: LoRA ARMs weighted positively run merged in one context, an approximation "
             'of their exact product (README, "Several ARMs")')  # fmt: skip
    return model


# ---- output ----------------------------------------------------------------------------------------------------


def timings_line(result) -> str:
    t = result.timings
    return (
        f"prompt: {t.prompt_tokens} tokens, {t.prompt_decoded} decoded, {t.prompt_tokens_per_s:.1f} tok/s; "
        f"generation: {t.generated_tokens} tokens, {t.generated_tokens_per_s:.1f} tok/s"
    )


def timings_dict(result) -> dict:
    t = result.timings
    return {
        "prompt_tokens": t.prompt_tokens,
        "prompt_decoded": t.prompt_decoded,
        "prompt_s": round(t.prompt_s, 6),
        "generated_tokens": t.generated_tokens,
        "generation_s": round(t.generation_s, 6),
        "prompt_tokens_per_s": round(t.prompt_tokens_per_s, 2),
        "generated_tokens_per_s": round(t.generated_tokens_per_s, 2),
    }


def arm_lines(model, weights: Mapping[str, float]) -> list[str]:
    """One line per loaded ARM: its weight now and what its calibration says (the recommended α, and how far the
    current α moves the base: the KL of the calibration curve there)."""
    lines = []
    for arm in model.engine.arms:
        alpha = weights.get(arm.name, arm.alpha)
        calibration = arm.calibration
        if calibration is None:
            lines.append(f"  {arm.name}: α={alpha:.3g} (not calibrated: genarm-local calibrate {arm.spec.path})")
            continue
        beyond = "≥ " if abs(alpha) > max(calibration.alphas) else ""
        # calibration measures α > 0; a negative α steers away one-sidedly, a distribution it did not measure
        kl = f"KL {beyond}{calibration.kl_at(alpha):.3g} nats/token" if alpha >= 0 else "steering away"
        lines.append(
            f"  {arm.name}: α={alpha:.3g}, {kl}; recommended "
            f"α={calibration.recommended_alpha:.3g} (the largest as fluent as the base)"
        )
    return lines


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
