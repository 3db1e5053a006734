"""Offline batch generation: a JSONL file of requests → a JSONL file of results, crash-safe and resumable
(runner.py)."""
