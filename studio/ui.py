"""The Gradio studio mounted at /. One function per tab.

Every event handler takes the `gr.Request` and checks the user's role on the
server first (`_user`): hiding a tab or Gradio's API page is not a check.
"""

from __future__ import annotations

import html
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from studio import arena, jobs, labeling, quality, training, users
from studio import campaigns as camp
from studio.export import FORMATS, KINDS, write_export
from studio.importer import PromptFileError, normalize_messages, read_prompts
from studio.runtime import Studio
from studio.services import CampaignSpec, parse_overrides
from studio.serving.client import BackendError, SamplingParams
from studio.store import StoreError
from studio.users import AuthError, User

MAX_SLOTS = 8  # completions per labeling task (campaigns allow n <= 8)
USER_ERRORS = (AuthError, StoreError, PromptFileError, BackendError, ValueError)
STRENGTH_CHOICES = [("slight", 1), ("clear", 2), ("strong", 3)]
FLAG_CHOICES = [
    ("unsafe", "unsafe"),
    ("hallucination", "hallucination"),
    ("unhelpful refusal", "unhelpful_refusal"),
    ("identity leak", "identity_leak"),
    ("other", "other"),
]

# Keyboard shortcuts (ignored while typing in a text field):
# 1-8 pick the best answer (quick mode), Ctrl/Cmd+Enter submits, s skips, n asks for the next task.
SHORTCUTS = """
<script>
document.addEventListener("keydown", (e) => {
  const t = e.target;
  const typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type === "text"));
  const click = (id) => {
    const b = document.querySelector(`#${id}`);
    if (b) { b.click(); e.preventDefault(); }
  };

  if ((e.ctrlKey || e.metaKey) && e.key === "Enter") return click("label-submit");
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "s") return click("label-skip");
  if (e.key === "n") return click("label-next");
  if (/^[1-8]$/.test(e.key)) {
    const opts = document.querySelectorAll("#label-best input[type=radio]");
    const o = opts[Number(e.key) - 1]; if (o) { o.click(); e.preventDefault(); }
  }
});
</script>
"""


def _session_user(studio: Studio, request: gr.Request | None) -> User | None:
    """Who is logged in on this Gradio session, or None."""
    name = getattr(request, "username", None) if request is not None else None
    return users.get_user(studio.store, name) if name else None


def _user(studio: Studio, request: gr.Request | None, capability: str) -> User:
    """The logged-in user, checked for `capability`; raises gr.Error otherwise."""
    user = _session_user(studio, request)
    if user is None:
        raise gr.Error("not logged in: open /login")
    try:
        return user.require(capability)
    except AuthError as exc:
        raise gr.Error(str(exc)) from None


def _fail(exc: Exception) -> gr.Error:
    return gr.Error(str(exc))


def _campaign_picker(studio: Studio, kind: str) -> Any:
    """The active campaigns of a kind for a dropdown, preselected when there is only one."""
    names = [c["name"] for c in camp.list_campaigns(studio.store, kind=kind) if c["status"] == "active"]
    return gr.update(choices=names, value=names[0] if len(names) == 1 else None)


