"""The app factory: FastAPI with the REST API, the Gradio UI at /, and the studio's lifespan."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import escape
from typing import Any

from fastapi import FastAPI

from studio.api import build_router, install_error_handlers
from studio.config import Settings
from studio.ratelimit import client_address
from studio.runtime import Studio

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Gradio's login page shows its own fixed "Incorrect Credentials" on a 400 and nothing at all
# on any other answer, so a rate-limited login (429, "... try again in N s") would look like a
# dead button. The auth message is rendered as HTML: an image that cannot load runs its
# onerror once, which wraps fetch to put the login POST's 429 message (as text) under it.
_SHOW_LOGIN_REFUSAL = r"""
if (!window.studioLoginNotice) {
  window.studioLoginNotice = true;
  const fetch0 = window.fetch;
  window.fetch = async (...args) => {
    const response = await fetch0(...args);
    const url = String((args[0] && args[0].url) || args[0]);
    const notice = document.getElementById("login-notice");
    if (notice && /\/login\/?$/.test(url)) {
      const refused = response.status === 429;
      const body = refused ? await response.clone().json().catch(() => ({})) : {};
      notice.textContent = refused ? body.detail || "Too many attempts: wait and try again." : "";
    }
    return response;
  };
}
"""
LOGIN_MESSAGE = (
    "Preference Studio: log in with the account an admin gave you."
    '<br><strong id="login-notice" role="alert"></strong>'
    f'<img src="data:," alt="" hidden onerror="{escape(_SHOW_LOGIN_REFUSAL.strip(), quote=True)}">'
)


class ClientAddress:
    """ASGI middleware: each request's client address where the login check can read it
    (studio.ratelimit.client_address); Gradio gives its auth callable only name and password.
    Behind a reverse proxy this is the client uvicorn's proxy headers name: it trusts a proxy
    on this machine, and those listed in FORWARDED_ALLOW_IPS."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = client_address.set(str(client[0]) if client else "unknown")
        try:
            await self.app(scope, receive, send)
        finally:
            client_address.reset(token)


# Container objects allocated (net of those freed) before a young collection; CPython's default
# is 700. See freeze_startup_heap.
YOUNG_COLLECTION_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Leave what startup built out of the garbage collector's full passes, and collect the
    young generation less often.

    The served process holds ~160,000 objects after startup (FastAPI, Gradio, pandas, scipy,
    the studio), almost none of which will become garbage. A full collection walked them all,
    about 100 ms here, and every request in flight waited: the labeling p99 went from 16 to
    34-74 ms as the imports grew. Collected once, then frozen, a full pass walks only what
    requests made (benchmarks/README.md, annotate.py: p99 17-20 ms frozen, 34-41 ms not).

    What requests made includes the labeling pool's state, which grows with every task handed
    out (~90 ms for a full pass over a 200-annotator campaign's). At CPython's default young
    threshold (700 objects, one or two requests) each young collection found the requests
    then in flight alive and moved them on toward the old generation, so a full pass came
    every 0.5 s under load: 36 passes and 2.8 s of collection in a 20 s benchmark run. At
    10,000 they are mostly freed before a collection sees them: 2-3 full passes, 1.0 s.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


def create_app(settings: Settings, studio: Studio | None = None) -> FastAPI:
    """Build the app. Pass an already started `studio` (as `studio serve` does, so that
    start-up errors reach the user as plain messages); otherwise the lifespan starts one."""
    studio = studio or Studio(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocking start-up on purpose: no request is served before the store
        # and the model server are ready. The shutdown half also runs on
        # SIGINT/SIGTERM, which uvicorn turns into a graceful exit.
        if not studio.started:
            studio.start()
        try:
            yield
        finally:
            studio.stop()

    app = FastAPI(title="Preference Studio", lifespan=lifespan)
    app.state.studio = studio
    install_error_handlers(app)
    app.include_router(build_router())
    if settings.ui:
        import gradio as gr

        from studio.ui import SHORTCUTS, build_ui, gradio_auth

        # Login is required for every page and Gradio event; roles are then
        # checked by the service function each event handler calls (studio/ui/).
        app = gr.mount_gradio_app(
            app,
            build_ui(studio),
            path="/",
            footer_links=[],
            auth=gradio_auth(studio),
            auth_message=LOGIN_MESSAGE,
            head=SHORTCUTS,
        )
        app.add_middleware(ClientAddress)

    return app
