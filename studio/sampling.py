"""Sample completions from a model version and store every one with its metadata."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol

from studio.serving.client import ChatResult, SamplingParams
from studio.store import Store, new_id


class ChatBackend(Protocol):
    """What the sampler needs of a serving backend (see serving.client.OpenAIChatBackend)."""

    def chat(self, model: str, messages: list[dict[str, str]], params: SamplingParams) -> ChatResult: ...


class Sampler:
    def __init__(self, store: Store, backend: ChatBackend):
        self.store = store
        self.backend = backend

    def sample(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams,
        *,
        version: str,
        prompt_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Ask the backend for `params.n` completions and store them all in one transaction.

        Returns the stored rows (with ids). The served model name of a version
        is the version's own name: the studio starts vLLM with it, and later
        LoRA adapters are loaded under their version names.
        """
        self.store.model_version(version)  # raises a clear error for an unknown version
        result = self.backend.chat(version, messages, params)
        request_id = new_id()
        sampling = {k: v for k, v in asdict(params).items() if k != "extra"} | params.extra
        rows = [
            {
                "id": new_id(),
                "request_id": request_id,
                "choice_index": c.index,
                "prompt_id": prompt_id,
                "messages": messages,
                "model_version": version,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "latency_ms": result.latency_ms,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_tokens": params.max_tokens,
                "seed": params.seed,
                "sampling": sampling,
            }
            for c in result.completions
        ]
        self.store.add_generations(rows)
        return self.store.generations([r["id"] for r in rows])
