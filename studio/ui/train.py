"""The Train tab: start a run on the judged data, follow its progress and curves, cancel it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gradio as gr

from studio import services as svc
from studio.ui.common import frame, handler, info, run_curves, table, text
from studio.users import User

if TYPE_CHECKING:
    from studio.runtime import Studio

SHOWN_TO = ("start_run",)
SPEC = svc.RunSpec
STAGES = [
    ("Reward model", "reward"),
    ("DPO", "dpo"),
    ("PPO", "ppo"),
    ("SFT", "sft"),
    ("PPO then DPO", "ppo_then_dpo"),
]
STRENGTHS = [("any", 0), ("slight", 1), ("clear", 2), ("strong", 3)]  # 0: no minimum
LAUNCHER_CHOICES = [
    ("the studio's default", ""),
    ("local: one process here", "local"),
    ("accelerate: N processes here", "accelerate"),
    ("ray: a job on the Ray cluster", "ray"),
]
RUN_COLUMNS = ("id", "stages", "status", "parent", "versions", "by", "created")


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": run["id"],
        "stages": "+".join(run["stages"]),
        "status": run["status"],
        "parent": run["parent"],
        "versions": ", ".join(run["versions"] or []),
        "by": run["created_by"],
        "created": str(run["created_at"])[:19],
    }


def run_status(run: dict[str, Any]) -> str:
    """A `services.get_run` answer as the status line under the runs table."""
    info_ = run["progress"]
    out = f"**{run['id']}** · {'+'.join(run['stages'])} · **{run['status']}**"
    if info_.get("step"):
        out += f" · {info_['stage']} step {info_['step']}/{info_.get('max_steps') or '?'}"
        out += f" · {info_['elapsed_s']:.0f} s"
        if info_.get("eta_s") is not None:
            out += f" · ETA {info_['eta_s']:.0f} s"
    launch = run.get("launch") or {}
    if launch.get("launcher"):
        out += f" · {text(launch['launcher'])} x{launch.get('num_processes', 1)}"
        if launch.get("ray_jobs"):
            out += f" (Ray job {text(launch['ray_jobs'][-1])})"
    if run["reason"]:
        out += f"\n\nReason: {text(run['reason'])}"  # from the trainer's log
    if run["versions"]:
        out += f"\n\nVersions: {text(', '.join(run['versions']))}"
    if run["rebattle"]:
        out += f" · blind re-battle against the parent: campaign `{text(run['rebattle'])}`"
    if run.get("rebattle_prompts"):
        out += f"\n\nRe-battle prompts (never trained on): set `{text(run['rebattle_prompts'])}`"
    for note in run.get("notes") or []:
        out += f"\n\n**Note:** {text(note)}"
    return out


def build(studio: Studio, demo: gr.Blocks) -> tuple[gr.Tab, gr.Timer]:
    on = handler(studio)
    with gr.Tab("Train", id="train") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                advice = gr.Markdown(elem_id="advice")
                stage = gr.Dropdown(label="Stage (the advisor's pick when the tab opens)", choices=STAGES)
                parent = gr.Dropdown(
                    label="Start from (version or alias)",
                    choices=[],
                    value=SPEC.parent,
                    allow_custom_value=True,
                )
                data = gr.Dropdown(label="Labeling campaigns (empty: all)", choices=[], multiselect=True)
                with gr.Row():
                    who = gr.Textbox(label="Annotators (comma-separated; empty: all)")
                    strength = gr.Dropdown(label="Minimum strength", choices=STRENGTHS, value=0)
                held_out = gr.Number(
                    label="Held-out share of prompts (empty: the recipe's)",
                    value=SPEC.held_out,
                    minimum=0,
                    maximum=0.9,
                )
                recipe = gr.Dropdown(
                    label="Recipe (empty: the stage's own)", choices=[], allow_custom_value=True
                )
                steps = gr.Number(
                    label="Steps (PPO: iterations; empty: the recipe's)",
                    value=SPEC.steps,
                    precision=0,
                    elem_id="train-steps",
                )
                reward_model = gr.Dropdown(
                    label="PPO reward model (empty: the newest)", choices=[], allow_custom_value=True
                )
                overrides = gr.Textbox(
                    label="Recipe overrides, KEY=VALUE per line", lines=2, placeholder="train.beta=0.2"
                )
                eval_set = gr.Dropdown(
                    label="Re-battle prompt set (empty: the prompts held out of the snapshot)",
                    choices=[],
                    value=SPEC.eval_prompt_set,
                    allow_custom_value=True,
                )
                with gr.Row():
                    launcher = gr.Dropdown(
                        label="Launcher",
                        choices=LAUNCHER_CHOICES,
                        value=SPEC.launcher or "",
                        elem_id="launcher",
                    )
                    processes = gr.Number(
                        label="Processes per stage (accelerate; empty: the studio's)",
                        value=SPEC.num_processes,
                        precision=0,  # empty is "not given"; the service checks the count
                        elem_id="num-processes",
                    )
                start = gr.Button("Start run", variant="primary", elem_id="start-run")
            with gr.Column(scale=3):
                runs_table = table("Runs, newest first", RUN_COLUMNS, elem_id="runs-table")
                with gr.Row():
                    pick = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, scale=3)
                    cancel = gr.Button("Cancel run", variant="stop", scale=1, elem_id="cancel-run")
                status = gr.Markdown(elem_id="run-status")
                curves = gr.HTML(elem_id="run-curves")
                log = gr.Textbox(label="Log (tail)", lines=10, max_lines=10, autoscroll=True)
        timer = gr.Timer(2.0, active=False)
    shown = [runs_table, pick, status, curves, log]

    def refresh(user: User, run_id: str | None) -> list[Any]:
        runs = svc.list_runs(studio, user)
        listed = frame([run_row(r) for r in runs], RUN_COLUMNS)
        run_id = run_id or (runs[0]["id"] if runs else None)
        if not run_id:
            return [listed, gr.update(choices=[]), "No runs yet.", "", ""]
        run = svc.get_run(studio, user, run_id)
        return [
            listed,
            gr.update(choices=[r["id"] for r in runs], value=run_id),
            run_status(run),
            run_curves(run["curves"]),
            run["log"],
        ]

    def opened(user: User, run_id: str | None) -> list[Any]:
        tip = svc.advice(studio, user)
        models = svc.list_models(studio, user)
        policies = [*models["aliases"], *[m["name"] for m in models["models"] if m["kind"] != "reward"]]
        rewards = [m["name"] for m in models["models"] if m["kind"] == "reward"]
        return [
            f"**Advisor:** {text(tip['stage'] or 'label first')}: {text(tip['why'])}",
            gr.update(value=tip["stage"]) if tip["stage"] else gr.update(),
            gr.update(choices=policies),
            gr.update(choices=[c["name"] for c in svc.list_campaigns(studio, user, kind="label")]),
            gr.update(choices=["", *svc.recipes(studio, user)]),
            gr.update(choices=["", *rewards]),
            gr.update(choices=["", *(s["name"] for s in svc.list_prompt_sets(studio, user))]),
            *refresh(user, run_id),
            gr.Timer(active=True),
        ]

    def start_run(
        user: User,
        stage_v: str | None,
        parent_v: str | None,
        data_v: list[str] | None,
        held: float | None,
        recipe_v: str | None,
        steps_v: float | None,
        rm: str | None,
        lines: str | None,
        who_v: str | None,
        strength_v: int | None,
        eval_set_v: str | None,
        launcher_v: str | None,
        processes_v: float | None,
    ) -> list[Any]:
        # empty controls are "not given": the spec's defaults (the recipe's values) apply
        spec = svc.RunSpec(
            stage=stage_v or "",
            **svc.given(
                parent=parent_v or None,
                campaigns=data_v or None,
                held_out=held,
                recipe=recipe_v or None,
                steps=int(steps_v) if steps_v else None,
                overrides=svc.parse_overrides((lines or "").splitlines(), where="override") or None,
                reward_model=rm or None,
                annotators=[a.strip() for a in (who_v or "").split(",") if a.strip()] or None,
                min_strength=int(strength_v) if strength_v else None,
                eval_prompt_set=eval_set_v or None,
                launcher=launcher_v or None,
                num_processes=int(processes_v) if processes_v else None,
            ),
        )
        run = svc.start_run(studio, user, spec)
        info(f"run {run['id']} queued")
        for note in run["notes"]:
            gr.Warning(text(note))  # e.g. no held-out prompts: the version gets no re-battle
        return refresh(user, run["id"])

    def cancel_run(user: User, run_id: str | None) -> list[Any]:
        svc.cancel_run(studio, user, run_id or "")
        return refresh(user, run_id)

    form = [
        stage,
        parent,
        data,
        held_out,
        recipe,
        steps,
        reward_model,
        overrides,
        who,
        strength,
        eval_set,
        launcher,
        processes,
    ]
    start.click(on(start_run), form, shown, api_name="train_start")
    cancel.click(on(cancel_run), pick, shown, api_name="train_cancel")
    pick.change(on(refresh), pick, shown, api_name="train_pick", api_visibility="private")
    timer.tick(on(refresh), pick, shown, api_name="train_tick", api_visibility="private")
    tab.select(
        on(opened),
        pick,
        [advice, stage, parent, data, recipe, reward_model, eval_set, *shown, timer],
        api_name="train_open",
        api_visibility="private",
    )
    return tab, timer
