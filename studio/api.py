"""REST API under /api/v1."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field, model_validator
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from studio import arena, jobs, labeling, quality, training, users
from studio import campaigns as camp
from studio.export import KINDS, write_export
from studio.importer import PromptFileError, normalize_messages, to_prompt
from studio.runtime import Studio
from studio.serving.client import BackendError, SamplingParams
from studio.store import StoreError
from studio.users import AuthError, User


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


class CampaignRequest(BaseModel):
    name: str
    prompt_set: str
    model: str = Field(camp.POLICY, description="a model version or alias ('policy' by default)")
    n: int = Field(4, description="completions per task (2-8)")
    overlap: int = Field(1, description="different annotators per task")
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 128
    seed: int | None = None
    task_timeout_s: int = Field(1800, description="an unsubmitted task goes back to the pool after this")
    guidelines: str = ""


class GuidelinesRequest(BaseModel):
    text: str


class JudgmentRequest(BaseModel):
    assignment_id: str
    ranks: list[int] | None = Field(None, description="rank per shown completion, 1 = best, equal = tie")
    best: int | None = Field(None, description="quick mode: position of the best completion")
    worst: int | None = Field(None, description="quick mode: position of the worst completion")
    all_bad: bool = False
    strength: int | None = Field(None, description="1 slight, 2 clear, 3 strong")
    flags: dict[int, list[str]] = Field(default_factory=dict, description="position -> flags")
    rationale: str | None = None
    edited_text: str | None = None
    idempotency_key: str | None = Field(None, description="retries with the same key store one judgment")
    shown_at: float | None = Field(None, description="unix time the task was shown, for timings")
    next: bool = Field(True, description="also return the next task")


class BattleCampaignRequest(BaseModel):
    name: str
    prompt_set: str
    versions: list[str] = Field(description="two or more model versions or aliases")
    budget: int = Field(200, description="votes after which the campaign stops")
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 128
    both_bad_as_tie: bool = True
    leak_words: list[str] | None = Field(
        None, description="identity-revealing words (a default list if unset)"
    )
    criteria: list[str] | None = Field(None, description="optional per-criterion scores, 1-5")


class VoteRequest(BaseModel):
    battle_id: str
    winner: str = Field(description="a, b, tie or both_bad")
    scores: dict[str, dict[str, int]] | None = None
    rationale: str | None = None
    idempotency_key: str | None = None


class AdapterRequest(BaseModel):
    name: str
    path: str = Field(description="a PEFT LoRA adapter folder on the studio's machine")


class RunRequest(BaseModel):
    stage: str = Field(description="reward, dpo, ppo, sft, or the pipeline ppo_then_dpo")
    parent: str = Field(camp.POLICY, description="model version or alias to start from")
    campaigns: list[str] | None = Field(None, description="labeling campaigns to train on (all if unset)")
    held_out: float | None = Field(None, description="share of prompts kept out for evaluation")
    recipe: str | None = Field(None, description="recipe name (data/recipes); the stage's own by default")
    steps: int | None = Field(None, description="override the recipe's steps (ppo: iterations)")
    overrides: dict[str, Any] | None = Field(None, description="recipe keys, e.g. {'train.beta': 0.2}")
    reward_model: str | None = Field(None, description="ppo: a reward version (the newest by default)")
    annotators: list[str] | None = Field(None, description="only these annotators' judgments (all if unset)")
    min_strength: int | None = Field(None, description="only judgments stated at least this strong (1-3)")


class PromoteRequest(BaseModel):
    alias: str = Field(camp.POLICY, description="the alias to point at this version")


class UserRequest(BaseModel):
    name: str
    role: str
    password: str


def studio_of(request: Request) -> Studio:
    return request.app.state.studio


def allowed(capability: str) -> Callable[[Request], Awaitable[User]]:
    """Dependency: the caller's user from `Authorization: Bearer TOKEN`, checked for `capability`."""

    async def check(request: Request) -> User:
        # async, so that a known token costs no hop to a worker thread; a token not seen
        # yet is looked up in the database on one
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        store = studio_of(request).store
        user = None
        if scheme.lower() == "bearer" and token:
            user = users.known_token(store, token.strip()) or await run_in_threadpool(
                users.user_for_token, store, token.strip()
            )
        if user is None:
            raise HTTPException(
                401,
                "missing or unknown token: send 'Authorization: Bearer TOKEN' "
                "(a token comes with `studio users add`, or `studio users token NAME`)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            return user.require(capability)
        except AuthError as exc:
            raise HTTPException(403, str(exc)) from None

    return check


def install_error_handlers(app: FastAPI) -> None:
    """User mistakes become 422 with the message; the backend being down becomes 503."""

    async def bad_input(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    async def backend_down(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    for exc_type in (StoreError, PromptFileError):
        app.add_exception_handler(exc_type, bad_input)
    app.add_exception_handler(BackendError, backend_down)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    @router.get("/health")
    def health(request: Request) -> JSONResponse:
        report = studio_of(request).health()
        return JSONResponse(report, status_code=200 if report["studio"] == "ok" else 503)

    @router.get("/me")
    def me(user: User = Depends(allowed("view"))) -> dict[str, Any]:
        return {"name": user.name, "role": user.role}

    @router.post("/sample")
    def sample(
        body: SampleRequest, request: Request, user: User = Depends(allowed("sample"))
    ) -> dict[str, Any]:
        studio = studio_of(request)
        assert studio.sampler is not None
        messages = (
            normalize_messages(body.prompt, "request", "prompt")
            if body.prompt is not None
            else normalize_messages(body.messages, "request", "messages")
        )
        try:
            params = SamplingParams(
                n=body.n,
                temperature=body.temperature,
                top_p=body.top_p,
                max_tokens=body.max_tokens,
                seed=body.seed,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        version = camp.resolve_policy(studio.store, body.model or studio.base_version)
        rows = studio.sampler.sample(messages, params, version=version)
        return {"generations": [_public(r) for r in rows]}

    @router.get("/models")
    def models(request: Request, user: User = Depends(allowed("view"))) -> dict[str, Any]:
        store = studio_of(request).store
        return {"models": [_public(v) for v in store.model_versions()], "aliases": camp.aliases(store)}

    @router.get("/prompt-sets")
    def prompt_sets(request: Request, user: User = Depends(allowed("view"))) -> dict[str, Any]:
        return {"prompt_sets": [_public(s) for s in studio_of(request).store.prompt_sets()]}

    @router.post("/prompt-sets/{name}/prompts")
    def import_prompts(
        name: str, body: ImportRequest, request: Request, user: User = Depends(allowed("import"))
    ) -> dict[str, Any]:
        store = studio_of(request).store
        locations = body.locations or [f"record {i}" for i in range(1, len(body.records) + 1)]
        if len(locations) != len(body.records):
            raise HTTPException(422, "'locations' must have one entry per record")
        prompts = [to_prompt(r, where) for r, where in zip(body.records, locations, strict=True)]
        result = store.import_prompts(name, prompts, source=body.source)
        return {
            "set": result.set_name,
            "added": result.added,
            "duplicates": result.duplicates,
            "summary": result.summary(),
        }

    # users ----------------------------------------------------------------------
    @router.get("/users")
    def list_users(request: Request, user: User = Depends(allowed("admin"))) -> dict[str, Any]:
        return {"users": [_public(u) for u in users.list_users(studio_of(request).store)]}

    @router.post("/users")
    def add_user(
        body: UserRequest, request: Request, user: User = Depends(allowed("admin"))
    ) -> dict[str, Any]:
        token = users.add_user(studio_of(request).store, body.name, body.role, body.password)
        return {"name": body.name, "role": body.role, "token": token}

    # campaigns --------------------------------------------------------------------
    @router.get("/campaigns")
    def list_campaigns(request: Request, user: User = Depends(allowed("view"))) -> dict[str, Any]:
        return {"campaigns": [_public(c) for c in camp.list_campaigns(studio_of(request).store)]}

    @router.post("/campaigns")
    def create_campaign(
        body: CampaignRequest, request: Request, user: User = Depends(allowed("admin"))
    ) -> dict[str, Any]:
        studio = studio_of(request)
        fields = body.model_dump()
        created = camp.create_campaign(studio.store, fields.pop("name"), created_by=user.name, **fields)
        if studio.task_sampler:
            studio.task_sampler.poke()
        return _public(created)

    @router.get("/campaigns/{name}")
    def get_campaign(name: str, request: Request, user: User = Depends(allowed("view"))) -> dict[str, Any]:
        studio = studio_of(request)
        out = _public(camp.get_campaign(studio.store, name))
        out["progress"] = labeling.progress(studio.store, name, user.name)
        return out

    @router.put("/campaigns/{name}/guidelines")
    def set_guidelines(
        name: str, body: GuidelinesRequest, request: Request, user: User = Depends(allowed("admin"))
    ) -> dict[str, Any]:
        camp.set_guidelines(studio_of(request).store, name, body.text)
        return {"campaign": name, "guidelines": body.text}

    @router.get("/campaigns/{name}/quality")
    def campaign_quality(
        name: str, request: Request, user: User = Depends(allowed("admin"))
    ) -> dict[str, Any]:
        store = studio_of(request).store
        camp.get_campaign(store, name)
        return {
            "campaign": name,
            "agreement": quality.campaign_agreement(store, name),
            "annotators": quality.annotator_quality(store, name),
            "progress": labeling.progress(store, name),
        }

    # labeling -----------------------------------------------------------------------
    @router.post("/campaigns/{name}/next")
    def next_task(name: str, request: Request, user: User = Depends(allowed("label"))) -> dict[str, Any]:
        return _next(studio_of(request), name, user)

    @router.post("/judgments")
    async def submit(
        body: JudgmentRequest, request: Request, user: User = Depends(allowed("label"))
    ) -> dict[str, Any]:
        # The busiest route. The pool answers from memory and only the group commit waits,
        # so it runs on the event loop and awaits the commit instead of holding a thread.
        studio = studio_of(request)
        fields = body.model_dump(exclude={"shown_at", "next"})
        sub = labeling.Submission(**fields)
        # with next=true the next task is taken in the same step and answered with it
        committed, finish = labeling.begin_submit(
            studio.store, user.name, sub, shown_at=body.shown_at, then_next=body.next
        )
        with contextlib.suppress(Exception):  # finish() raises it, after undoing the change
            await asyncio.wrap_future(committed)
        judgment, task = finish()
        if studio.task_sampler:
            studio.task_sampler.poke()
        out: dict[str, Any] = {"judgment": judgment}
        if body.next:
            out["next"] = _next(studio, judgment["campaign"], user, task, asked=True)
        return JSONResponse(out)

    @router.post("/assignments/{assignment_id}/skip")
    def skip(assignment_id: str, request: Request, user: User = Depends(allowed("label"))) -> dict[str, Any]:
        labeling.skip(studio_of(request).store, user.name, assignment_id)
        return {"skipped": assignment_id}

    # arena --------------------------------------------------------------------------
    @router.post("/arena/campaigns")
    def create_battle_campaign(
        body: BattleCampaignRequest, request: Request, user: User = Depends(allowed("admin"))
    ) -> dict[str, Any]:
        studio = studio_of(request)
        fields = body.model_dump()
        created = arena.create_battle_campaign(
            studio.store, fields.pop("name"), created_by=user.name, **fields
        )
        if studio.task_sampler:
            studio.task_sampler.poke()
        return _public(created)

    @router.post("/arena/{name}/next")
    def next_battle(name: str, request: Request, user: User = Depends(allowed("battle"))) -> dict[str, Any]:
        studio = studio_of(request)
        battle = arena.next_battle(studio.store, name, user.name)
        if battle is None and studio.task_sampler:
            studio.task_sampler.poke(name, starved=True)
        return {"battle": battle}

    @router.post("/arena/votes")
    def cast_vote(
        body: VoteRequest, request: Request, user: User = Depends(allowed("battle"))
    ) -> dict[str, Any]:
        studio = studio_of(request)
        reveal = arena.vote(
            studio.store,
            user.name,
            body.battle_id,
            body.winner,
            scores=body.scores,
            rationale=body.rationale,
            idempotency_key=body.idempotency_key,
        )
        if studio.task_sampler:
            studio.task_sampler.poke()
        return {"reveal": reveal}

    @router.get("/arena/{name}")
    def battle_stats(name: str, request: Request, user: User = Depends(allowed("view"))) -> dict[str, Any]:
        store = studio_of(request).store
        campaign = arena.battle_campaign(store, name)
        interval = arena.two_version_interval(store, name) if len(campaign["versions"]) == 2 else None
        return {
            "campaign": _public(campaign),
            **arena.campaign_leaderboard(store, name),
            "two_version_interval": interval,
            "experts": arena.expert_quality(store, name),
        }

    @router.get("/leaderboard")
    def get_leaderboard(
        request: Request,
        campaign: str | None = None,
        style: str | None = None,
        user: User = Depends(allowed("view")),
    ) -> list[dict[str, Any]]:
        """The same list `studio leaderboard --json` prints; `style=length` controls for answer length."""
        if style not in (None, "length"):
            raise HTTPException(422, f"style={style}: the only style control is 'length'")
        board = arena.campaign_leaderboard(
            studio_of(request).store, campaign, style_control=style == "length"
        )
        return board["style_controlled"]["leaderboard"] if style else board["leaderboard"]

    @router.post("/arena/battles/{battle_id}/regenerate")
    def regenerate(
        battle_id: str, request: Request, user: User = Depends(allowed("battle"))
    ) -> dict[str, Any]:
        studio = studio_of(request)
        arena.regenerate(studio.store, user.name, battle_id)
        if studio.task_sampler:
            studio.task_sampler.poke()
        return {"discarded": battle_id}

    @router.get("/arena/battles/log")
    def battles_log(
        request: Request, campaign: str | None = None, user: User = Depends(allowed("admin"))
    ) -> list[dict[str, Any]]:
        return arena.battle_log(studio_of(request).store, campaign)

    @router.post("/models/adapters")
    def add_adapter(
        body: AdapterRequest, request: Request, user: User = Depends(allowed("train"))
    ) -> dict[str, Any]:
        version = studio_of(request).add_adapter(body.name, Path(body.path), source=f"upload:{user.name}")
        return _public(version)

    @router.get("/models/{name}/lineage")
    def model_lineage(name: str, request: Request, user: User = Depends(allowed("train"))) -> list[dict]:
        return [_public(step) for step in training.lineage(studio_of(request).store, name)]

    @router.post("/models/{name}/promote")
    def promote(
        name: str, body: PromoteRequest, request: Request, user: User = Depends(allowed("train"))
    ) -> dict[str, Any]:
        camp.set_alias(studio_of(request).store, body.alias, name)
        return {"alias": body.alias, "version": name}

    # training -----------------------------------------------------------------------
    @router.get("/train/recipes")
    def list_recipes(request: Request, user: User = Depends(allowed("train"))) -> dict[str, str]:
        return {
            k: str(v) for k, v in training.recipes(studio_of(request).settings.data_dir / "recipes").items()
        }

    @router.get("/train/advice")
    def advice(request: Request, user: User = Depends(allowed("train"))) -> dict[str, Any]:
        return training.advise(studio_of(request).store)

    @router.post("/runs")
    def start_run(
        body: RunRequest, request: Request, user: User = Depends(allowed("train"))
    ) -> dict[str, Any]:
        studio = studio_of(request)
        run = training.submit_run(
            studio.store, studio.settings.data_dir, created_by=user.name, **body.model_dump()
        )
        if studio.runner is not None:
            studio.runner.poke()
        return _public(run)

    @router.get("/runs")
    def runs(request: Request, user: User = Depends(allowed("train"))) -> list[dict[str, Any]]:
        return [_public(r) for r in training.list_runs(studio_of(request).store)]

    @router.get("/runs/{run_id}")
    def run_detail(run_id: str, request: Request, user: User = Depends(allowed("train"))) -> dict[str, Any]:
        run = training.get_run(studio_of(request).store, run_id)
        out = Path(run["output_dir"])
        curves = jobs.read_metrics(out)
        return {
            **_public(run),
            "progress": jobs.progress(run, curves),
            "curves": curves,
            "log": jobs.tail(out / "run.log"),
        }

    @router.post("/runs/{run_id}/cancel")
    def cancel_run(run_id: str, request: Request, user: User = Depends(allowed("train"))) -> dict[str, Any]:
        studio = studio_of(request)
        if studio.runner is None:
            raise HTTPException(503, "the training runner is not running")
        return _public(studio.runner.cancel(run_id, f"cancelled by {user.name}"))

    # export -------------------------------------------------------------------------
    @router.get("/export")
    def export(
        request: Request,
        kind: str = "preference",
        format: str = "parquet",
        campaign: str | None = None,
        user: User = Depends(allowed("admin")),
    ) -> FileResponse:
        if kind not in KINDS:
            raise HTTPException(422, f"kind={kind}: use one of {', '.join(KINDS)}")
        if format not in ("parquet", "jsonl"):
            raise HTTPException(
                422,
                f"format={format}: REST serves parquet or jsonl files "
                "(a datasets folder comes from `studio export`)",
            )
        folder = Path(mkdtemp(prefix="studio-export-"))
        result = write_export(studio_of(request).store, folder / f"{kind}.{format}", kind, format, campaign)
        return FileResponse(
            result["path"],
            filename=f"{campaign or 'all'}-{kind}.{format}",
            background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
        )

    return router


def _next(
    studio: Studio, campaign: str, user: User, task: dict[str, Any] | None = None, asked: bool = False
) -> dict[str, Any]:
    """The next task (or the one `asked` for already) and where the user stands."""
    if not asked:
        task = labeling.next_task(studio.store, campaign, user.name)
    status = labeling.progress(studio.store, campaign, user.name)
    if task is None and studio.task_sampler and status["remaining"]:
        studio.task_sampler.poke(campaign, starved=True)
    return {"task": task, "progress": status}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
