"""`genarm-local serve`: an OpenAI-compatible HTTP server over one GuidedModel, with per-request ARM weights,
continuous batching across requests (core/scheduler.py) and a web chat at `/`. Imports only core."""
