"""genarm-local: GenARM test-time alignment on llama.cpp."""

from .errors import GenArmError

__version__ = "0.1.0"

__all__ = ["GenArmError", "GenerationResult", "GuidedModel", "__version__"]


def __getattr__(name: str):
    # The runtime (llama.cpp, the kernel) loads on first use, so `genarm-local convert` and errors stay light.
    if name in ("GuidedModel", "GenerationResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'genarm_local' has no attribute {name!r}")
