"""The server's own settings (ServeConfig): where it listens, who may call it, how many requests may wait.

What to load (slots, -np, included) and how to sample are LoadConfig and SamplingConfig (core/config.py); the
`serve` verb's flags for all three come from cli/flags.py's one generator. Nothing here imports the web stack, so
`genarm-local --help` stays fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.config import option
from ..core.errors import InputNotFoundError, InvalidOptionError
from ..core.preferences import DEFAULT_PATH, preferences_path


@dataclass(frozen=True)
class ServeConfig:
    """How `genarm-local serve` listens and admits requests; secure by default (loopback, no CORS)."""

    host: str = option("127.0.0.1", "address to listen on; 0.0.0.0 exposes the server to the network")
    port: int = option(8080, "port to listen on")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every endpoint but /health")
    api_key_file: str | None = option(None, "read the API key from FILE (first line)", metavar="FILE")
    cors_origin: tuple[str, ...] = option((), "allow browser pages from this origin (e.g. http://localhost:3000)")
    preset: tuple[str, ...] = option(
        (),
        "a model name clients can choose and its ARM weights (unlisted ARMs: 0), e.g. kind=positive:1.5,concise:1",
        metavar="NAME=ARM:ALPHA,...",
    )
    queue_size: int = option(64, "requests that may wait for a free slot; beyond that the server answers 503")
    max_body_bytes: int = option(1 << 20, "largest request body accepted (413 beyond)")
    metrics: bool = option(False, "serve Prometheus metrics at /metrics (llama-server's --metrics)")
    prefs: str = option(
        DEFAULT_PATH,
        "where preference pairs chosen in the web chat (POST /v1/preferences) are appended, as JSONL for "
        "`genarm-local train --data`",
        metavar="FILE",
    )

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "queue_size": self.queue_size >= 0,
            "max_body_bytes": self.max_body_bytes >= 1024,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidOptionError(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range")
        if self.api_key is not None and self.api_key_file is not None:
            raise InvalidOptionError("give --api-key or --api-key-file, not both")
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidOptionError("--api-key is empty")
        self.presets()  # malformed presets fail now, before any model loads
        preferences_path(self.prefs)

    def key(self) -> str | None:
        """The API key, read from --api-key-file if that is how it was given."""
        if self.api_key_file is None:
            return self.api_key
        path = Path(self.api_key_file)
        if not path.is_file():
            raise InputNotFoundError(f"--api-key-file {path}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or not lines[0].strip():
            raise InvalidOptionError(f"--api-key-file {path}: the first line is empty")
        return lines[0].strip()

    def presets(self) -> dict[str, dict[str, float]]:
        """The --preset flags as {name: {ARM name: α}} (ARM names are checked against the loaded ARMs later)."""
        presets: dict[str, dict[str, float]] = {}
        for text in self.preset:
            match = re.fullmatch(r"([\w.+-]+)=(.*)", text)
            if not match:
                raise InvalidOptionError(f"--preset {text}: write NAME=ARM:ALPHA,ARM:ALPHA (e.g. kind=positive:1.5)")
            name, weights = match.group(1), {}
            for item in filter(None, match.group(2).split(",")):
                arm, _, alpha = item.rpartition(":")
                try:
                    value = float(alpha)
                except ValueError:
                    value = math.nan
                if not arm or not math.isfinite(value):
                    raise InvalidOptionError(f"--preset {text}: {item!r} is not ARM:ALPHA with a number for ALPHA")
                weights[arm] = value
            if name in presets:
                raise InvalidOptionError(f"--preset {name} is given twice")
            presets[name] = weights
        return presets
