"""Against the real vLLM: its 400s become BackendRequestError, and its context length is read."""

from __future__ import annotations

import httpx
import pytest

from studio.serving.client import BackendRequestError, SamplingParams
from tests.conftest import LiveStudio

pytestmark = pytest.mark.slow


def test_the_served_context_is_read_from_vllm(live_studio: LiveStudio) -> None:
    backend = live_studio.studio.backend
    assert backend.max_model_len(live_studio.studio.base_version) == 2048  # --max-model-len of our vLLM
    assert backend.max_model_len(None) == 2048


def test_a_prompt_or_max_tokens_beyond_the_context_says_what_to_shorten(live_studio: LiveStudio) -> None:
    backend, base = live_studio.studio.backend, live_studio.studio.base_version
    long_prompt = [{"role": "user", "content": "word " * 3000}]  # about 3,000 tokens
    with pytest.raises(BackendRequestError) as err:
        backend.chat(base, long_prompt, SamplingParams(max_tokens=16))
    assert "shorten the prompt or lower max_tokens (the model's context is 2048 tokens" in str(err.value)
    with pytest.raises(BackendRequestError) as err:
        backend.chat(base, [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4096))
    assert "shorten the prompt or lower max_tokens" in str(err.value) and err.value.max_model_len == 2048


def test_a_campaign_beyond_the_served_context_is_refused_when_created(api: httpx.Client) -> None:
    api.post("/prompt-sets/limits-set/prompts", json={"records": [{"prompt": "Name a fruit."}]})
    before = len(api.get("/campaigns").json()["campaigns"])
    body = {"name": "too-long", "prompt_set": "limits-set", "max_tokens": 4096}
    resp = api.post("/campaigns", json=body)
    assert resp.status_code == 422, resp.text
    assert "max_tokens=4096: the served model's context is 2048 tokens" in resp.json()["detail"]
    assert len(api.get("/campaigns").json()["campaigns"]) == before
    # and a request vLLM itself refuses is the caller's to change: a 422 saying what to shorten
    refused = api.post("/sample", json={"prompt": "word " * 3000, "max_tokens": 16})
    assert refused.status_code == 422 and "shorten the prompt or lower max_tokens" in refused.text