# -- Label ---------------------------------------------------------------------------
def _label_tab(studio: Studio, demo: gr.Blocks) -> None:
    with gr.Tab("Label", id="label"):
        state = gr.State({})
        with gr.Row():
            # custom values let API clients name a campaign; the handler checks it exists
            campaign = gr.Dropdown(
                label="Campaign", choices=[], scale=3, elem_id="label-campaign", allow_custom_value=True
            )
            next_btn = gr.Button("Next task (n)", elem_id="label-next", scale=1)
        status = gr.Markdown("Pick a campaign and press **Next task**.", elem_id="label-status")
        with gr.Accordion("Guidelines", open=False):
            guidelines = gr.Markdown()
        prompt = gr.Markdown(elem_id="label-prompt")
        slots = []
        for i in range(MAX_SLOTS):
            with gr.Group(visible=False) as group:
                text = gr.Markdown(elem_id=f"label-completion-{i}", sanitize_html=True)
                with gr.Row():
                    rank = gr.Dropdown(
                        label=f"Rank of answer {i + 1} (1 = best; equal = tie)",
                        choices=[],
                        elem_id=f"label-rank-{i}",
                        scale=1,
                    )
                    flags = gr.CheckboxGroup(FLAG_CHOICES, label="Flags", elem_id=f"label-flags-{i}", scale=3)
            slots.append((group, text, rank, flags))
        with gr.Row():
            best = gr.Radio(label="Quick mode: best (keys 1-8)", choices=[], elem_id="label-best")
            worst = gr.Radio(label="Quick mode: worst", choices=[], elem_id="label-worst")
        with gr.Row():
            all_bad = gr.Checkbox(label="All answers are bad", elem_id="label-all-bad")
            strength = gr.Radio(
                STRENGTH_CHOICES, label="How strong is the preference?", elem_id="label-strength"
            )
        rationale = gr.Textbox(label="Rationale (optional)", lines=2, elem_id="label-rationale")
        ideal = gr.Textbox(
            label="Ideal answer (optional): edit the best answer into an ideal one",
            lines=4,
            elem_id="label-ideal",
        )
        with gr.Row():
            submit_btn = gr.Button("Submit (Ctrl+Enter)", variant="primary", elem_id="label-submit")
            skip_btn = gr.Button("Skip (s)", elem_id="label-skip")
        timer = gr.Timer(2.0, active=False)

        task_outputs: list[Any] = [
            state,
            status,
            guidelines,
            prompt,
            best,
            worst,
            all_bad,
            strength,
            rationale,
            ideal,
            timer,
        ]
        for group, text, rank, flags in slots:
            task_outputs += [group, text, rank, flags]

        def render(task: dict[str, Any] | None, progress: dict[str, Any]) -> list[Any]:
            done = f"{progress.get('done', 0)} done, {progress.get('remaining', 0)} remaining"
            if task is None:
                waiting = progress.get("remaining", 0) > 0
                note = (
                    f"Preparing tasks: the model is sampling answers ({progress.get('ready', 0)} "
                    f"ready). This page updates by itself. ({done})"
                    if waiting
                    else f"No tasks left for you in this campaign. Thank you! ({done})"
                )
                out = [
                    {},
                    note,
                    gr.update(),
                    "",
                    gr.update(choices=[], value=None),
                    gr.update(choices=[], value=None),
                    False,
                    None,
                    "",
                    "",
                    gr.Timer(active=waiting),
                ]
                for _ in slots:
                    out += [gr.Group(visible=False), "", gr.update(choices=[], value=None), []]
                return out
            n = len(task["completions"])
            positions = [(f"Answer {i + 1}", i) for i in range(n)]
            prompt_md = "\n\n".join(f"**{m['role']}**: {m['content']}" for m in task["prompt"])
            out = [
                {
                    "assignment_id": task["assignment_id"],
                    "campaign": task["campaign"],
                    "n": n,
                    "shown_at": time.time(),
                },
                f"Task ready. ({done})",
                task["guidelines"] or "_No guidelines yet._",
                prompt_md,
                gr.update(choices=positions, value=None),
                gr.update(choices=positions, value=None),
                False,
                None,
                "",
                "",
                gr.Timer(active=False),
            ]
            for i, _ in enumerate(slots):
                if i < n:
                    out += [
                        gr.Group(visible=True),
                        f"**Answer {i + 1}**\n\n{task['completions'][i]['text']}",
                        gr.update(choices=list(range(1, n + 1)), value=None),
                        [],
                    ]
                else:
                    out += [gr.Group(visible=False), "", gr.update(choices=[], value=None), []]
            return out

        def load_campaigns(request: gr.Request) -> Any:
            _user(studio, request, "label")
            return _campaign_picker(studio, "label")

        def next_task(campaign_name: str | None, request: gr.Request) -> list[Any]:
            user = _user(studio, request, "label")
            if not campaign_name:
                raise gr.Error("pick a campaign first")
            try:
                task = labeling.next_task(studio.store, campaign_name, user.name)
                progress = labeling.progress(studio.store, campaign_name, user.name)
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            if task is None and studio.task_sampler and progress["remaining"]:
                studio.task_sampler.poke(campaign_name, starved=True)
            return render(task, progress)

        def poll(campaign_name: str | None, current: dict[str, Any], request: gr.Request) -> list[Any]:
            if current.get("assignment_id") or not campaign_name:
                return [gr.update() for _ in task_outputs]
            return next_task(campaign_name, request)

        def submit(values: dict[Any, Any], request: gr.Request) -> list[Any]:
            # a set of inputs arrives as {component: value}: the slots vary in number
            current = values[state]
            best_pos, worst_pos, bad = values[best], values[worst], values[all_bad]
            strength_v, why, ideal_text = values[strength], values[rationale], values[ideal]
            slot_values = [values[c] for c in slot_inputs]
            user = _user(studio, request, "label")
            if not current.get("assignment_id"):
                raise gr.Error("no task on screen: press Next task")
            n = current["n"]
            ranks_raw = [slot_values[2 * i] for i in range(n)]
            flags = {i: slot_values[2 * i + 1] or [] for i in range(n)}
            ranks = None
            if all(r not in (None, "") for r in ranks_raw):
                ranks = [int(r) for r in ranks_raw]
            elif any(r not in (None, "") for r in ranks_raw):
                raise gr.Error("rank every answer, or clear the ranks and use quick best/worst")
            sub = labeling.Submission(
                assignment_id=current["assignment_id"],
                ranks=ranks,
                best=best_pos,
                worst=worst_pos,
                all_bad=bool(bad),
                strength=strength_v,
                flags=flags,
                rationale=why,
                edited_text=ideal_text,
                idempotency_key=current["assignment_id"],
            )
            try:
                labeling.submit(studio.store, user.name, sub, shown_at=current.get("shown_at"))
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            if studio.task_sampler:
                studio.task_sampler.poke()
            gr.Info("Saved.")
            return next_task(current["campaign"], request)

        def skip(current: dict[str, Any], request: gr.Request) -> list[Any]:
            user = _user(studio, request, "label")
            if not current.get("assignment_id"):
                raise gr.Error("no task on screen")
            try:
                labeling.skip(studio.store, user.name, current["assignment_id"])
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            return next_task(current["campaign"], request)

        slot_inputs = [c for _, _, rank, flags in slots for c in (rank, flags)]
        demo.load(load_campaigns, None, campaign, api_name="label_campaigns")
        next_btn.click(next_task, [campaign], task_outputs, api_name="label_next", concurrency_limit=None)

        def on_pick(name: str | None, request: gr.Request) -> list[Any]:
            # clearing the dropdown (or the page load) is not an error: leave the screen as it is
            return next_task(name, request) if name else [gr.update() for _ in task_outputs]

        campaign.change(on_pick, [campaign], task_outputs, api_visibility="private")
        timer.tick(poll, [campaign, state], task_outputs, api_visibility="private")
        submit_btn.click(
            submit,
            {state, best, worst, all_bad, strength, rationale, ideal, *slot_inputs},
            task_outputs,
            api_name="label_submit",
            concurrency_limit=None,
        )
        skip_btn.click(skip, [state], task_outputs, api_name="label_skip", concurrency_limit=None)


