"""genarm-local: GenARM test-time alignment on llama.cpp.

Layers, each importing only those below it: core (llama.cpp, the kernel, the engine, GuidedModel) ← evaluation,
train, batch, serve ← cli. See the README's architecture section.
"""

from .core import __version__
from .core.errors import GenArmError

__all__ = [
    "ArmSpec",
    "GenArmError",
    "GenerationResponse",
    "GenerationResult",
    "GuidedModel",
    "LoadConfig",
    "SamplingConfig",
    "Stream",
    "__version__",
]

_LAZY = {
    "GuidedModel": "api",
    "GenerationResult": "api",
    "GenerationResponse": "api",
    "Stream": "api",
    "LoadConfig": "config",
    "ArmSpec": "config",
    "SamplingConfig": "config",
}


def __getattr__(name: str):
    # The runtime (llama.cpp, the kernel) loads on first use, so `genarm-local convert` and errors stay light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".core.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'genarm_local' has no attribute {name!r}")
