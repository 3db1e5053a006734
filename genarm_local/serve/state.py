"""What the HTTP layer knows about the server: its settings, the engine worker, the default sampling, and the model
names clients can choose (the base alone, each ARM, all ARMs, and the --preset ones), each standing for ARM weights."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping

from ..core.api import GuidedModel
from ..core.config import ArmSpec, LoadConfig
from ..core.errors import ServerBusyError, UnknownModelError
from ..core.preferences import preferences_path
from ..core.requests import check_weights
from .config import ServeConfig
from .worker import EngineWorker


def model_id(model: GuidedModel) -> str:
    """The base's name as a model id: its GGUF general.name, slugged ("Gemma 3 270m" → "gemma-3-270m")."""
    base = model.engine.base_model
    name = base.meta("general.name") or base.path.stem
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


class ServerState:
    def __init__(self, settings: ServeConfig, load: LoadConfig, sampling: Mapping[str, object] | None = None):
        self.settings = settings
        self.key = settings.key()
        self.sampling = {name: value for name, value in (sampling or {}).items()}
        self.worker = EngineWorker(load, settings.queue_size)
        self.created = int(time.time())
        self.prefs = preferences_path(settings.prefs)  # where POST /v1/preferences appends
        self._models: dict[str, dict[str, float]] | None = None
        self._loading = threading.Lock()  # one ARM loads at a time (POST /v1/arms)
        self.default_model = ""

    @property
    def model(self) -> GuidedModel:
        model = self.worker.model
        if model is None:
            raise ServerBusyError("the model is still loading; retry when GET /health answers 200")
        return model

    @property
    def models(self) -> dict[str, dict[str, float]]:
        """Model name → every loaded ARM's α. The default (a request without "model") is the loaded weights."""
        if self._models is None:
            self._models = self._build_models(self.model)
        return self._models

    def _build_models(self, model: GuidedModel) -> dict[str, dict[str, float]]:
        loaded = model.arm_weights()
        off = {name: 0.0 for name in loaded}
        # an ARM loaded at α = 0 (shipped but off by default) gets its recommended α (1 uncalibrated) in the names
        # that switch it on
        recommended = {arm.name: arm.recommended_alpha for arm in model.engine.arms}
        on = {name: alpha if alpha != 0.0 else recommended[name] for name, alpha in loaded.items()}
        base = model_id(model)
        models = {base: dict(off)}
        for name in loaded:
            models[f"{base}+{name}"] = dict(off, **{name: on[name]})
        if len(loaded) > 1:
            models["+".join([base, *loaded])] = dict(on)
        self.default_model = "+".join([base, *(name for name, alpha in loaded.items() if alpha != 0.0)])
        models.setdefault(self.default_model, dict(loaded))
        for name, weights in self.settings.presets().items():
            models[name] = model.arm_weights(dict(off, **weights))  # an unknown ARM name fails the start-up
        return models

    def load_arm(self, path: str, alpha: float | None, name: str | None) -> ArmSpec:
        """Load one more ARM into the running model (off the event loop: it may take a while). The model names are
        built again; every name listed before keeps its meaning, with the new ARM off."""
        with self._loading:
            spec = self.model.load_arm(path, alpha, name)
            before = self.models
            models = self._build_models(self.model)
            for old, weights in before.items():
                models.setdefault(old, {**weights, spec.name: 0.0})
            self._models = models
        return spec

    def served_model(self, name: str | None) -> str:
        """The model name that serves a request for ``name``: that name if the server has it, else the default, as
        llama-server serves its one model whatever a client names (apps hard-code "gpt-4o-mini")."""
        return name if name and name in self.models else self.default_model

    def weights(self, name: str | None, arms: Mapping[str, float | None] | None) -> dict[str, float]:
        """The ARM weights of a request: its model's (preset's), overridden by its "arms"."""
        models = self.models
        if name is None or name == "":
            name = self.default_model
        if name not in models:
            raise UnknownModelError(f"model {name!r} does not exist; GET /v1/models lists: {', '.join(models)}")
        # an ARM loaded after these names were built (load_arm, a moment ago) is off in them
        return {**dict.fromkeys(self.model.arm_weights(), 0.0), **models[name], **check_weights(arms)}

    def token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self.model.engine.base_model.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)
