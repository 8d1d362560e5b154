"""The Gradio studio mounted at /: one module per tab, and `common` for what they share.

Every event handler is a thin adapter over a `studio.services` function, which checks the
user's role on the server. Each tab is also shown only to the users who may use it (set on page
load from the capabilities of the service actions the tab's module lists in `SHOWN_TO`); hiding
a tab is a convenience on top of the server's check, never instead of it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import gradio as gr

from studio import users
from studio.ui import admin, label, leaderboard, models, playground, sxs, train
from studio.ui.common import handler, may, text
from studio.ui.label import SHORTCUTS
from studio.users import User

if TYPE_CHECKING:
    from studio.runtime import Studio

__all__ = ["SHORTCUTS", "build_ui", "gradio_auth"]

# Gradio keeps copies of the files it serves (downloads, uploads) in its cache: each is deleted
# after an hour, and all of them when the studio stops.
CACHE_LIFETIME_S = 3600


def build_ui(studio: Studio) -> gr.Blocks:
    exports = admin.ExportFolders()
    with gr.Blocks(title="Preference Studio", delete_cache=(CACHE_LIFETIME_S, CACHE_LIFETIME_S)) as demo:
        with gr.Row():
            gr.Markdown("# Preference Studio")
            who = gr.Markdown(elem_id="whoami")
            gr.Button("Log out", link="/logout", size="sm", scale=0)
        with gr.Tabs() as tabs:
            label_tab = label.build(studio, demo)
            sxs_tab = sxs.build(studio, demo)
            leaderboard_tab, leaderboard_timer = leaderboard.build(studio, demo)
            playground_tab = playground.build(studio, demo)
            models_tab = models.build(studio, demo)
            train_tab, train_timer = train.build(studio, demo)
            admin_tab = admin.build(studio, demo, exports)
        shown_to = {
            label_tab: label.SHOWN_TO,
            sxs_tab: sxs.SHOWN_TO,
            leaderboard_tab: leaderboard.SHOWN_TO,
            playground_tab: playground.SHOWN_TO,
            models_tab: models.SHOWN_TO,
            train_tab: train.SHOWN_TO,
            admin_tab: admin.SHOWN_TO,
        }
        # Hidden until the page load says who is here; Label opens first, so it stays (everyone
        # who may log in may label, and a page whose open tab appears late would flicker).
        for tab in shown_to:
            tab.visible = tab is label_tab

        def session(user: User) -> list[Any]:
            return [
                f"Logged in as **{text(user.name)}** ({text(user.role)})",
                *[gr.Tab(visible=may(user, actions)) for actions in shown_to.values()],
            ]

        demo.load(
            handler(studio)(session), None, [who, *shown_to], api_name="session", api_visibility="private"
        )

        def tab_changed(event: gr.SelectData) -> list[Any]:
            # the leaderboard and the run view refresh themselves only while they are the open tab
            return [
                gr.Timer(active=event.value == "Leaderboard" or event.index == "leaderboard"),
                gr.Timer(active=event.value == "Train" or event.index == "train"),
            ]

        tabs.select(
            tab_changed,
            None,
            [leaderboard_timer, train_timer],
            api_name="tab_changed",
            api_visibility="private",
        )
    # Download folders still on disk go when the studio's process ends.
    weakref.finalize(demo, exports.remove_all)
    return demo


def gradio_auth(studio: Studio) -> Any:
    """Gradio's login check: name and password against the users table, under the login rate
    limit (studio/ratelimit.py). Over the limit, the login POST is answered 429 with
    "... try again in N s" and Retry-After (studio/app.py shows it on the login page)."""
    from fastapi import HTTPException

    from studio.ratelimit import LoginLimiter, TooManyAttempts, client_address

    limiter = LoginLimiter()

    async def check(username: str, password: str) -> bool:  # async: Gradio awaits it on the loop
        if studio.store is None:
            return False
        try:
            user = await users.login(studio.store, limiter, username, password, client_address.get())
        except TooManyAttempts as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        return user is not None

    return check
