"""The route and role matrix, generated from the app itself, not kept by hand.

Every REST route (the app's routes) and every named Gradio event (the built app's config, as the
browser reads it) is called with no credentials, a wrong one, and each role's (annotator, expert,
engineer, admin). What each answer must be is derived from the documented capability map: the
service functions a route or event calls (read from its code) each require a capability
(`services.ACTIONS`), and `users.CAN` says which roles have it. A role with every capability
needed is served; a role without one is refused (403 / a "may not" toast) before anything
changes. A route or event that calls no service must be listed here as public, with why.

So a route or event added without a role check fails here: it either calls no service (and is
not listed as public), or it serves a role the capability map refuses.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route

from studio import arena, users
from studio import campaigns as camp
from studio import services as svc
from studio.store import Store
from tests.conftest import NoModelStudio
from tests.helpers import PASSWORD, make_users, seed_battles, seed_campaign

ROLES = users.ROLES
API = "/api/v1"

# Routes that call no role-checked service, and why each may.
PUBLIC_ROUTES = {
    "GET /api/v1/health": "a load balancer's probe: up or down only, the detail needs a role",
    "GET /openapi.json": "the REST API's schema (FastAPI's); it holds no data",
    "GET /docs": "the schema's page (FastAPI's)",
    "GET /docs/oauth2-redirect": "the schema page's helper (FastAPI's)",
    "GET /redoc": "the schema's other page (FastAPI's)",
}
# Gradio events that call no service, and why each may.
PUBLIC_EVENTS = {
    "session": "who is logged in, and which tabs to show them: their own name and role",
    "tab_changed": "which of the page's timers run",
}
# Services an event calls only for users who may (it checks `may` first): not needed to be served.
OPTIONAL = {"expert_quality": "the Leaderboard tab shows the experts table only to admins"}


OURS = ("studio.ui", "studio.api")  # the doors' own helpers, walked into


def reached(fn: Callable[..., Any]) -> set[str]:
    """The service functions (actions and public ones) a route or event function can call: the
    names it uses, through the functions and closures of the studio's own code it calls."""
    found: set[str] = set()
    seen: set[types.CodeType] = set()
    services = set(svc.ACTIONS) | set(svc.PUBLIC)

    def walk_code(code: types.CodeType, glb: dict[str, Any], cells: tuple[Any, ...]) -> None:
        if code in seen:
            return
        seen.add(code)
        for name in code.co_names:
            if name in services:
                found.add(name)
            target = glb.get(name)
            if isinstance(target, types.FunctionType) and target.__module__.startswith(
                ("studio.ui", "studio.api")
            ):
                walk(target)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk_code(const, glb, cells)
        for cell in cells:
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, types.FunctionType):
                walk(value)

    def walk(f: types.FunctionType) -> None:
        walk_code(f.__code__, f.__globals__, f.__closure__ or ())

    walk(fn)  # type: ignore[arg-type]
    return found


def allowed_roles(actions: set[str]) -> set[str]:
    """Roles with every capability the actions need (public services need none)."""
    roles = set(ROLES)
    for action in actions - set(svc.PUBLIC) - set(OPTIONAL):
        roles &= users.CAN[svc.ACTIONS[action].capability]
    return roles


# ---------------------------------------------------------------- the studio under test


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NoModelStudio, dict[str, str]]]:
    """The real app (REST and the UI) on a real store, no model server: a labeling campaign c1,
    a battle campaign duel with a battle assigned to the expert, one user per role."""
    with NoModelStudio(tmp_path_factory.mktemp("matrix"), ui=True) as studio:
        store = studio.studio.store
        seed_campaign(store, prompts=3, n=2, overlap=1)
        seed_battles(store, "duel", [("base", "other", "one", "two")] * 3)
        store.write("UPDATE model_versions SET kind = 'lora', parent = 'base' WHERE name = 'other'")
        camp.set_alias(store, camp.POLICY, "other")
        tokens = make_users(store, *((role, role) for role in ROLES))
        arena.next_battle(store, "duel", "expert")
        yield studio, tokens


def battle(store: Store) -> str:
    return store.query("SELECT id FROM battles WHERE expert = 'expert' ORDER BY created_at")[0]["id"]


