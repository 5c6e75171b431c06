"""Serving a trained checkpoint: a continuous-batching decode engine behind an OpenAI- and Ollama-compatible
HTTP API (FastAPI), with tool calls, streaming, Prometheus metrics and a small chat page. `stagelm-serve` starts it."""
