"""The app factory: FastAPI with the REST API, the Gradio UI at /, and the studio's lifespan."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from studio.api import build_router, install_error_handlers
from studio.config import Settings
from studio.runtime import Studio

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


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
            auth_message="Preference Studio: log in with the account an admin gave you.",
            head=SHORTCUTS,
        )

    return app