# A realistic request per route: path parameters, query and body that reach the service (the
# route's own body validation comes before the role check). A new route needs a line here.
REQUESTS: dict[str, Callable[[Store], dict[str, Any]]] = {
    "GET /api/v1/health": lambda s: {},
    "GET /api/v1/me": lambda s: {},
    "POST /api/v1/sample": lambda s: {"json": {"prompt": "hi", "max_tokens": 4}},
    "GET /api/v1/models": lambda s: {},
    "GET /api/v1/prompt-sets": lambda s: {},
    "POST /api/v1/prompt-sets/{name}/prompts": lambda s: {
        "path": {"name": "matrix-set"},
        "json": {"records": [{"prompt": "x"}]},
    },
    "GET /api/v1/users": lambda s: {},
    "POST /api/v1/users": lambda s: {"json": {"name": "mallory", "role": "admin", "password": "password123"}},
    "GET /api/v1/campaigns": lambda s: {},
    "POST /api/v1/campaigns": lambda s: {"json": {"name": "matrix-c", "prompt_set": "c1-set"}},
    "GET /api/v1/campaigns/{name}": lambda s: {"path": {"name": "c1"}},
    "PUT /api/v1/campaigns/{name}/guidelines": lambda s: {
        "path": {"name": "c1"},
        "json": {"text": "be kind"},
    },
    "GET /api/v1/campaigns/{name}/quality": lambda s: {"path": {"name": "c1"}},
    "POST /api/v1/campaigns/{name}/next": lambda s: {"path": {"name": "c1"}},
    "POST /api/v1/judgments": lambda s: {"json": {"assignment_id": "nope", "ranks": [1, 2]}},
    "POST /api/v1/assignments/{assignment_id}/skip": lambda s: {"path": {"assignment_id": "nope"}},
    "POST /api/v1/arena/campaigns": lambda s: {
        "json": {"name": "matrix-duel", "prompt_set": "c1-set", "versions": ["base", "other"]}
    },
    "POST /api/v1/arena/{name}/next": lambda s: {"path": {"name": "duel"}},
    "POST /api/v1/arena/votes": lambda s: {"json": {"battle_id": battle(s), "winner": "a"}},
    "GET /api/v1/arena/battles/log": lambda s: {},
    "GET /api/v1/arena/{name}": lambda s: {"path": {"name": "duel"}},
    "GET /api/v1/leaderboard": lambda s: {"params": {"campaign": "duel"}},
    "POST /api/v1/arena/battles/{battle_id}/regenerate": lambda s: {"path": {"battle_id": battle(s)}},
    "POST /api/v1/models/adapters": lambda s: {"json": {"name": "matrix-adapter", "path": "/nowhere"}},
    "GET /api/v1/models/{name}/lineage": lambda s: {"path": {"name": "other"}},
    "GET /api/v1/models/{name}/card": lambda s: {"path": {"name": "other"}},
    "POST /api/v1/evals": lambda s: {"json": {"version": "other", "suites": ["refusal"], "limit": 1}},
    "GET /api/v1/evals": lambda s: {},
    "GET /api/v1/evals/{eval_id}": lambda s: {"path": {"eval_id": "eval-x"}},
    "POST /api/v1/models/{name}/promote": lambda s: {"path": {"name": "base"}, "json": {}},
    "POST /api/v1/models/{alias}/rollback": lambda s: {"path": {"alias": "policy"}},
    "GET /api/v1/train/recipes": lambda s: {},
    "GET /api/v1/train/advice": lambda s: {},
    "POST /api/v1/runs": lambda s: {"json": {"stage": "dpo"}},
    "GET /api/v1/runs": lambda s: {},
    "GET /api/v1/runs/{run_id}": lambda s: {"path": {"run_id": "run-x"}},
    "POST /api/v1/runs/{run_id}/cancel": lambda s: {"path": {"run_id": "run-x"}},
    "GET /api/v1/export": lambda s: {"params": {"format": "jsonl"}},
    "GET /api/v1/backup": lambda s: {},
    "GET /api/v1/sampler": lambda s: {},
    "POST /api/v1/sampler/measure": lambda s: {},  # no model server here: a 503 for admins
}


