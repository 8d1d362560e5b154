"""The Side by side tab: blind battles between two model versions (experts and admins)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import gradio as gr

from studio import services as svc
from studio.ui.common import campaign_dropdown, campaign_picker, handler, nothing, text
from studio.ui.label import cut_note, prompt_markdown
from studio.users import User

if TYPE_CHECKING:
    from studio.runtime import Studio

SHOWN_TO = ("next_battle",)
VOTES = (
    ("a", "A is better", "primary"),
    ("b", "B is better", "primary"),
    ("tie", "Tie", "secondary"),
    ("both_bad", "Both are bad", "secondary"),
)


def answer_markdown(battle: dict[str, Any], side: str) -> str:
    # The cut mark comes from the finish reason, which both sides share as a campaign setting
    # (max_tokens): it says nothing about which version wrote the answer.
    note = cut_note(battle.get(f"{side}_finish_reason")).removeprefix(" · ")
    return f"{note}\n\n{battle[side]}" if note else battle[side]


def build(studio: Studio, demo: gr.Blocks) -> gr.Tab:
    on = handler(studio)
    with gr.Tab("Side by side", id="sxs") as tab:
        state = gr.State({})
        with gr.Row():
            campaign = campaign_dropdown("Battle campaign", "sxs-campaign", scale=3)
            next_btn = gr.Button("Next battle", elem_id="sxs-next", scale=1)
        status = gr.Markdown(
            "Pick a campaign. The two answers come from two model versions; "
            "which is which is shown only after your vote.",
            elem_id="sxs-status",
        )
        prompt = gr.Markdown(elem_id="sxs-prompt")
        with gr.Row(equal_height=True):
            with gr.Column():
                gr.Markdown("### A")
                answer_a = gr.Markdown(elem_id="sxs-a", sanitize_html=True)
            with gr.Column():
                gr.Markdown("### B")
                answer_b = gr.Markdown(elem_id="sxs-b", sanitize_html=True)
        rationale = gr.Textbox(label="Rationale (optional)", lines=2, elem_id="sxs-rationale")
        with gr.Row():
            buttons = {w: gr.Button(label, elem_id=f"sxs-vote-{w}", variant=v) for w, label, v in VOTES}
        regen = gr.Button("Regenerate both answers", size="sm", elem_id="sxs-regenerate")
    outputs = [state, status, prompt, answer_a, answer_b, rationale]

    def show(user: User, name: str, note: str = "") -> list[Any]:
        """The user's next battle in the campaign, after `note` (the last vote's reveal)."""
        try:
            battle = svc.next_battle(studio, user, name)["battle"]
        except ValueError as exc:  # e.g. the campaign closed with this vote: say so beside the reveal
            if not note:
                raise
            return [{}, f"{note}{text(exc)}", "", "", "", ""]
        if battle is None:
            wait = "No battle ready yet: the models are answering. Press Next battle again in a moment."
            return [{}, f"{note}{wait}", "", "", "", ""]
        # The payload holds the opaque id and the texts only: blind until the vote.
        return [
            {"battle_id": battle["battle_id"], "campaign": name, "shown_at": time.time()},
            f"{note}Which answer is better?",
            prompt_markdown(battle["prompt"]),
            answer_markdown(battle, "a"),
            answer_markdown(battle, "b"),
            "",
        ]

    def load_campaigns(user: User) -> Any:
        return campaign_picker(studio, user, "battle")

    def next_battle(user: User, name: str | None) -> list[Any]:
        return show(user, name or "")

    def on_pick(user: User, name: str | None) -> list[Any]:
        return show(user, name) if name else nothing(outputs)

    def make_vote(winner: str) -> Any:
        def vote(user: User, current: dict[str, Any], why: str | None) -> list[Any]:
            shown_at = current.get("shown_at")
            spec = svc.VoteSpec(
                battle_id=current.get("battle_id") or "",
                winner=winner,
                rationale=why,
                duration_ms=(time.time() - shown_at) * 1000.0 if shown_at else None,
            )
            reveal = svc.vote(studio, user, spec)["reveal"]
            note = (
                f"Your vote: **{winner.replace('_', ' ')}**. A was **{text(reveal['a'])}**, "
                f"B was **{text(reveal['b'])}**.\n\n"
            )
            return show(user, current["campaign"], note)

        vote.__name__ = f"vote_{winner}"
        return vote

    def regenerate(user: User, current: dict[str, Any]) -> list[Any]:
        svc.regenerate(studio, user, current.get("battle_id") or "")
        return show(user, current["campaign"], "Both answers were dropped. ")

    demo.load(on(load_campaigns), None, campaign, api_name="sxs_campaigns", api_visibility="private")
    next_btn.click(on(next_battle), [campaign], outputs, api_name="sxs_next")
    campaign.change(on(on_pick), [campaign], outputs, api_name="sxs_pick", api_visibility="private")
    regen.click(on(regenerate), [state], outputs, api_name="sxs_regenerate")
    for winner, button in buttons.items():
        button.click(on(make_vote(winner)), [state, rationale], outputs, api_name=f"sxs_vote_{winner}")
    return tab
