"""The Leaderboard tab: ratings of the versions from the blind battles, with intervals."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gradio as gr

from studio import services as svc
from studio.ui.common import forest_plot, frame, handler, matrix, may, table, text
from studio.users import User

if TYPE_CHECKING:
    from studio.runtime import Studio

# Those who judge battles or make the versions; annotators label and never see version names.
SHOWN_TO = ("vote", "start_run")
RATING_COLUMNS = ("rank", "version", "rating", "lower", "upper", "battles", "provisional")
EXPERT_COLUMNS = ("expert", "votes", "agreement_with_majority", "position_bias_side_a")


def build(studio: Studio, demo: gr.Blocks) -> tuple[gr.Tab, gr.Timer]:
    # Loaded only when the tab is opened, and refreshed only while it is open: an expert
    # judging a battle in another tab receives no version names at all until they look here.
    on = handler(studio)
    with gr.Tab("Leaderboard", id="leaderboard") as tab:
        with gr.Row():
            campaign = gr.Dropdown(
                label="Battle campaign (empty: all)", choices=[], scale=3, allow_custom_value=True
            )
            style = gr.Checkbox(label="Control for answer length", value=False, scale=1)
            refresh = gr.Button("Refresh", scale=1)
        summary = gr.Markdown(elem_id="leaderboard-summary")
        plot = gr.HTML(elem_id="leaderboard-plot")
        ratings = table(None, RATING_COLUMNS, elem_id="leaderboard-table")
        with gr.Accordion("Win rates, battle counts, criteria (and experts, for admins)", open=False):
            win_rate = table("Win rate of row over column (ties half)", ["version"])
            counts = table("Battles between row and column", ["version"])
            criteria = table("Mean score per criterion (1-5)", ["version"])
            experts = table(
                "Experts: agreement with the majority, "
                "position bias (share of decisive votes for side A; 0.5 is none)",
                EXPERT_COLUMNS,
                visible=False,  # shown on load to those who may see quality per person (admins)
            )
        timer = gr.Timer(10.0, active=False)
    outputs = [campaign, summary, plot, ratings, win_rate, counts, criteria, experts]

    def load(user: User, name: str | None, style_on: bool) -> list[Any]:
        spec = svc.LeaderboardSpec(**svc.given(campaign=name or None, style="length" if style_on else None))
        board = svc.leaderboard(studio, user, spec)
        choices = ["", *[c["name"] for c in svc.list_campaigns(studio, user, kind="battle")]]
        note = (
            f"{board['votes']} votes; {board['leaked_battles_excluded']} battles left out because "
            "an answer revealed a model's identity. Ratings: 400 points per factor of ten in odds, "
            "mean 1000; a version outranks another only when its interval is wholly above."
        )
        styled = board.get("style_controlled")
        if style_on and styled:
            note += (
                f" Length-controlled: coefficient {styled['length_coefficient']:+.2f} (above 0: longer "
                "answers win more often, whoever wrote them)."
            )
        if board.get("verdict"):
            note = f"**Verdict:** {text(board['verdict'])}\n\n{note}"
        # per-person quality is the admins' (the service checks it): others see no experts table
        shown = may(user, ["expert_quality"])
        people = svc.expert_quality(studio, user, name or None) if shown else []
        return [
            gr.update(choices=choices),
            note,
            forest_plot(board["rows"]),
            frame(board["rows"], RATING_COLUMNS, others=True),
            matrix(board["win_rate"]),
            matrix(board["battle_count"]),
            matrix(board["criteria"], by="columns"),  # criterion -> version -> mean score
            gr.update(value=frame(people, EXPERT_COLUMNS, others=True), visible=shown),
        ]

    def opened(user: User, name: str | None, style_on: bool) -> list[Any]:
        return [*load(user, name, style_on), gr.Timer(active=True)]

    refresh.click(on(load), [campaign, style], outputs, api_name="leaderboard")
    for source, event in ((campaign, "campaign"), (style, "style")):
        source.change(
            on(load), [campaign, style], outputs, api_name=f"leaderboard_{event}", api_visibility="private"
        )
    timer.tick(on(load), [campaign, style], outputs, api_name="leaderboard_tick", api_visibility="private")
    tab.select(
        on(opened),
        [campaign, style],
        [*outputs, timer],
        api_name="leaderboard_open",
        api_visibility="private",
    )
    return tab, timer