def state(store: Store) -> dict[str, list[str]]:
    """Every row of every table, as text (last_login and the like excluded: a login is not a
    change an action made)."""
    tables = [r["name"] for r in store.query("SELECT table_name AS name FROM duckdb_tables()")]
    return {t: sorted(map(str, store.query(f"SELECT * FROM {t}"))) for t in tables if t != "login_failures"}


def rest_routes(app: Any) -> tuple[list[APIRoute], list[str]]:
    """The REST routes, and every other route's key (a public route or the Gradio mount)."""
    api, other = [], []
    for route in app.routes:
        if isinstance(route, APIRoute):
            api.extend([route] if route.path.startswith(API) else [])
            if not route.path.startswith(API):
                other += [f"{m} {route.path}" for m in sorted(route.methods)]
        elif isinstance(route, Route):
            other += [f"{m} {route.path}" for m in sorted(route.methods or ["GET"]) if m != "HEAD"]
        elif isinstance(route, Mount):
            other.append(f"MOUNT {route.path or '/'}")
    return api, other


def test_every_rest_route_serves_exactly_the_roles_of_the_services_it_calls(
    served: tuple[NoModelStudio, dict[str, str]],
) -> None:
    studio, tokens = served
    store = studio.studio.store
    api, others = rest_routes(studio.app)
    assert len(api) >= 30
    for key in others:  # the routes outside /api/v1: FastAPI's schema pages and the Gradio mount
        assert key in PUBLIC_ROUTES or key == "MOUNT /", f"{key}: not a REST route and not listed public"
    wrong: list[str] = []
    for route in api:
        for method in sorted(route.methods):
            key = f"{method} {route.path}"
            if key not in REQUESTS:
                wrong.append(f"{key}: no request in REQUESTS (add a realistic one)")
                continue
            services = reached(route.endpoint)
            if not services:
                wrong.append(f"{key}: calls no service, so no role check (or list it in PUBLIC_ROUTES)")
                continue
            request = REQUESTS[key](store)
            url = studio.url + route.path.format(**request.get("path", {}))
            kw = {k: request[k] for k in ("json", "params") if k in request}

            def send(
                token: str | None, url: str = url, method: str = method, kw: dict = kw
            ) -> httpx.Response:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                return httpx.request(method, url, headers=headers, timeout=60, **kw)

            public = services <= set(svc.PUBLIC)
            if public != (key in PUBLIC_ROUTES):
                wrong.append(f"{key}: public is {public}, PUBLIC_ROUTES says {key in PUBLIC_ROUTES}")
            before = state(store)
            for token, who in ((None, "no token"), ("not-a-token", "a wrong token")):
                got = send(token)
                if public and token is None:
                    if set(got.json()) != {"studio"}:
                        wrong.append(f"{key} for {who}: more than up/down: {got.text[:200]}")
                elif got.status_code != 401:
                    wrong.append(f"{key} for {who}: {got.status_code}, not 401")
            allowed = allowed_roles(services)
            for role in sorted(set(ROLES) - allowed):  # refused ones first: nothing may change
                got = send(tokens[role])
                if got.status_code != 403 or f"user '{role}' ({role}) may not" not in got.text:
                    wrong.append(f"{key} for {role}: {got.status_code} {got.text[:200]}, not refused")
            if state(store) != before:
                wrong.append(f"{key}: a refused call changed the database")
            for role in sorted(allowed):
                got = send(tokens[role])
                if got.status_code in (401, 403) or got.status_code == 500:
                    wrong.append(f"{key} for {role}: {got.status_code} {got.text[:200]}, not served")
                if public:
                    detailed = "store" in got.json()
                    if detailed != users.User(role, role).can(svc.HEALTH_DETAIL):
                        wrong.append(f"{key} for {role}: detail shown is {detailed}")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- the Gradio events


def gradio_blocks(app: Any) -> Any:
    (mount,) = [r for r in app.routes if isinstance(r, Mount)]
    return mount.app.get_blocks()


def finish(client: httpx.Client, api_name: str, data: list[Any]) -> tuple[str, Any]:
    """Call an event by name through Gradio's HTTP API; its final event ('complete' or 'error')."""
    start = client.post(f"/gradio_api/call/{api_name}", json={"data": data})
    if start.status_code != 200:
        return f"http {start.status_code}", start.text
    stream = client.get(f"/gradio_api/call/{api_name}/{start.json()['event_id']}", timeout=120)
    last: tuple[str, Any] = ("none", stream.text)
    kind = None
    for line in stream.text.splitlines():
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and kind in ("complete", "error"):
            last = (kind, json.loads(line.split(":", 1)[1]))
    return last


