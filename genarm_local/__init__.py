"""genarm-local: GenARM test-time alignment on llama.cpp."""

from .errors import GenArmError

__version__ = "0.1.0"

__all__ = ["GenArmError", "__version__"]
