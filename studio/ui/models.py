"""The Models tab: versions, aliases, and a version card (metrics against the parent with their
intervals, the blind re-battle, the gate's decision and reasons, promotions, lineage); evaluate,
promote (the gate's refusal can be overridden by a ticked confirmation, recorded) and roll back."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import gradio as gr

from studio import services as svc
from studio.ui.common import frame, handler, info, interval_plot, table, text
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


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def card_html(card: dict[str, Any]) -> str:
    """A `services.model_card` answer as HTML: every string escaped (names and reasons are text)."""
    parent = card["parent"]
    out = [f"<h3>{_e(card['version'])}</h3>"]
    facts = f"{_e(card['kind'])}, parent {_e(parent or '-')}"
    if card["aliases"]:
        facts += f" · aliases: {_e(', '.join(card['aliases']))}"
    out.append(f"<p>{facts}</p>")
    if parent is None:
        out.append("<p>The reference version (no parent): nothing to compare it with or gate.</p>")
    evaluation = card["evaluation"]
    out.append("<h4>Evaluation against the parent</h4>")
    if evaluation is None:
        out.append("<p>None yet: press <b>Evaluate against its parent</b>.</p>" if parent else "")
    else:
        line = f"{_e(evaluation['id'])}: {_e(evaluation['status'])}"
        if evaluation.get("limit"):
            line += f" (first {_e(evaluation['limit'])} items per suite: a quick look, not gate evidence)"
        if evaluation.get("error"):
            line += f" · {_e(evaluation['error'])}"
        out.append(f"<p>{line}</p>")
    if card["metrics"]:
        rows = [
            [
                m["metric"],
                f"{m['against']:.3f}",
                f"{m['version']:.3f}",
                f"{m['delta']:+.3f}",
                f"[{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]",
            ]
            for m in card["metrics"]
        ]
        out.append(_table(["metric", f"parent {parent}", "this version", "change", "95% interval"], rows))
        out.append(
            interval_plot(
                [
                    {"label": m["metric"], "value": m["delta"], "lower": m["ci"][0], "upper": m["ci"][1]}
                    for m in card["metrics"]
                ],
                label="change of each metric against the parent, with 95% paired-bootstrap intervals",
            )
        )
    battle = card["rebattle"]
    out.append("<h4>Blind re-battle</h4>")
    if battle is None:
        out.append("<p>None against the parent.</p>" if parent else "")
    else:
        line = f"campaign {_e(battle['campaign'])} ({_e(battle['status'])}, "
        line += f"prompts {_e(battle['prompt_set'])}): {_e(battle['votes'])} of {_e(battle['budget'])} votes"
        if battle.get("win_rate") is not None:
            lo, hi = battle["interval"]
            line += (
                f", {_e(battle['wins'])} wins, {_e(battle['losses'])} losses, {_e(battle['ties'])} ties; "
                f"wins {battle['win_rate']:.2f} of decisive votes, {1 - battle['alpha']:.0%} confidence "
                f"sequence [{lo:.2f}, {hi:.2f}]"
            )
        out.append(f"<p>{line}</p>")
        if battle.get("win_rate") is not None:
            out.append(
                interval_plot(
                    [{"label": "P(wins)", "value": battle["win_rate"], "lower": lo, "upper": hi}],
                    reference=0.5,
                    domain=(0.0, 1.0),
                    label="share of decisive votes won, with its confidence sequence",
                    fmt="{:.2f}",
                )
            )
        out.append(f"<p>Verdict: {_e(battle['verdict'] or 'not yet')}</p>")
    gate = card["gate"]
    if not gate.get("root"):
        state = "passes" if gate["passed"] else "does not pass"
        waiting = "" if gate["ready"] else " (waiting for the evaluation or the re-battle's verdict)"
        out.append(f"<h4>Gate: {state}{waiting}</h4>")
        if gate["reasons"]:
            out.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in gate["reasons"]) + "</ul>")
    out.append("<h4>Promotions</h4>")
    if card["promotions"]:
        rows = [
            [
                str(p["decided_at"])[:19],
                p["action"],
                p["alias"],
                p["version"],
                p["from_version"] or "",
                p["decided_by"] + (" (forced)" if p["forced"] else ""),
                "; ".join(p["reasons"]),
            ]
            for p in card["promotions"]
        ]
        out.append(_table(["when", "action", "alias", "version", "from", "by", "reasons"], rows))
    else:
        out.append("<p>No decision yet.</p>")
    return "".join(out)


def build(studio: Studio, demo: gr.Blocks) -> gr.Tab:
    on = handler(studio)
    with gr.Tab("Models", id="models") as tab:
        versions = table(None, COLUMNS, elem_id="models-table")
        aliases = gr.Markdown(elem_id="models-aliases")
        refresh = gr.Button("Refresh")
        with gr.Row():
            pick = gr.Dropdown(label="Version", choices=[], allow_custom_value=True, scale=3)
            evaluate = gr.Button("Evaluate against its parent", scale=1, elem_id="model-evaluate")
        with gr.Row():
            force = gr.Checkbox(
                label="Promote although the gate did not pass (recorded with your name)",
                value=svc.PromoteSpec.force,
                elem_id="promote-force",
                scale=2,
            )
            promote = gr.Button("Promote to policy", scale=1, elem_id="model-promote")
            rollback = gr.Button("Roll back policy to its parent", scale=1)
        card = gr.HTML(elem_id="model-card")
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

    def show_card(user: User, name: str | None) -> list[str]:
        if not name:
            return ["", ""]
        found = svc.model_card(studio, user, name)
        return [card_html(found), lineage_markdown(found["lineage"])]

    def evaluate_picked(user: User, name: str | None) -> list[str]:
        record = svc.start_eval(studio, user, svc.EvalSpec(version=name or ""))
        info(f"evaluation {record['id']} of {record['version']} against {record['against']} queued")
        return show_card(user, name)

    def moved(user: User, version: str) -> list[Any]:
        info(f"policy now points at {version}")
        return [*load(user), *show_card(user, version)]

    def promote_picked(user: User, name: str | None, forced: bool) -> list[Any]:
        done = svc.promote(studio, user, name or "", svc.PromoteSpec(force=bool(forced)))
        return moved(user, done["version"])

    def roll_back(user: User) -> list[Any]:
        return moved(user, svc.rollback(studio, user)["version"])

    refresh.click(on(load), None, outputs, api_name="models")
    tab.select(on(load), None, outputs, api_name="models_open", api_visibility="private")
    pick.change(on(show_card), pick, [card, lineage], api_name="model_card")
    evaluate.click(on(evaluate_picked), pick, [card, lineage], api_name="model_evaluate")
    promote.click(on(promote_picked), [pick, force], [*outputs, card, lineage], api_name="promote")
    rollback.click(on(roll_back), None, [*outputs, card, lineage], api_name="rollback")
    return tab
