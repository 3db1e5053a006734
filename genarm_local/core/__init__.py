"""The runtime: llama.cpp handles (native), the fused kernel (mixing), sampling, chat templates, configuration, the
guided stepping loop (engine) and the GuidedModel API. Imports nothing from the layers above (train, batch, serve,
cli) and no torch."""

__version__ = "0.1.0"  # the package's version (pyproject.toml), here so that every layer may read it