# -- Side by side ----------------------------------------------------------------------------
def _sxs_tab(studio: Studio, demo: gr.Blocks) -> None:
    with gr.Tab("Side by side", id="sxs"):
        state = gr.State({})
        with gr.Row():
            campaign = gr.Dropdown(
                label="Battle campaign", choices=[], scale=3, elem_id="sxs-campaign", allow_custom_value=True
            )
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
            buttons = {
                w: gr.Button(label, elem_id=f"sxs-vote-{w}", variant=v)
                for w, label, v in (
                    ("a", "A is better", "primary"),
                    ("b", "B is better", "primary"),
                    ("tie", "Tie", "secondary"),
                    ("both_bad", "Both are bad", "secondary"),
                )
            }
        regen = gr.Button("Regenerate both answers", size="sm", elem_id="sxs-regenerate")
        outputs = [state, status, prompt, answer_a, answer_b, rationale]

        def show(name: str | None, user_name: str, note: str = "") -> list[Any]:
            try:
                battle = arena.next_battle(studio.store, name, user_name)
            except USER_ERRORS as exc:
                return [{}, f"{note}{exc}", "", "", "", ""]
            if battle is None:
                if studio.task_sampler:
                    studio.task_sampler.poke(name, starved=True)
                return [
                    {},
                    f"{note}No battle ready yet: the models are answering. Press Next battle "
                    "again in a moment.",
                    "",
                    "",
                    "",
                    "",
                ]
            prompt_md = "\n\n".join(f"**{m['role']}**: {m['content']}" for m in battle["prompt"])
            # The payload holds the opaque id and the texts only: blind until the vote.
            return [
                {"battle_id": battle["battle_id"], "campaign": name, "shown_at": time.time()},
                f"{note}Which answer is better?",
                prompt_md,
                battle["a"],
                battle["b"],
                "",
            ]

        def load_campaigns(request: gr.Request) -> Any:
            user = _session_user(studio, request)
            if user is None or not user.can("battle"):
                return gr.update(choices=[])  # page load for non-experts: no error, no campaigns
            return _campaign_picker(studio, "battle")

        def next_battle(name: str | None, request: gr.Request) -> list[Any]:
            user = _user(studio, request, "battle")
            if not name:
                raise gr.Error("pick a battle campaign first")
            return show(name, user.name)

        def make_vote(winner: str) -> Any:
            def cast(current: dict[str, Any], why: str, request: gr.Request) -> list[Any]:
                user = _user(studio, request, "battle")
                if not current.get("battle_id"):
                    raise gr.Error("no battle on screen: press Next battle")
                try:
                    reveal = arena.vote(
                        studio.store,
                        user.name,
                        current["battle_id"],
                        winner,
                        rationale=why,
                        duration_ms=(time.time() - current["shown_at"]) * 1000.0,
                    )
                except USER_ERRORS as exc:
                    raise _fail(exc) from None
                if studio.task_sampler:
                    studio.task_sampler.poke()
                note = (
                    f"Your vote: **{winner.replace('_', ' ')}**. A was **{reveal['a']}**, "
                    f"B was **{reveal['b']}**.\n\n"
                )
                return show(current["campaign"], user.name, note)

            return cast

        demo.load(load_campaigns, None, campaign, api_visibility="private")
        next_btn.click(next_battle, [campaign], outputs, api_name="sxs_next")

        def on_pick(name: str | None, request: gr.Request) -> list[Any]:
            return next_battle(name, request) if name else [gr.update() for _ in outputs]

        campaign.change(on_pick, [campaign], outputs, api_visibility="private")

        def regenerate(current: dict[str, Any], request: gr.Request) -> list[Any]:
            user = _user(studio, request, "battle")
            if not current.get("battle_id"):
                raise gr.Error("no battle on screen")
            try:
                arena.regenerate(studio.store, user.name, current["battle_id"])
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            if studio.task_sampler:
                studio.task_sampler.poke(current["campaign"], starved=True)
            return show(current["campaign"], user.name, "Both answers were dropped. ")

        regen.click(regenerate, [state], outputs, api_name="sxs_regenerate")
        for winner, button in buttons.items():
            button.click(make_vote(winner), [state, rationale], outputs, api_name=f"sxs_vote_{winner}")


