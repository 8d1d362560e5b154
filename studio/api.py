"""REST API under /api/v1: thin routes over `studio.services`.

A route authenticates (a bearer token -> `User`, 401 without a known one), passes the request to
one service function, and returns its answer. Role checks, defaults and validation are the
service's; its errors become responses here: refused 403, bad input 422, a part not running 503.
Request bodies are the services' spec dataclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any

import duckdb
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from studio import services as svc
from studio import users
from studio.errors import StorageFullError, storage_full
from studio.runtime import Studio
from studio.serving.client import BackendError, BackendRequestError
from studio.textcheck import shorten
from studio.users import AuthError, User


def studio_of(request: Request) -> Studio:
    return request.app.state.studio


async def maybe_authenticated(request: Request) -> User | None:
    """Dependency for public routes: None without an Authorization header, else `authenticated`
    (so a wrong token is a 401 there too, never taken for an anonymous call)."""
    if not request.headers.get("authorization"):
        return None
    return await authenticated(request)


async def authenticated(request: Request) -> User:
    """Dependency: the caller's user from `Authorization: Bearer TOKEN` (401 without a known token).

    Only who it is: what the user may do is checked by the service the route calls."""
    # async, so that a known token costs no hop to a worker thread; a token not seen
    # yet is looked up in the database on one
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    store = studio_of(request).store
    user = None
    if scheme.lower() == "bearer" and token and store is not None:
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
    return user


def install_error_handlers(app: FastAPI) -> None:
    """Refused -> 403; bad input (nothing stored) -> 422 with the message; a part down -> 503;
    the data directory's disk full (nothing stored) -> 507.

    A request the model server refused (a prompt or max_tokens beyond its context) is bad input,
    not a part down: 422 with what to shorten. Starlette picks the handler of the nearest class
    in the exception's MRO, so BackendRequestError's wins over BackendError's."""

    def answer(status: int) -> Any:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        return handler

    async def disk_full(request: Request, exc: Exception) -> JSONResponse:
        full = storage_full(exc)
        if full is None:
            raise exc  # a fault: Starlette logs it and answers 500
        return JSONResponse({"detail": str(full)}, status_code=507)

    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes each bad input whole: a 50 MB prompt would come back, and a
        # lone surrogate in it could not even be encoded. Name the field and show a short input.
        errors = [
            {
                "loc": [shorten(part) if isinstance(part, str) else part for part in e.get("loc", ())],
                "msg": e.get("msg", ""),
                "type": e.get("type", ""),
                **({"input": shorten(e["input"])} if "input" in e else {}),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(AuthError, answer(403))
    # the disk under the data directory is full: a DuckDB commit or a file write refused
    for error in (StorageFullError, duckdb.Error, OSError):
        app.add_exception_handler(error, disk_full)
    # StoreError and PromptFileError are ValueErrors
    app.add_exception_handler(ValueError, answer(422))
    app.add_exception_handler(BackendRequestError, answer(422))
    app.add_exception_handler(BackendError, answer(503))


Me = Depends(authenticated)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    @router.get("/health")
    def health(request: Request, user: User | None = Depends(maybe_authenticated)) -> JSONResponse:
        report = svc.health(studio_of(request), user)
        return JSONResponse(report, status_code=200 if report["studio"] == "ok" else 503)

    @router.get("/me")
    def me(request: Request, user: User = Me) -> dict[str, Any]:
        return svc.me(studio_of(request), user)

    @router.post("/sample")
    def sample(body: svc.SampleSpec, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.sample(studio_of(request), user, body)

    @router.get("/models")
    def models(request: Request, user: User = Me) -> dict[str, Any]:
        return svc.list_models(studio_of(request), user)

    @router.get("/prompt-sets")
    def prompt_sets(request: Request, user: User = Me) -> dict[str, Any]:
        return {"prompt_sets": svc.list_prompt_sets(studio_of(request), user)}

    @router.post("/prompt-sets/{name}/prompts")
    def import_prompts(name: str, body: svc.ImportSpec, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.import_records(studio_of(request), user, name, body)

    # users ----------------------------------------------------------------------
    @router.get("/users")
    def list_users(request: Request, user: User = Me) -> dict[str, Any]:
        return {"users": svc.list_users(studio_of(request), user)}

    @router.post("/users")
    def add_user(body: svc.UserSpec, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.add_user(studio_of(request), user, body)

    # campaigns --------------------------------------------------------------------
    @router.get("/campaigns")
    def list_campaigns(request: Request, user: User = Me) -> dict[str, Any]:
        return {"campaigns": svc.list_campaigns(studio_of(request), user)}

    @router.post("/campaigns")
    def create_campaign(body: svc.CampaignSpec, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.create_campaign(studio_of(request), user, body)

    @router.get("/campaigns/{name}")
    def get_campaign(name: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.get_campaign(studio_of(request), user, name)

    @router.put("/campaigns/{name}/guidelines")
    def set_guidelines(
        name: str, body: svc.GuidelinesSpec, request: Request, user: User = Me
    ) -> dict[str, Any]:
        return svc.set_guidelines(studio_of(request), user, name, body.text)

    @router.get("/campaigns/{name}/quality")
    def campaign_quality(name: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.campaign_quality(studio_of(request), user, name)

    @router.get("/sampler")
    def sampler_overview(request: Request, user: User = Me) -> dict[str, Any]:
        return svc.sampler_overview(studio_of(request), user)

    @router.post("/sampler/measure")
    def measure_serving(request: Request, user: User = Me) -> dict[str, Any]:
        return svc.measure_serving(studio_of(request), user)

    # labeling -----------------------------------------------------------------------
    @router.post("/campaigns/{name}/next")
    def next_task(name: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.next_task(studio_of(request), user, name)

    @router.post("/judgments")
    async def submit(body: svc.JudgmentSpec, request: Request, user: User = Me) -> JSONResponse:
        # The busiest route. The pool answers from memory and only the group commit waits,
        # so it runs on the event loop and awaits the commit instead of holding a thread.
        committed, answer = svc.begin_judgment(studio_of(request), user, body)
        with contextlib.suppress(Exception):  # answer() raises it, after undoing the change
            await asyncio.wrap_future(committed)
        return JSONResponse(answer())

    @router.post("/assignments/{assignment_id}/skip")
    def skip(assignment_id: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.skip(studio_of(request), user, assignment_id)

    # arena --------------------------------------------------------------------------
    @router.post("/arena/campaigns")
    def create_battle_campaign(
        body: svc.BattleCampaignSpec, request: Request, user: User = Me
    ) -> dict[str, Any]:
        return svc.create_battle_campaign(studio_of(request), user, body)

    @router.post("/arena/{name}/next")
    def next_battle(name: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.next_battle(studio_of(request), user, name)

    @router.post("/arena/votes")
    def cast_vote(body: svc.VoteSpec, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.vote(studio_of(request), user, body)

    @router.get("/arena/battles/log")
    def battles_log(request: Request, campaign: str | None = None, user: User = Me) -> list[dict[str, Any]]:
        return svc.battle_log(studio_of(request), user, campaign)

    @router.get("/arena/{name}")
    def battle_stats(name: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.battle_stats(studio_of(request), user, name)

    @router.get("/leaderboard")
    def get_leaderboard(
        request: Request,
        campaign: str | None = None,
        style: str | None = None,
        rounds: int | None = None,
        min_battles: int | None = None,
        user: User = Me,
    ) -> list[dict[str, Any]]:
        """The same list `studio leaderboard --json` prints; `style=length` controls for answer length."""
        spec = svc.LeaderboardSpec(
            **svc.given(campaign=campaign, style=style, rounds=rounds, min_battles=min_battles)
        )
        return svc.leaderboard(studio_of(request), user, spec)["rows"]

    @router.post("/arena/battles/{battle_id}/regenerate")
    def regenerate(battle_id: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.regenerate(studio_of(request), user, battle_id)

    # models -------------------------------------------------------------------------
    @router.post("/models/adapters")
    def add_adapter(body: svc.AdapterSpec, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.add_adapter(studio_of(request), user, body)

    @router.get("/models/{name}/lineage")
    def model_lineage(name: str, request: Request, user: User = Me) -> list[dict[str, Any]]:
        return svc.lineage(studio_of(request), user, name)

    @router.get("/models/{name}/card")
    def model_card(name: str, request: Request, user: User = Me) -> dict[str, Any]:
        """The version card: metrics beside the parent's, re-battle, gate, promotions, lineage."""
        return svc.model_card(studio_of(request), user, name)

    @router.post("/models/{name}/promote")
    def promote(name: str, body: svc.PromoteSpec, request: Request, user: User = Me) -> dict[str, Any]:
        """Refused (422, naming each failing gate rule) unless the gate passed or `force` is true."""
        return svc.promote(studio_of(request), user, name, body)

    @router.post("/models/{alias}/rollback")
    def rollback(alias: str, request: Request, user: User = Me) -> dict[str, Any]:
        """Point the alias back at the parent of the version it points at now."""
        return svc.rollback(studio_of(request), user, alias)

    # evaluation ---------------------------------------------------------------------
    @router.post("/evals")
    def start_eval(body: svc.EvalSpec, request: Request, user: User = Me) -> dict[str, Any]:
        """Answers at once with the queued record (its `id`); the evaluation worker runs it."""
        return svc.start_eval(studio_of(request), user, body)

    @router.get("/evals")
    def list_evals(request: Request, version: str | None = None, user: User = Me) -> list[dict[str, Any]]:
        return svc.list_evals(studio_of(request), user, version)

    @router.get("/evals/{eval_id}")
    def get_eval(eval_id: str, request: Request, user: User = Me) -> dict[str, Any]:
        """The record; its `result` is {version, against, metrics: {NAME: {version, against, delta,
        ci}}, gate: {passed, reasons}} once the status is 'succeeded'."""
        return svc.get_eval(studio_of(request), user, eval_id)

    # training -----------------------------------------------------------------------
    @router.get("/train/recipes")
    def list_recipes(request: Request, user: User = Me) -> dict[str, str]:
        return svc.recipes(studio_of(request), user)

    @router.get("/train/advice")
    def advice(request: Request, user: User = Me) -> dict[str, Any]:
        return svc.advice(studio_of(request), user)

    @router.post("/runs")
    def start_run(body: svc.RunSpec, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.start_run(studio_of(request), user, body)

    @router.get("/runs")
    def runs(request: Request, user: User = Me) -> list[dict[str, Any]]:
        return svc.list_runs(studio_of(request), user)

    @router.get("/runs/{run_id}")
    def run_detail(run_id: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.get_run(studio_of(request), user, run_id)

    @router.post("/runs/{run_id}/cancel")
    def cancel_run(run_id: str, request: Request, user: User = Me) -> dict[str, Any]:
        return svc.cancel_run(studio_of(request), user, run_id)

    # export -------------------------------------------------------------------------
    @router.get("/export")
    def export(
        request: Request,
        kind: str | None = None,
        format: str | None = None,
        campaign: str | None = None,
        user: User = Me,
    ) -> FileResponse:
        spec = svc.ExportSpec(**svc.given(kind=kind, format=format, campaign=campaign))
        result = svc.export_download(studio_of(request), user, spec)
        path = Path(result["path"])
        return FileResponse(
            path,
            filename=path.name,
            background=BackgroundTask(shutil.rmtree, path.parent, ignore_errors=True),
        )

    # backup -------------------------------------------------------------------------
    @router.get("/backup")
    def backup(request: Request, user: User = Me) -> FileResponse:
        """A consistent copy of the database, taken while the studio runs (studio/backup.py)."""
        result = svc.backup_download(studio_of(request), user)
        path = Path(result["path"])
        return FileResponse(
            path,
            filename=path.name,
            background=BackgroundTask(shutil.rmtree, path.parent, ignore_errors=True),
        )

    return router
