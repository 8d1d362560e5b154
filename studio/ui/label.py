"""The Label tab: rank or pick the best of a task's completions (everyone who may label)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import gradio as gr

from studio import services as svc
from studio.ui.common import campaign_dropdown, campaign_picker, handler, info, nothing, text
from studio.users import User

if TYPE_CHECKING:
    from studio.runtime import Studio

SHOWN_TO = ("next_task",)  # the tab is shown to users who may do any of these actions
MAX_SLOTS = 8  # completions per labeling task (campaigns allow n <= 8)
STRENGTH_CHOICES = [("slight", 1), ("clear", 2), ("strong", 3)]
FLAG_CHOICES = [
    ("unsafe", "unsafe"),
    ("hallucination", "hallucination"),
    ("unhelpful refusal", "unhelpful_refusal"),
    ("identity leak", "identity_leak"),
    ("other", "other"),
]
CUT = "length"  # the finish reason of an answer stopped by max_tokens

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


def cut_note(finish_reason: str | None) -> str:
    """The mark of an answer that stopped at max_tokens, so nobody takes it for a finished one."""
    if finish_reason != CUT:
        return ""
    return " · _✂ cut off: it reached the length limit (max tokens) before it finished_"


def completion_markdown(position: int, completion: dict[str, Any]) -> str:
    # The text is the model's Markdown; the component sanitises its HTML.
    return f"**Answer {position + 1}**{cut_note(completion.get('finish_reason'))}\n\n{completion['text']}"


def prompt_markdown(messages: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"**{text(m['role'])}**: {m['content']}" for m in messages)


def build(studio: Studio, demo: gr.Blocks) -> gr.Tab:
    on = handler(studio)
    with gr.Tab("Label", id="label") as tab:
        state = gr.State({})
        with gr.Row():
            campaign = campaign_dropdown("Campaign", "label-campaign", scale=3)
            next_btn = gr.Button("Next task (n)", elem_id="label-next", scale=1)
        status = gr.Markdown("Pick a campaign and press **Next task**.", elem_id="label-status")
        with gr.Accordion("Guidelines", open=False):
            guidelines = gr.Markdown()
        prompt = gr.Markdown(elem_id="label-prompt")
        slots = []
        for i in range(MAX_SLOTS):
            with gr.Group(visible=False) as group:
                answer = gr.Markdown(elem_id=f"label-completion-{i}", sanitize_html=True)
                with gr.Row():
                    rank = gr.Dropdown(
                        label=f"Rank of answer {i + 1} (1 = best; equal = tie)",
                        choices=[],
                        elem_id=f"label-rank-{i}",
                        scale=1,
                    )
                    flags = gr.CheckboxGroup(FLAG_CHOICES, label="Flags", elem_id=f"label-flags-{i}", scale=3)
            slots.append((group, answer, rank, flags))
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
    for group, answer, rank, flags in slots:
        task_outputs += [group, answer, rank, flags]
    slot_inputs = [c for _, _, rank, flags in slots for c in (rank, flags)]

    def render(answer: dict[str, Any]) -> list[Any]:
        """A `services.next_task` answer ({task, progress}) on screen."""
        task, progress = answer["task"], answer["progress"]
        done = f"{progress.get('done', 0)} done, {progress.get('remaining', 0)} remaining"
        if task is None:
            waiting = progress.get("remaining", 0) > 0
            state = answer.get("status")
            if not waiting:
                note = f"No tasks left for you in this campaign. Thank you! ({done})"
            elif state == "preparing" or not answer.get("note"):
                note = (
                    f"Preparing tasks: the model is sampling answers ({progress.get('ready', 0)} "
                    f"ready). This page updates by itself. ({done})"
                )
            else:  # restarting, down, or sampling failing: say so, the page keeps asking
                note = f"No task is ready: {text(answer['note'])}. This page updates by itself. ({done})"
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
        out = [
            {
                "assignment_id": task["assignment_id"],
                "campaign": task["campaign"],
                "n": n,
                "shown_at": time.time(),
            },
            f"Task ready. ({done})",
            task["guidelines"] or "_No guidelines yet._",
            prompt_markdown(task["prompt"]),
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
                    completion_markdown(i, task["completions"][i]),
                    gr.update(choices=list(range(1, n + 1)), value=None),
                    [],
                ]
            else:
                out += [gr.Group(visible=False), "", gr.update(choices=[], value=None), []]
        return out

    def load_campaigns(user: User) -> Any:
        return campaign_picker(studio, user, "label")

    def next_task(user: User, name: str | None) -> list[Any]:
        if not name:
            raise ValueError("pick a campaign first")
        return render(svc.next_task(studio, user, name))

    def on_pick(user: User, name: str | None) -> list[Any]:
        # clearing the dropdown is not an error: leave the screen as it is
        return next_task(user, name) if name else nothing(task_outputs)

    def poll(user: User, name: str | None, current: dict[str, Any]) -> list[Any]:
        # while tasks are being prepared: show one as soon as it is ready
        if current.get("assignment_id") or not name:
            return nothing(task_outputs)
        return next_task(user, name)

    def submit(user: User, values: dict[Any, Any]) -> list[Any]:
        # a set of inputs arrives as {component: value}: the slots vary in number
        current = values[state]
        if not current.get("assignment_id"):
            raise ValueError("no task on screen: press Next task")
        n = current["n"]
        slot_values = [values[c] for c in slot_inputs]
        ranks_raw = [slot_values[2 * i] for i in range(n)]
        if all(r not in (None, "") for r in ranks_raw):
            ranks = [int(r) for r in ranks_raw]
        elif any(r not in (None, "") for r in ranks_raw):
            raise ValueError("rank every answer, or clear the ranks and use quick best/worst")
        else:
            ranks = None
        spec = svc.JudgmentSpec(
            assignment_id=current["assignment_id"],
            ranks=ranks,
            best=values[best],
            worst=values[worst],
            all_bad=bool(values[all_bad]),
            strength=values[strength],
            flags={i: slot_values[2 * i + 1] or [] for i in range(n)},
            rationale=values[rationale],
            edited_text=values[ideal],
            idempotency_key=current["assignment_id"],  # a double click stores one judgment
            shown_at=current.get("shown_at"),
        )
        answer = svc.submit_judgment(studio, user, spec)
        info("Saved.")
        return render(answer["next"])

    def skip(user: User, current: dict[str, Any]) -> list[Any]:
        if not current.get("assignment_id"):
            raise ValueError("no task on screen")
        svc.skip(studio, user, current["assignment_id"])
        return next_task(user, current["campaign"])

    demo.load(on(load_campaigns), None, campaign, api_name="label_campaigns")
    next_btn.click(on(next_task), [campaign], task_outputs, api_name="label_next", concurrency_limit=None)
    campaign.change(on(on_pick), [campaign], task_outputs, api_name="label_pick", api_visibility="private")
    timer.tick(on(poll), [campaign, state], task_outputs, api_name="label_poll", api_visibility="private")
    submit_btn.click(
        on(submit),
        {state, best, worst, all_bad, strength, rationale, ideal, *slot_inputs},
        task_outputs,
        api_name="label_submit",
        concurrency_limit=None,
    )
    skip_btn.click(on(skip), [state], task_outputs, api_name="label_skip", concurrency_limit=None)
    return tab