def forest_plot(rows: list[dict[str, Any]]) -> str:
    """Ratings with their intervals as an inline SVG (no plotting library needed)."""
    if not rows:
        return "<p>No votes yet.</p>"
    lo = min(r["lower"] for r in rows) - 20
    hi = max(r["upper"] for r in rows) + 20
    width, left, right, row_h = 700, 180, 70, 26  # the right margin holds the rating labels

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (width - left - right - 10)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row_h * len(rows) + 30}" '
        'font-family="sans-serif" font-size="12" role="img" aria-label="ratings with 95% intervals">'
    ]
    for i, r in enumerate(rows):
        y = 20 + i * row_h
        name = html.escape(r["version"])
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{name}</text>')
        parts.append(
            f'<line x1="{x(r["lower"]):.1f}" x2="{x(r["upper"]):.1f}" y1="{y}" y2="{y}" '
            'stroke="#888" stroke-width="3"/>'
        )
        parts.append(f'<circle cx="{x(r["rating"]):.1f}" cy="{y}" r="5" fill="#e8590c"/>')
        parts.append(f'<text x="{width - right + 8}" y="{y + 4}">{r["rating"]:.0f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _leaderboard_tab(studio: Studio, demo: gr.Blocks) -> gr.Timer:
    # Loaded only when the tab is opened, and refreshed only while it is open: an expert
    # judging a battle in another tab receives no version names at all until they look here.
    with gr.Tab("Leaderboard", id="leaderboard") as tab:
        with gr.Row():
            campaign = gr.Dropdown(
                label="Battle campaign (empty: all)", choices=[], scale=3, allow_custom_value=True
            )
            style = gr.Checkbox(label="Control for answer length", value=False, scale=1)
            refresh = gr.Button("Refresh", scale=1)
        summary = gr.Markdown(elem_id="leaderboard-summary")
        plot = gr.HTML(elem_id="leaderboard-plot")
        table = gr.Dataframe(interactive=False, elem_id="leaderboard-table")
        with gr.Accordion("Win rates, battle counts, criteria and experts", open=False):
            win_rate = gr.Dataframe(interactive=False, label="Win rate of row over column (ties half)")
            counts = gr.Dataframe(interactive=False, label="Battles between row and column")
            criteria = gr.Dataframe(interactive=False, label="Mean score per criterion (1-5)")
            experts = gr.Dataframe(
                interactive=False,
                label="Experts: agreement with the majority, "
                "position bias (share of decisive votes for side A; 0.5 is none)",
            )
        timer = gr.Timer(10.0, active=False)

        def load(name: str | None, style_on: bool, request: gr.Request) -> list[Any]:
            _user(studio, request, "view")
            choices = ["", *[c["name"] for c in camp.list_campaigns(studio.store, kind="battle")]]
            try:
                board = arena.campaign_leaderboard(studio.store, name or None, style_control=bool(style_on))
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            rows = (
                board["style_controlled"]["leaderboard"]
                if style_on and board.get("style_controlled")
                else board["leaderboard"]
            )
            text = (
                f"{board['votes']} votes; {board['leaked_battles_excluded']} battles left out because "
                "an answer revealed a model's identity. Ratings: 400 points per factor of ten in odds, "
                "mean 1000; a version outranks another only when its interval is wholly above."
            )
            if style_on and board.get("style_controlled"):
                text += (
                    " Length-controlled: coefficient "
                    f"{board['style_controlled']['length_coefficient']:+.2f} (above 0: longer answers "
                    "win more often, whoever wrote them)."
                )
            if name:
                verdict = arena.battle_campaign(studio.store, name).get("verdict")
                if verdict:
                    text = f"**Verdict:** {verdict}\n\n{text}"
            frame = pd.DataFrame.from_dict
            return [
                gr.update(choices=choices),
                text,
                forest_plot(rows),
                pd.DataFrame(rows),
                frame(board["win_rate"], orient="index").reset_index(names="version")
                if board["win_rate"]
                else pd.DataFrame(),
                frame(board["battle_count"], orient="index").reset_index(names="version")
                if board["battle_count"]
                else pd.DataFrame(),
                frame(board["criteria"]).reset_index(names="version")
                if board["criteria"]
                else pd.DataFrame(),
                pd.DataFrame(arena.expert_quality(studio.store, name or None)),
            ]

        outputs = [campaign, summary, plot, table, win_rate, counts, criteria, experts]
        refresh.click(load, [campaign, style], outputs, api_name="leaderboard")
        campaign.change(load, [campaign, style], outputs, api_visibility="private")
        style.change(load, [campaign, style], outputs, api_visibility="private")
        timer.tick(load, [campaign, style], outputs, api_visibility="private")

        def opened(name: str | None, style_on: bool, request: gr.Request) -> list[Any]:
            return [*load(name, style_on, request), gr.Timer(active=True)]

        tab.select(opened, [campaign, style], [*outputs, timer], api_visibility="private")
    return timer


# -- Playground ----------------------------------------------------------------------------
def _playground_tab(studio: Studio) -> None:
    with gr.Tab("Playground", id="playground"):
        gr.Markdown(
            "Sample completions from the served model (engineers and admins). Every completion is stored."
        )
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Ask the model something")
        with gr.Row():
            n = gr.Slider(1, 8, value=4, step=1, label="Completions (n)")
            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature")
            max_tokens = gr.Slider(8, 512, value=128, step=8, label="Max tokens")
            seed = gr.Number(value=None, label="Seed (optional)", precision=0)
        go = gr.Button("Sample", variant="primary")
        out = gr.Markdown(sanitize_html=True)

        def run(
            text: str, n_: float, temp: float, max_tok: float, seed_: float | None, request: gr.Request
        ) -> str:
            _user(studio, request, "sample")
            assert studio.sampler is not None
            try:
                messages = normalize_messages(text, "Prompt box", "prompt")
                params = SamplingParams(
                    n=int(n_),
                    temperature=float(temp),
                    max_tokens=int(max_tok),
                    seed=None if seed_ is None else int(seed_),
                )
                rows = studio.sampler.sample(messages, params, version=studio.base_version)
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            return "\n\n".join(
                f"**Completion {r['choice_index'] + 1}** · {r['completion_tokens']} tokens · "
                f"{r['finish_reason']} · {r['latency_ms']:.0f} ms\n\n{r['text']}\n\n---"
                for r in rows
            )

        go.click(run, [prompt, n, temperature, max_tokens, seed], out, api_name="sample", concurrency_limit=8)


# -- Models --------------------------------------------------------------------------------
def _lineage_markdown(chain: list[dict[str, Any]]) -> str:
    lines = []
    for step in chain:
        line = f"- **{step['version']}** ({step['kind']})"
        if step.get("run"):
            metrics = ", ".join(
                f"{k} {v:.3g}" for k, v in step["metrics"].items() if isinstance(v, int | float)
            )
            line += (
                f" ← run `{step['run']}` [{step['stage']}] ← snapshot `{step['snapshot']}` "
                f"({step['judgments']} judgments, hash {step['snapshot_hash'][:12]})"
            )
            if metrics:
                line += f"<br>{metrics}"
        lines.append(line)
    return "\n".join(lines)


def _models_tab(studio: Studio, demo: gr.Blocks) -> None:
    with gr.Tab("Models", id="models") as tab:
        table = gr.Dataframe(interactive=False)
        aliases = gr.Markdown()
        refresh = gr.Button("Refresh")
        with gr.Row():
            pick = gr.Dropdown(label="Version", choices=[], allow_custom_value=True, scale=3)
            promote = gr.Button("Promote to policy", scale=1)
            rollback = gr.Button("Roll back policy to its parent", scale=1)
        lineage = gr.Markdown(elem_id="lineage")

        def load(request: gr.Request) -> tuple[pd.DataFrame, str, Any]:
            _user(studio, request, "view")
            cols = ["name", "kind", "source", "parent", "content_hash", "created_at", "path"]
            rows = studio.store.model_versions()
            frame = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)
            names = ", ".join(f"`{a}` → `{v}`" for a, v in camp.aliases(studio.store).items())
            return frame, f"Aliases: {names or 'none'}", gr.update(choices=[r["name"] for r in rows])

        def show_lineage(name: str | None, request: gr.Request) -> str:
            _user(studio, request, "train")
            if not name:
                return ""
            try:
                return _lineage_markdown(training.lineage(studio.store, name))
            except USER_ERRORS as exc:
                raise _fail(exc) from None

        def move_policy(name: str | None, to_parent: bool, request: gr.Request) -> list[Any]:
            _user(studio, request, "train")
            try:
                target = camp.resolve_model(studio.store, camp.POLICY) if to_parent else name
                if not target:
                    raise StoreError("pick a version first")
                version = studio.store.model_version(target)
                if to_parent:
                    if not version["parent"]:
                        raise StoreError(f"policy is at '{target}', which has no parent to roll back to")
                    version = studio.store.model_version(version["parent"])
                camp.set_alias(studio.store, camp.POLICY, version["name"])
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            gr.Info(f"policy now points at {version['name']}")
            return [*load(request), show_lineage(version["name"], request)]

        outputs = [table, aliases, pick]
        refresh.click(load, None, outputs, api_name="models")
        tab.select(load, None, outputs, api_visibility="private")
        pick.change(show_lineage, pick, lineage, api_name="model_lineage")

        def promote_picked(name: str | None, request: gr.Request) -> list[Any]:
            return move_policy(name, False, request)

        def roll_back(name: str | None, request: gr.Request) -> list[Any]:
            return move_policy(name, True, request)

        promote.click(promote_picked, pick, [*outputs, lineage], api_name="promote")
        rollback.click(roll_back, pick, [*outputs, lineage], api_name="rollback")