# Inputs that reach the service where the component's empty value is answered by the handler
# itself ("pick a campaign first"): without them a role would be told that, not refused.
REALISTIC: dict[str, dict[int, Any]] = {
    "label_next": {0: "c1"},
    "label_pick": {0: "c1"},
    "label_poll": {0: "c1", 1: {}},
    "sxs_next": {0: "duel"},
    "sxs_pick": {0: "duel"},
    "model_card": {0: "other"},
    "admin_guidelines_load": {0: "c1"},
    "admin_guidelines": {0: "c1", 1: "be kind"},
    "admin_quality": {0: "c1"},
}


def login(url: str, role: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    assert client.post("/login", data={"username": role, "password": PASSWORD}).json() == {"success": True}
    return client


def test_every_gradio_event_serves_exactly_the_roles_of_the_services_it_calls(
    served: tuple[NoModelStudio, dict[str, str]],
) -> None:
    studio, _ = served
    store = studio.studio.store
    blocks = gradio_blocks(studio.app)
    by_name = {fn.api_name: fn for fn in blocks.fns.values() if fn.fn is not None}
    config = httpx.get(f"{studio.url}/config", cookies=login(studio.url, "admin").cookies).json()
    events = [d for d in config["dependencies"] if d["backend_fn"]]
    names = [d["api_name"] for d in events]
    assert all(names) and len(names) == len(set(names)), "every event has its own api_name"
    assert set(names) == set(by_name) and len(names) >= 40
    uploaded = login(studio.url, "admin").post(
        "/gradio_api/upload", files={"files": ("p.jsonl", b'{"prompt": "hi"}\n', "application/json")}
    )
    realistic = {
        **REALISTIC,
        "admin_import": {0: {"path": uploaded.json()[0], "meta": {"_type": "gradio.FileData"}}, 1: "m-set"},
    }
    components = {c["id"]: c for c in config["components"]}
    sessions = {role: login(studio.url, role) for role in ROLES}
    anonymous = httpx.Client(base_url=studio.url, timeout=60)
    wrong_password = httpx.Client(base_url=studio.url, timeout=60)
    assert wrong_password.post("/login", data={"username": "admin", "password": "wrong"}).status_code >= 400
    wrong: list[str] = []
    for dep in events:
        name = dep["api_name"]
        data = [components[i]["props"].get("value") for i in dep["inputs"]]
        for position, value in realistic.get(name, {}).items():
            data[position] = value
        services = reached(by_name[name].fn)
        if not services and name not in PUBLIC_EVENTS:
            wrong.append(f"{name}: calls no service, so no role check (or list it in PUBLIC_EVENTS)")
            continue
        for client, who in (
            (httpx.Client(base_url=studio.url), "no login"),
            (wrong_password, "a wrong password"),
        ):
            status = client.post(f"/gradio_api/call/{name}", json={"data": data}).status_code
            if status != 401:
                wrong.append(f"{name} for {who}: HTTP {status}, not 401")
        allowed = allowed_roles(services)
        before = state(store)
        for role in sorted(set(ROLES) - allowed):
            kind, payload = finish(sessions[role], name, data)
            message = (payload or {}).get("error") or "" if isinstance(payload, dict) else str(payload)
            if not (kind == "error" and f"user '{role}' ({role}) may not" in message):
                wrong.append(f"{name} for {role}: {kind} {str(payload)[:200]}, not refused")
        if state(store) != before:
            wrong.append(f"{name}: a refused call changed the database")
        for role in sorted(allowed):
            kind, payload = finish(sessions[role], name, data)
            message = (payload or {}).get("error") if isinstance(payload, dict) else None
            served_ok = kind == "complete" or (kind == "error" and message and "may not" not in message)
            if not served_ok:
                wrong.append(f"{name} for {role}: {kind} {str(payload)[:200]}, not served")
    for client in (*sessions.values(), anonymous, wrong_password):
        client.close()
    assert not wrong, "\n".join(wrong)
