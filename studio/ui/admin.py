"""The Admin tab: campaigns, battle campaigns, prompt import, guidelines, quality, export, users."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from studio import services as svc
from studio import users
from studio.export import FORMATS, KINDS
from studio.ui.common import frame, handler, table, text
from studio.ui.label import MAX_SLOTS
from studio.users import User

if TYPE_CHECKING:
    from studio.runtime import Studio

SHOWN_TO = ("create_campaign",)
CAMPAIGN = svc.CampaignSpec
BATTLES = svc.BattleCampaignSpec
EXPORT = svc.ExportSpec
CAMPAIGN_COLUMNS = (
    "campaign",
    "status",
    "prompt_set",
    "model",
    "n",
    "overlap",
    "tasks_sampled",
    "ready",
    "judgments",
    "needed",
    "sampler",
)
BATTLE_COLUMNS = ("campaign", "status", "prompt_set", "sampler")
QUALITY_COLUMNS = (
    "annotator",
    "judgments",
    "agreement_with_majority",
    "position_bias_first_shown",
    "length_bias_longer",
    "median_seconds",
)
USER_COLUMNS = ("name", "role", "disabled", "created_at")
SAMPLER_COLUMNS = (
    "campaign",
    "kind",
    "ready",
    "buffer_target",
    "sampling",
    "workers",
    "pace_s",
    "demand_tasks_min",
    "supply_tasks_min",
    "expected_wait_s",
    "sampler",
)
SERVER_COLUMNS = ("server", "kind", "state", "serves", "in_flight", "last_error")
# A download is fetched at once (Gradio copies it to its cache as the handler returns); its
# folder is removed after this even when the session never exports again.
DOWNLOAD_TTL_S = 600


def sampler_state(campaign: dict[str, Any]) -> str:
    """The sampler column: why sampling for the campaign fails, or 'ok'."""
    error = campaign.get("sampler_error")
    return f"failing: {error}" if error else "ok"


def sampler_rows(overview: dict[str, Any]) -> list[dict[str, Any]]:
    """The sampler table: one row per campaign the sampler plans for."""
    rows = []
    for name, c in sorted(overview["campaigns"].items()):
        if "target" not in c:
            continue  # seen once, no longer active
        wait = c.get("expected_wait_s")
        rows.append(
            {
                "campaign": name,
                "kind": c.get("kind"),
                "ready": c.get("ready"),
                "buffer_target": c.get("target"),
                "sampling": c.get("sampling"),
                "workers": c.get("workers"),
                "pace_s": c.get("pace_s"),
                "demand_tasks_min": c.get("demand_tasks_min"),
                "supply_tasks_min": c.get("supply_tasks_min"),
                "expected_wait_s": "unknown" if wait is None else wait,
                "sampler": sampler_state({"sampler_error": c.get("error")}),
            }
        )
    return rows


def sampler_summary(overview: dict[str, Any]) -> str:
    """One line on the sampler's in-flight level and where it comes from."""
    curve = overview.get("curve")
    source = (
        "measured knee of " + ", ".join(f"{int(p['in_flight'])}: {p['tok_s']:.0f}" for p in curve) + " tok/s"
        if curve
        else "default (throughput not measured yet)"
    )
    line = (
        f"Sequences in flight: {overview['in_flight_now']} of {overview['in_flight_target']} ({source}). "
        f"Buffers share a cap of {overview['memory_cap_completions']} completions."
    )
    if overview.get("measuring"):
        line += " Measuring the model server's throughput now: new sampling waits for it (about 30 s)."
    if overview.get("worker_error"):
        line += f" Sampler error: {overview['worker_error']}"
    return line


def server_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The model servers table: one row per server, from `services.model_servers`."""
    return [
        {
            "server": s["url"] if s["id"] == s["url"] else f"{s['id']} ({s['url']})",
            "kind": s["kind"],
            "state": s["state"],
            "serves": ", ".join(s["serves"]),
            "in_flight": s["in_flight"],
            "last_error": (s["last_error"] or "")[:200],
        }
        for s in status["servers"]
    ]


def servers_note(status: dict[str, Any]) -> str:
    """One line over the table: whether the base is served, and the versions that are not."""
    line = "Serving." if status["healthy"] else "**The base model is not served right now.**"
    failed = status["failed"]
    if failed:
        line += " Not served: " + "; ".join(f"**{text(k)}**: {text(v[:200])}" for k, v in failed.items())
    return line


def split_list(value: str | None) -> list[str]:
    """A comma-separated field as its non-empty items."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