# -- Train ---------------------------------------------------------------------------------
CURVES = {
    "loss": ("loss",),
    "reward": ("reward", "rewards/margins", "margin"),
    "KL": ("kl", "objective/kl"),
    "accuracy": ("accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
}


def line_plot(title: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """A small inline SVG line chart: one polyline per series, with the y range printed."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    width, height, pad = 320, 150, 28
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    colours = ["#e8590c", "#1c7ed6", "#2f9e44", "#ae3ec9"]

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / (x1 - x0) * (width - 2 * pad)
        py = height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad}" y="14" font-weight="bold">{html.escape(title)}</text>',
        f'<text x="{width - pad}" y="14" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{width - pad}" y="{height - pad + 12}" text-anchor="end">'
        f"{y0:.3g} (steps {x0:.0f}-{x1:.0f})</text>",
    ]
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        path = " ".join(at(x, y) for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(f'<text x="{pad + 90 * i}" y="{height - 2}" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def run_curves(events: list[dict[str, Any]]) -> str:
    charts = []
    for title, keys in CURVES.items():
        series: dict[str, list[tuple[float, float]]] = {}
        for e in events:
            if e["event"] != "step":
                continue
            for key in keys:
                if isinstance(e.get(key), int | float):
                    series.setdefault(f"{e['stage']} {key}", []).append((e["step"], e[key]))
        charts.append(line_plot(title, series))
    return "".join(c for c in charts if c) or "<p>No curves yet.</p>"


def _train_tab(studio: Studio, demo: gr.Blocks) -> gr.Timer:
    with gr.Tab("Train", id="train") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                advice = gr.Markdown(elem_id="advice")
                stage = gr.Dropdown(
                    label="Stage",
                    choices=[
                        ("Reward model", "reward"),
                        ("DPO", "dpo"),
                        ("PPO", "ppo"),
                        ("SFT", "sft"),
                        ("PPO then DPO", "ppo_then_dpo"),
                    ],
                    value="dpo",
                )
                parent = gr.Dropdown(
                    label="Start from (version or alias)",
                    choices=[],
                    value=camp.POLICY,
                    allow_custom_value=True,
                )
                data = gr.Dropdown(label="Labeling campaigns (empty: all)", choices=[], multiselect=True)
                with gr.Row():
                    who = gr.Textbox(label="Annotators (comma-separated; empty: all)")
                    strength = gr.Dropdown(
                        label="Minimum strength",
                        choices=[("any", 0), ("slight", 1), ("clear", 2), ("strong", 3)],
                        value=0,
                    )
                held_out = gr.Slider(0, 0.5, value=0.2, step=0.05, label="Held-out share of prompts")
                recipe = gr.Dropdown(
                    label="Recipe (empty: the stage's own)", choices=[], allow_custom_value=True
                )
                steps = gr.Number(
                    label="Steps (PPO: iterations; 0 = the recipe's)",
                    value=0,
                    precision=0,
                    elem_id="train-steps",
                )
                reward_model = gr.Dropdown(
                    label="PPO reward model (empty: the newest)", choices=[], allow_custom_value=True
                )
                overrides = gr.Textbox(
                    label="Recipe overrides, KEY=VALUE per line", lines=2, placeholder="train.beta=0.2"
                )
                start = gr.Button("Start run", variant="primary", elem_id="start-run")
            with gr.Column(scale=3):
                runs_table = gr.Dataframe(interactive=False, label="Runs, newest first")
                with gr.Row():
                    pick = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, scale=3)
                    cancel = gr.Button("Cancel run", variant="stop", scale=1, elem_id="cancel-run")
                status = gr.Markdown(elem_id="run-status")
                curves = gr.HTML(elem_id="run-curves")
                log = gr.Textbox(label="Log (tail)", lines=10, max_lines=10, autoscroll=True)
        timer = gr.Timer(2.0, active=False)

        def refresh(run_id: str | None, request: gr.Request) -> list[Any]:
            _user(studio, request, "train")
            runs = training.list_runs(studio.store)
            frame = pd.DataFrame(
                [
                    {
                        "id": r["id"],
                        "stages": "+".join(r["stages"]),
                        "status": r["status"],
                        "parent": r["parent"],
                        "versions": ", ".join(r["versions"] or []),
                        "by": r["created_by"],
                        "created": str(r["created_at"])[:19],
                    }
                    for r in runs
                ]
            )
            run_id = run_id or (runs[0]["id"] if runs else None)
            if not run_id:
                return [frame, gr.update(choices=[]), "No runs yet.", "", ""]
            try:
                run = training.get_run(studio.store, run_id)
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            out = Path(run["output_dir"])
            events = jobs.read_metrics(out)  # read once: progress and curves both come from it
            info = jobs.progress(run, events)
            text = f"**{run['id']}** · {'+'.join(run['stages'])} · **{run['status']}**"
            if info.get("step"):
                text += f" · {info['stage']} step {info['step']}/{info.get('max_steps') or '?'}"
                text += f" · {info['elapsed_s']:.0f} s"
                if info.get("eta_s") is not None:
                    text += f" · ETA {info['eta_s']:.0f} s"
            if run["reason"]:
                text += f"\n\nReason: {html.escape(run['reason'])}"  # from the trainer's log
            if run["versions"]:
                text += f"\n\nVersions: {', '.join(run['versions'])}"
            if run["rebattle"]:
                text += f" · blind re-battle against the parent: campaign `{run['rebattle']}`"
            return [
                frame,
                gr.update(choices=[r["id"] for r in runs], value=run_id),
                text,
                run_curves(events),
                jobs.tail(out / "run.log", 40),
            ]

        def opened(run_id: str | None, request: gr.Request) -> list[Any]:
            _user(studio, request, "train")
            store = studio.store
            policies = [
                *camp.aliases(store),
                *[v["name"] for v in store.model_versions() if v["kind"] != "reward"],
            ]
            tip = training.advise(store)
            advice_text = f"**Advisor:** {tip['stage'] or 'label first'}: {tip['why']}" if tip else ""
            return [
                advice_text,
                gr.update(choices=policies),
                gr.update(choices=[c["name"] for c in camp.list_campaigns(store, kind="label")]),
                gr.update(choices=["", *training.recipes(studio.settings.data_dir / "recipes")]),
                gr.update(choices=["", *[v["name"] for v in training.reward_models(store)]]),
                *refresh(run_id, request),
                gr.Timer(active=True),
            ]

        def start_run(
            stage_v: str,
            parent_v: str,
            data_v: list[str],
            held: float,
            recipe_v: str | None,
            steps_v: float | None,
            rm: str | None,
            lines: str,
            who_v: str,
            strength_v: int | None,
            request: gr.Request,
        ) -> list[Any]:
            user = _user(studio, request, "train")
            try:
                pairs = parse_overrides((lines or "").splitlines(), where="override")
                run = training.submit_run(
                    studio.store,
                    studio.settings.data_dir,
                    stage=stage_v,
                    created_by=user.name,
                    parent=parent_v or camp.POLICY,
                    campaigns=data_v or None,
                    held_out=held,
                    recipe=recipe_v or None,
                    steps=int(steps_v) if steps_v else None,
                    overrides=pairs,
                    reward_model=rm or None,
                    annotators=[a.strip() for a in (who_v or "").split(",") if a.strip()] or None,
                    min_strength=int(strength_v) if strength_v else None,
                )
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            if studio.runner is not None:
                studio.runner.poke()
            gr.Info(f"run {run['id']} queued")
            return refresh(run["id"], request)

        def cancel_run(run_id: str | None, request: gr.Request) -> list[Any]:
            user = _user(studio, request, "train")
            try:
                if not run_id:
                    raise StoreError("pick a run first")
                if studio.runner is None:
                    raise StoreError("the training runner is not running")
                studio.runner.cancel(run_id, f"cancelled by {user.name}")
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            return refresh(run_id, request)

        shown = [runs_table, pick, status, curves, log]
        form = [stage, parent, data, held_out, recipe, steps, reward_model, overrides, who, strength]
        start.click(start_run, form, shown, api_name="train_start")
        cancel.click(cancel_run, pick, shown, api_name="train_cancel")
        pick.change(refresh, pick, shown, api_visibility="private")
        timer.tick(refresh, pick, shown, api_visibility="private")
        tab.select(
            opened,
            pick,
            [advice, parent, data, recipe, reward_model, *shown, timer],
            api_visibility="private",
        )
    return timer


# -- Admin ---------------------------------------------------------------------------------
def _admin_tab(studio: Studio, demo: gr.Blocks) -> None:
    with gr.Tab("Admin", id="admin"):
        with gr.Accordion("Campaigns", open=True):
            campaigns_table = gr.Dataframe(interactive=False, label="Label campaigns and progress")
            refresh = gr.Button("Refresh")
            with gr.Row():
                c_name = gr.Textbox(label="New campaign name")
                c_set = gr.Dropdown(label="Prompt set", choices=[])
                c_model = gr.Textbox(label="Model version or alias", value=camp.POLICY)
            with gr.Row():
                c_n = gr.Slider(2, MAX_SLOTS, value=CampaignSpec.n, step=1, label="Completions per task (n)")
                c_overlap = gr.Slider(
                    1, 10, value=CampaignSpec.overlap, step=1, label="Annotators per task (overlap k)"
                )
                c_temp = gr.Slider(0.0, 2.0, value=CampaignSpec.temperature, step=0.05, label="Temperature")
                c_max = gr.Slider(16, 512, value=CampaignSpec.max_tokens, step=16, label="Max tokens")
            c_guidelines = gr.Textbox(label="Guidelines (Markdown)", lines=3)
            c_create = gr.Button("Create campaign", variant="primary")
            c_msg = gr.Markdown()
        with gr.Accordion("Battle campaigns", open=False):
            with gr.Row():
                b_name = gr.Textbox(label="New battle campaign name")
                b_set = gr.Dropdown(label="Prompt set", choices=[], allow_custom_value=True)
                b_versions = gr.Textbox(label="Versions or aliases, comma-separated", value="base,policy")
            with gr.Row():
                b_budget = gr.Number(label="Vote budget", value=200, precision=0)
                b_max = gr.Slider(16, 512, value=128, step=16, label="Max tokens")
                b_tie = gr.Checkbox(label="'Both bad' counts as a tie", value=True)
            b_leaks = gr.Textbox(
                label="Identity words (comma-separated; empty: the built-in list)",
                value=", ".join(arena.DEFAULT_LEAK_WORDS),
            )
            b_criteria = gr.Textbox(label="Criteria scored 1-5 (optional, comma-separated)")
            b_create = gr.Button("Create battle campaign", variant="primary")
            b_msg = gr.Markdown()
        with gr.Accordion("Import prompts", open=False):
            i_file = gr.File(label="JSONL, CSV or Parquet file", file_types=[".jsonl", ".csv", ".parquet"])
            i_set = gr.Textbox(label="Prompt set name")
            i_go = gr.Button("Import")
            i_msg = gr.Markdown()
        with gr.Accordion("Guidelines", open=False):
            g_campaign = gr.Dropdown(label="Campaign", choices=[])
            g_text = gr.Textbox(label="Guidelines (Markdown)", lines=8)
            g_save = gr.Button("Save guidelines")
            g_msg = gr.Markdown()
        with gr.Accordion("Agreement and quality", open=False):
            q_campaign = gr.Dropdown(label="Campaign", choices=[])
            q_go = gr.Button("Compute")
            q_summary = gr.Markdown()
            q_table = gr.Dataframe(interactive=False, label="Per annotator")
        with gr.Accordion("Export", open=False):
            with gr.Row():
                e_campaign = gr.Dropdown(label="Campaign (empty: all)", choices=[])
                e_kind = gr.Radio(list(KINDS), value="preference", label="Kind")
                e_format = gr.Radio([f for f in FORMATS if f != "datasets"], value="parquet", label="Format")
            e_go = gr.Button("Export")
            e_file = gr.File(label="Download")
            e_card = gr.JSON(label="Data card")
        with gr.Accordion("Users", open=False):
            users_table = gr.Dataframe(interactive=False)
            with gr.Row():
                u_name = gr.Textbox(label="Name")
                u_role = gr.Dropdown(list(users.ROLES), value="annotator", label="Role")
                u_pass = gr.Textbox(label="Password (8+ characters)", type="password")
            u_add = gr.Button("Add user")
            u_msg = gr.Markdown()

        def overview(request: gr.Request) -> list[Any]:
            _user(studio, request, "admin")
            rows = []
            for c in camp.list_campaigns(studio.store, kind="label"):
                p = labeling.progress(studio.store, c["name"])
                rows.append(
                    {
                        "campaign": c["name"],
                        "status": c["status"],
                        "prompt_set": c["prompt_set"],
                        "model": c["model"],
                        "n": c["n"],
                        "overlap": c["overlap"],
                        "tasks_sampled": p["tasks_sampled"],
                        "ready": p["ready"],
                        "judgments": p["judgments"],
                        "needed": p["judgments_needed"],
                    }
                )
            names = [r["campaign"] for r in rows]
            sets = [s["name"] for s in studio.store.prompt_sets()]
            user_rows = pd.DataFrame(
                [{k: str(v) for k, v in u.items()} for u in users.list_users(studio.store)]
            )
            return [
                pd.DataFrame(rows),
                gr.update(choices=sets),
                gr.update(choices=names),
                gr.update(choices=names),
                gr.update(choices=["", *names]),
                user_rows,
                gr.update(choices=sets),
            ]

        overview_outputs = [campaigns_table, c_set, g_campaign, q_campaign, e_campaign, users_table, b_set]

        def create(
            name: str,
            pset: str,
            model: str,
            n: float,
            overlap: float,
            temp: float,
            max_tok: float,
            guide: str,
            request: gr.Request,
        ) -> list[Any]:
            user = _user(studio, request, "admin")
            try:
                camp.create_campaign(
                    studio.store,
                    (name or "").strip(),
                    prompt_set=pset or "",
                    model=(model or camp.POLICY).strip(),
                    n=int(n),
                    overlap=int(overlap),
                    temperature=float(temp),
                    max_tokens=int(max_tok),
                    guidelines=guide,
                    created_by=user.name,
                )
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            if studio.task_sampler:
                studio.task_sampler.poke()
            return [f"Campaign **{name}** created; sampling has started.", *overview(request)]

        def create_battles(
            name: str,
            pset: str,
            versions: str,
            budget: float,
            max_tok: float,
            tie: bool,
            leaks: str,
            criteria: str,
            request: gr.Request,
        ) -> str:
            user = _user(studio, request, "admin")
            try:
                arena.create_battle_campaign(
                    studio.store,
                    (name or "").strip(),
                    prompt_set=pset or "",
                    versions=(versions or "").split(","),
                    budget=int(budget or 0),
                    max_tokens=int(max_tok),
                    both_bad_as_tie=bool(tie),
                    leak_words=[w.strip() for w in (leaks or "").split(",") if w.strip()] or None,
                    criteria=[c.strip() for c in (criteria or "").split(",") if c.strip()],
                    created_by=user.name,
                )
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            if studio.task_sampler:
                studio.task_sampler.poke()
            return f"Battle campaign **{name}** created; battles are being sampled."

        def import_file(file: Any, set_name: str, request: gr.Request) -> str:
            _user(studio, request, "import")
            if file is None:
                raise gr.Error("choose a file to import")
            path = Path(file if isinstance(file, str) else file.name)
            try:
                prompts = read_prompts(path)
                result = studio.store.import_prompts((set_name or "").strip(), prompts, source=path.name)
            except USER_ERRORS as exc:
                raise gr.Error(f"{exc}. Nothing was imported.") from None
            return result.summary().replace("\n", "\n\n")

        def load_guidelines(name: str | None, request: gr.Request) -> str:
            _user(studio, request, "admin")
            return camp.get_campaign(studio.store, name)["guidelines"] if name else ""

        def save_guidelines(name: str | None, text: str, request: gr.Request) -> str:
            _user(studio, request, "admin")
            if not name:
                raise gr.Error("pick a campaign")
            camp.set_guidelines(studio.store, name, text)
            return f"Guidelines of **{name}** saved."

        def compute_quality(name: str | None, request: gr.Request) -> tuple[str, pd.DataFrame]:
            _user(studio, request, "admin")
            if not name:
                raise gr.Error("pick a campaign")
            agreement = quality.campaign_agreement(studio.store, name)
            fmt = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in agreement.items()}
            summary = " · ".join(f"**{k}**: {v}" for k, v in fmt.items())
            return summary, pd.DataFrame(quality.annotator_quality(studio.store, name))

        def export(name: str | None, kind: str, fmt: str, request: gr.Request) -> tuple[str, dict]:
            _user(studio, request, "admin")
            folder = Path(tempfile.mkdtemp(prefix="studio-export-"))
            try:
                result = write_export(
                    studio.store, folder / f"{name or 'all'}-{kind}.{fmt}", kind, fmt, name or None
                )
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            return result["path"], json.loads(json.dumps(result, default=str))

        def add_user(name: str, role: str, password: str, request: gr.Request) -> list[Any]:
            _user(studio, request, "admin")
            try:
                token = users.add_user(studio.store, (name or "").strip(), role, password or "")
            except USER_ERRORS as exc:
                raise _fail(exc) from None
            note = f"User **{name}** ({role}) added. REST token (shown once): `{token}`"
            return [note, *overview(request)]

        refresh.click(overview, None, overview_outputs, api_name="admin_overview")
        demo.load(
            overview_if_admin(studio, overview, len(overview_outputs)),
            None,
            overview_outputs,
            api_visibility="private",
        )
        c_create.click(
            create,
            [c_name, c_set, c_model, c_n, c_overlap, c_temp, c_max, c_guidelines],
            [c_msg, *overview_outputs],
            api_name="admin_create_campaign",
        )
        i_go.click(import_file, [i_file, i_set], i_msg, api_name="admin_import")
        b_create.click(
            create_battles,
            [b_name, b_set, b_versions, b_budget, b_max, b_tie, b_leaks, b_criteria],
            b_msg,
            api_name="admin_create_battles",
        )
        g_campaign.change(load_guidelines, g_campaign, g_text, api_visibility="private")
        g_save.click(save_guidelines, [g_campaign, g_text], g_msg, api_name="admin_guidelines")
        q_go.click(compute_quality, q_campaign, [q_summary, q_table], api_name="admin_quality")
        e_go.click(export, [e_campaign, e_kind, e_format], [e_file, e_card], api_name="admin_export")
        u_add.click(add_user, [u_name, u_role, u_pass], [u_msg, *overview_outputs], api_name="admin_add_user")


def overview_if_admin(studio: Studio, overview: Any, n_outputs: int) -> Any:
    """On page load, fill the admin tab for admins and leave it empty (no error) for others."""

    def load(request: gr.Request) -> list[Any]:
        user = _session_user(studio, request)
        if user is None or not user.can("admin"):
            return [gr.update() for _ in range(n_outputs)]

        return overview(request)

    return load


def build_ui(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="Preference Studio") as demo:
        with gr.Row():
            gr.Markdown("# Preference Studio")
            who = gr.Markdown(elem_id="whoami")
            gr.Button("Log out", link="/logout", size="sm", scale=0)
        with gr.Tabs() as tabs:
            _label_tab(studio, demo)
            _sxs_tab(studio, demo)
            leaderboard_timer = _leaderboard_tab(studio, demo)
            _playground_tab(studio)
            _models_tab(studio, demo)
            train_timer = _train_tab(studio, demo)
            _admin_tab(studio, demo)

        def tab_changed(event: gr.SelectData) -> Any:
            # the leaderboard and the run view refresh themselves only while they are the open tab
            return [
                gr.Timer(active=event.value == "Leaderboard" or event.index == "leaderboard"),
                gr.Timer(active=event.value == "Train" or event.index == "train"),
            ]

        tabs.select(tab_changed, None, [leaderboard_timer, train_timer], api_visibility="private")

        def whoami(request: gr.Request) -> str:
            user = _user(studio, request, "view")
            return f"Logged in as **{user.name}** ({user.role})"

        demo.load(whoami, None, who, api_visibility="private")
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
