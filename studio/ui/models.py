"""The Models tab: registered versions, where the aliases point, lineage, promote and roll back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gradio as gr

from studio import services as svc
from studio.ui.common import frame, handler, info, table, text
from studio.users import User

if TYPE_CHECKING:
    from studio.runtime import Studio

SHOWN_TO = ("promote",)
COLUMNS = ("name", "kind", "source", "parent", "content_hash", "created_at", "path")


def lineage_markdown(chain: list[dict[str, Any]]) -> str:
    lines = []
    for step in chain:
        line = f"- **{text(step['version'])}** ({text(step['kind'])})"
        if step.get("run"):
            metrics = ", ".join(
                f"{text(k)} {v:.3g}" for k, v in step["metrics"].items() if isinstance(v, int | float)
            )
            line += (
                f" ← run `{step['run']}` [{text(step['stage'])}] ← snapshot `{step['snapshot']}` "
                f"({step['judgments']} judgments, hash {step['snapshot_hash'][:12]})"
            )
            if metrics:
                line += f"<br>{metrics}"
        lines.append(line)
    return "\n".join(lines)


def build(studio: Studio, demo: gr.Blocks) -> gr.Tab:
    on = handler(studio)
    with gr.Tab("Models", id="models") as tab:
        versions = table(None, COLUMNS, elem_id="models-table")
        aliases = gr.Markdown(elem_id="models-aliases")
        refresh = gr.Button("Refresh")
        with gr.Row():
            pick = gr.Dropdown(label="Version", choices=[], allow_custom_value=True, scale=3)
            promote = gr.Button("Promote to policy", scale=1)
            rollback = gr.Button("Roll back policy to its parent", scale=1)
        lineage = gr.Markdown(elem_id="lineage")
    outputs = [versions, aliases, pick]

    def load(user: User) -> list[Any]:
        listed = svc.list_models(studio, user)  # times come as text: the API's JSON carries them
        names = ", ".join(f"`{text(a)}` → `{text(v)}`" for a, v in listed["aliases"].items())
        return [
            frame(listed["models"], COLUMNS),
            f"Aliases: {names or 'none'}",
            gr.update(choices=[m["name"] for m in listed["models"]]),
        ]

    def show_lineage(user: User, name: str | None) -> str:
        return lineage_markdown(svc.lineage(studio, user, name)) if name else ""

    def moved(user: User, version: str) -> list[Any]:
        info(f"policy now points at {version}")
        return [*load(user), show_lineage(user, version)]

    def promote_picked(user: User, name: str | None) -> list[Any]:
        return moved(user, svc.promote(studio, user, name or "")["version"])

    def roll_back(user: User) -> list[Any]:
        return moved(user, svc.rollback(studio, user)["version"])

    refresh.click(on(load), None, outputs, api_name="models")
    tab.select(on(load), None, outputs, api_name="models_open", api_visibility="private")
    pick.change(on(show_lineage), pick, lineage, api_name="model_lineage")
    promote.click(on(promote_picked), pick, [*outputs, lineage], api_name="promote")
    rollback.click(on(roll_back), None, [*outputs, lineage], api_name="rollback")
    return tab
