"""Serving: the vLLM process manager and the OpenAI-compatible client."""
