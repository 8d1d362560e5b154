"""REST API under /api/v1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from studio.importer import PromptFileError, normalize_messages, to_prompt
from studio.runtime import Studio
from studio.serving.client import BackendError, SamplingParams
from studio.store import StoreError


class SampleRequest(BaseModel):
    prompt: str | None = Field(None, description="a user prompt (or give 'messages')")
    messages: list[dict[str, str]] | None = Field(None, description="chat messages to answer")
    n: int = Field(1, ge=1, le=64)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1, le=8192)
    seed: int | None = None
    model: str | None = Field(None, description="model version; the served base by default")

    @model_validator(mode="after")
    def one_prompt(self) -> SampleRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'messages' (a list)")
        return self


class ImportRequest(BaseModel):
    source: str = Field("rest", description="where the prompts came from, kept with the set")
    records: list[dict[str, Any]] = Field(
        description="prompt records as in a JSONL file: 'prompt' or 'messages', optional 'id'"
    )
    locations: list[str] | None = Field(
        None, description="a name per record for error messages (file and line)"
    )


def studio_of(request: Request) -> Studio:
    return request.app.state.studio


def build_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    @router.get("/health")
    def health(request: Request) -> JSONResponse:
        report = studio_of(request).health()
        return JSONResponse(report, status_code=200 if report["studio"] == "ok" else 503)

    @router.post("/sample")
    def sample(body: SampleRequest, request: Request) -> dict[str, Any]:
        studio = studio_of(request)
        assert studio.sampler is not None
        try:
            messages = (
                normalize_messages(body.prompt, "request", "prompt")
                if body.prompt is not None
                else normalize_messages(body.messages, "request", "messages")
            )
            params = SamplingParams(
                n=body.n,
                temperature=body.temperature,
                top_p=body.top_p,
                max_tokens=body.max_tokens,
                seed=body.seed,
            )
            rows = studio.sampler.sample(messages, params, version=body.model or studio.base_version)
        except (PromptFileError, StoreError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from None
        except BackendError as exc:
            raise HTTPException(503, str(exc)) from None
        return {"generations": [_public(r) for r in rows]}

    @router.get("/models")
    def models(request: Request) -> dict[str, Any]:
        store = studio_of(request).store
        assert store is not None
        return {"models": [_public(v) for v in store.model_versions()]}

    @router.get("/prompt-sets")
    def prompt_sets(request: Request) -> dict[str, Any]:
        store = studio_of(request).store
        assert store is not None
        return {"prompt_sets": [_public(s) for s in store.prompt_sets()]}

    @router.post("/prompt-sets/{name}/prompts")
    def import_prompts(name: str, body: ImportRequest, request: Request) -> dict[str, Any]:
        store = studio_of(request).store
        assert store is not None
        locations = body.locations or [f"record {i}" for i in range(1, len(body.records) + 1)]
        if len(locations) != len(body.records):
            raise HTTPException(422, "'locations' must have one entry per record")
        try:
            prompts = [to_prompt(r, where) for r, where in zip(body.records, locations, strict=True)]
            result = store.import_prompts(name, prompts, source=body.source)
        except (PromptFileError, StoreError) as exc:
            raise HTTPException(422, str(exc)) from None
        return {
            "set": result.set_name,
            "added": result.added,
            "duplicates": result.duplicates,
            "summary": result.summary(),
        }

    return router


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