class ExportFolders:
    """The temporary folders of downloads, removed once they can no longer be fetched.

    Gradio copies a returned file into its own cache after the handler returns, so the handler
    cannot remove the folder itself. A session's folder goes at its next export and when the
    session ends (its `gr.State` is deleted); whatever is left goes when the studio stops.
    """

    def __init__(self) -> None:
        self._folders: set[Path] = set()
        self._lock = threading.Lock()

    def keep(self, folder: Path) -> Path:
        with self._lock:
            self._folders.add(folder)
        return folder

    def remove(self, folder: Path | str | None) -> None:
        if folder is None:
            return
        shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            self._folders.discard(Path(folder))

    def remove_all(self) -> None:
        with self._lock:
            folders, self._folders = list(self._folders), set()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def build(studio: Studio, demo: gr.Blocks, exports: ExportFolders) -> gr.Tab:
    on = handler(studio)
    with gr.Tab("Admin", id="admin") as tab:
        with gr.Accordion("Campaigns", open=True):
            campaigns_table = table(
                "Label campaigns and progress", CAMPAIGN_COLUMNS, elem_id="admin-campaigns"
            )
            refresh = gr.Button("Refresh")
            with gr.Row():
                c_name = gr.Textbox(label="New campaign name")
                c_set = gr.Dropdown(label="Prompt set", choices=[], allow_custom_value=True)
                c_model = gr.Textbox(label="Model version or alias", value=CAMPAIGN.model)
            with gr.Row():
                c_n = gr.Slider(2, MAX_SLOTS, value=CAMPAIGN.n, step=1, label="Completions per task (n)")
                c_overlap = gr.Slider(
                    1, 10, value=CAMPAIGN.overlap, step=1, label="Annotators per task (overlap k)"
                )
                c_temp = gr.Slider(0.0, 2.0, value=CAMPAIGN.temperature, step=0.05, label="Temperature")
                c_max = gr.Slider(16, 512, value=CAMPAIGN.max_tokens, step=16, label="Max tokens")
            c_guidelines = gr.Textbox(label="Guidelines (Markdown)", lines=3)
            c_create = gr.Button("Create campaign", variant="primary")
            c_msg = gr.Markdown()
        with gr.Accordion("Sampler: buffers, rates and waits", open=False):
            s_summary = gr.Markdown()
            sampler_table = table(
                "Per campaign (rates in tasks/min, times in s)", SAMPLER_COLUMNS, elem_id="admin-sampler"
            )
            with gr.Row():
                s_refresh = gr.Button("Refresh sampler")
                s_measure = gr.Button("Measure serving throughput (about 30 s)")
        with gr.Accordion("Model servers", open=False):
            servers_line = gr.Markdown()
            servers_table = table(None, SERVER_COLUMNS, elem_id="admin-servers")
        with gr.Accordion("Battle campaigns", open=False):
            battles_table = table("Battle campaigns", BATTLE_COLUMNS, elem_id="admin-battles")
            with gr.Row():
                b_name = gr.Textbox(label="New battle campaign name")
                b_set = gr.Dropdown(label="Prompt set", choices=[], allow_custom_value=True)
                b_versions = gr.Textbox(
                    label="Versions or aliases, comma-separated", placeholder="base, policy"
                )
            with gr.Row():
                b_budget = gr.Number(label="Vote budget", value=BATTLES.budget, precision=0)
                b_max = gr.Slider(16, 512, value=BATTLES.max_tokens, step=16, label="Max tokens")
                b_tie = gr.Checkbox(label="'Both bad' counts as a tie", value=BATTLES.both_bad_as_tie)
            b_leaks = gr.Textbox(
                label="Identity words (comma-separated; empty: the built-in list plus the version names)"
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
            g_campaign = gr.Dropdown(label="Campaign", choices=[], allow_custom_value=True)
            g_text = gr.Textbox(label="Guidelines (Markdown)", lines=8)
            g_save = gr.Button("Save guidelines")
            g_msg = gr.Markdown()
        with gr.Accordion("Agreement and quality", open=False):
            q_campaign = gr.Dropdown(label="Campaign", choices=[], allow_custom_value=True)
            q_go = gr.Button("Compute")
            q_summary = gr.Markdown()
            q_table = table("Per annotator", QUALITY_COLUMNS)
        with gr.Accordion("Export", open=False):
            with gr.Row():
                e_campaign = gr.Dropdown(label="Campaign (empty: all)", choices=[], allow_custom_value=True)
                e_kind = gr.Radio(list(KINDS), value=EXPORT.kind, label="Kind")
                e_format = gr.Radio(
                    [f for f in FORMATS if f in svc.DOWNLOAD_FORMATS],
                    value=svc.DOWNLOAD_FORMATS[0],
                    label="Format",
                )
            e_go = gr.Button("Export")
            e_file = gr.File(label="Download")
            e_card = gr.JSON(label="Data card")
            # this session's last download folder; removed with the session
            e_folder = gr.State(None, time_to_live=DOWNLOAD_TTL_S, delete_callback=exports.remove)
        with gr.Accordion("Users", open=False):
            users_table = table(None, USER_COLUMNS, elem_id="admin-users")
            with gr.Row():
                u_name = gr.Textbox(label="Name")
                u_role = gr.Dropdown(list(users.ROLES), label="Role")
                u_pass = gr.Textbox(label=f"Password ({users.MIN_PASSWORD}+ characters)", type="password")
            u_add = gr.Button("Add user")
            u_msg = gr.Markdown()

    overview_outputs = [
        campaigns_table,
        c_set,
        g_campaign,
        q_campaign,
        e_campaign,
        users_table,
        b_set,
        battles_table,
        servers_line,
        servers_table,
    ]

    def overview(user: User) -> list[Any]:
        accounts = svc.list_users(studio, user)  # the admin-only part first: refused before any work
        labeled = svc.list_campaigns(studio, user, kind="label", with_progress=True)
        rows = [
            {
                "campaign": c["name"],
                "status": c["status"],
                "prompt_set": c["prompt_set"],
                "model": c["model"],
                "n": c["n"],
                "overlap": c["overlap"],
                "tasks_sampled": c["progress"]["tasks_sampled"],
                "ready": c["progress"]["ready"],
                "judgments": c["progress"]["judgments"],
                "needed": c["progress"]["judgments_needed"],
                "sampler": sampler_state(c),
            }
            for c in labeled
        ]
        battles = [
            {
                "campaign": c["name"],
                "status": c["status"],
                "prompt_set": c["prompt_set"],
                "sampler": sampler_state(c),
            }
            for c in svc.list_campaigns(studio, user, kind="battle")
        ]
        names = [c["name"] for c in labeled]
        sets = [s["name"] for s in svc.list_prompt_sets(studio, user)]
        servers = svc.model_servers(studio, user)
        return [
            frame(rows, CAMPAIGN_COLUMNS),
            gr.update(choices=sets),
            gr.update(choices=names),
            gr.update(choices=names),
            gr.update(choices=["", *names]),
            frame(accounts, USER_COLUMNS),
            gr.update(choices=sets),
            frame(battles, BATTLE_COLUMNS),
            servers_note(servers),
            frame(server_rows(servers), SERVER_COLUMNS),
        ]

    def sampler(user: User) -> list[Any]:
        state = svc.sampler_overview(studio, user)
        return [sampler_summary(state), frame(sampler_rows(state), SAMPLER_COLUMNS)]

    def measure(user: User) -> list[Any]:
        state = svc.measure_serving(studio, user)
        return [sampler_summary(state), frame(sampler_rows(state), SAMPLER_COLUMNS)]

    def create(
        user: User,
        name: str | None,
        pset: str | None,
        model: str | None,
        n: float,
        overlap: float,
        temp: float,
        max_tok: float,
        guide: str | None,
    ) -> list[Any]:
        spec = svc.CampaignSpec(
            name=(name or "").strip(),
            prompt_set=pset or "",
            **svc.given(
                model=(model or "").strip() or None,
                n=int(n),
                overlap=int(overlap),
                temperature=float(temp),
                max_tokens=int(max_tok),
                guidelines=guide,
            ),
        )
        created = svc.create_campaign(studio, user, spec)
        return [f"Campaign **{text(created['name'])}** created; sampling has started.", *overview(user)]

    def create_battles(
        user: User,
        name: str | None,
        pset: str | None,
        versions: str | None,
        budget: float | None,
        max_tok: float,
        tie: bool,
        leaks: str | None,
        criteria: str | None,
    ) -> list[Any]:
        spec = svc.BattleCampaignSpec(
            name=(name or "").strip(),
            prompt_set=pset or "",
            versions=split_list(versions),
            **svc.given(
                budget=int(budget) if budget is not None else None,
                max_tokens=int(max_tok),
                both_bad_as_tie=bool(tie),
                leak_words=split_list(leaks) or None,
                criteria=split_list(criteria) or None,
            ),
        )
        created = svc.create_battle_campaign(studio, user, spec)
        return [
            f"Battle campaign **{text(created['name'])}** created; battles are being sampled.",
            *overview(user),
        ]

    def import_file(user: User, file: Any, set_name: str | None) -> str:
        if file is None:
            raise ValueError("choose a file to import")
        path = Path(file if isinstance(file, str) else file.name)
        try:
            result = svc.import_file(studio, user, (set_name or "").strip(), path)
        except ValueError as exc:
            raise ValueError(f"{exc}. Nothing was imported.") from None
        return text(result["summary"]).replace("\n", "\n\n")

    def load_guidelines(user: User, name: str | None) -> str:
        return svc.get_campaign(studio, user, name)["guidelines"] if name else ""

    def save_guidelines(user: User, name: str | None, guidelines: str | None) -> str:
        svc.set_guidelines(studio, user, name or "", guidelines or "")
        return f"Guidelines of **{text(name)}** saved."

    def compute_quality(user: User, name: str | None) -> list[Any]:
        result = svc.campaign_quality(studio, user, name or "")
        shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in result["agreement"].items()}
        summary = " · ".join(f"**{k}**: {v}" for k, v in shown.items())
        return [summary, frame(result["annotators"], QUALITY_COLUMNS)]

    def export(user: User, name: str | None, kind: str, fmt: str, previous: str | None) -> list[Any]:
        exports.remove(previous)  # this session's last download was fetched by now
        result = svc.export_download(
            studio, user, svc.ExportSpec(kind=kind, format=fmt, campaign=name or None)
        )
        folder = exports.keep(Path(result["path"]).parent)
        card = json.loads(json.dumps(result, default=str))  # paths and times as text
        return [result["path"], card, str(folder)]

    def add_user(user: User, name: str | None, role: str | None, password: str | None) -> list[Any]:
        spec = svc.UserSpec(name=(name or "").strip(), role=role or "", password=password or "")
        added = svc.add_user(studio, user, spec)
        note = (
            f"User **{text(added['name'])}** ({text(added['role'])}) added. "
            f"REST token (shown once): `{added['token']}`"
        )
        return [note, *overview(user)]

    refresh.click(on(overview), None, overview_outputs, api_name="admin_overview")
    tab.select(on(overview), None, overview_outputs, api_name="admin_open", api_visibility="private")
    c_create.click(
        on(create),
        [c_name, c_set, c_model, c_n, c_overlap, c_temp, c_max, c_guidelines],
        [c_msg, *overview_outputs],
        api_name="admin_create_campaign",
    )
    b_create.click(
        on(create_battles),
        [b_name, b_set, b_versions, b_budget, b_max, b_tie, b_leaks, b_criteria],
        [b_msg, *overview_outputs],
        api_name="admin_create_battles",
    )
    s_refresh.click(on(sampler), None, [s_summary, sampler_table], api_name="admin_sampler")
    s_measure.click(on(measure), None, [s_summary, sampler_table], api_name="admin_measure_serving")
    i_go.click(on(import_file), [i_file, i_set], i_msg, api_name="admin_import")
    g_campaign.change(
        on(load_guidelines), g_campaign, g_text, api_name="admin_guidelines_load", api_visibility="private"
    )
    g_save.click(on(save_guidelines), [g_campaign, g_text], g_msg, api_name="admin_guidelines")
    q_go.click(on(compute_quality), q_campaign, [q_summary, q_table], api_name="admin_quality")
    e_go.click(
        on(export),
        [e_campaign, e_kind, e_format, e_folder],
        [e_file, e_card, e_folder],
        api_name="admin_export",
    )
    u_add.click(on(add_user), [u_name, u_role, u_pass], [u_msg, *overview_outputs], api_name="admin_add_user")
    return tab
