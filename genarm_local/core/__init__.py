"""The runtime: llama.cpp handles (native), the fused kernel (mixing), sampling, chat templates, configuration, the
guided stepping loop (engine) and the GuidedModel API. Imports nothing from the layers above (train, batch, serve,
cli) and no torch."""
