"""The Gradio tabs' handlers, called in process on a real database (no model server needed).

Each event is called the way Gradio calls it: its function with the inputs and a `gr.Request`
naming the session's user. The browser-level checks are in test_ui.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import pytest

from studio import campaigns, labeling, ui
from studio import services as svc
from studio.sampling import Sampler
from studio.serving.client import OpenAIChatBackend
from studio.store import ImportedPrompt
from studio.task_sampler import TaskSampler
from studio.ui import build_ui, common
from studio.ui.admin import ExportFolders
from tests.conftest import free_port
from tests.helpers import make_users, seed_battles, seed_campaign, seed_easy_judgments

ROLES = ("annotator", "expert", "engineer", "admin")


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[svc.OfflineContext]:
    context = svc.OfflineContext(tmp_path)
    make_users(context.store, *((role, role) for role in ROLES))
    yield context
    context.close()


@pytest.fixture()
def demo(ctx: svc.OfflineContext) -> gr.Blocks:
    return build_ui(ctx)


def event(demo: gr.Blocks, api_name: str) -> Any:
    return next(fn for fn in demo.fns.values() if fn.api_name == api_name)


def call(demo: gr.Blocks, api_name: str, user: str, *inputs: Any) -> Any:
    return event(demo, api_name).fn(*inputs, gr.Request(username=user))


def by_id(fn: Any, elem_id: str) -> int:
    return next(i for i, c in enumerate(fn.outputs) if getattr(c, "elem_id", None) == elem_id)


def test_each_role_sees_only_the_tabs_it_may_use(demo: gr.Blocks) -> None:
    session = event(demo, "session")
    tab_ids = [c.id for c in session.outputs[1:]]
    expected = {
        "annotator": {"label"},
        "expert": {"label", "sxs", "leaderboard"},
        "engineer": {"label", "leaderboard", "playground", "models", "train"},
        "admin": {"label", "sxs", "leaderboard", "playground", "models", "train", "admin"},
    }
    for role in ROLES:
        who, *tabs = call(demo, "session", role)
        assert f"**{role}** ({role})" in who
        assert {tab_id for tab_id, tab in zip(tab_ids, tabs, strict=True) if tab.visible} == expected[role]
    # before the page load says who is here, only the Label tab is rendered visible
    assert [c.visible for c in session.outputs[1:]] == [tab_id == "label" for tab_id in tab_ids]


def test_a_refused_event_is_a_toast_naming_the_role(demo: gr.Blocks, ctx: svc.OfflineContext) -> None:
    with pytest.raises(gr.Error, match="user 'annotator' \\(annotator\\) may not admin"):
        call(demo, "admin_add_user", "annotator", "mallory", "admin", "password123")
    assert [u["name"] for u in svc.list_users(ctx, svc.CLI_USER)] == list(ROLES)
    with pytest.raises(gr.Error, match="not logged in"):
        call(demo, "label_campaigns", "nobody")


def test_error_toasts_show_markup_as_text(demo: gr.Blocks) -> None:
    evil = '<img src=x onerror="alert(1)">'
    with pytest.raises(gr.Error) as raised:
        call(demo, "admin_create_campaign", "admin", "c1", "set", evil, 2, 1, 0.8, 64, "")
    message = raised.value.message
    assert "&lt;img src=x" in message and "<img" not in message


def test_the_sliders_start_at_the_services_defaults(demo: gr.Blocks) -> None:
    create = event(demo, "admin_create_campaign")
    n, overlap, temperature, max_tokens = (c.value for c in create.inputs[3:7])
    spec = svc.CampaignSpec
    assert (n, overlap, temperature, max_tokens) == (spec.n, spec.overlap, spec.temperature, spec.max_tokens)
    sample = event(demo, "sample")
    assert [c.value for c in sample.inputs[1:]] == [
        svc.SampleSpec.n,
        svc.SampleSpec.temperature,
        svc.SampleSpec.max_tokens,
        svc.SampleSpec.seed,
    ]


def test_empty_tables_show_their_column_names(demo: gr.Blocks) -> None:
    tables = [b for b in demo.blocks.values() if isinstance(b, gr.Dataframe)]
    assert len(tables) >= 10
    for t in tables:
        assert t.headers != ["1", "2", "3"], t.label
    # the Train tab's runs with no run yet
    refresh = event(demo, "train_pick")
    runs, *_ = call(demo, "train_pick", "engineer", None)
    shown = refresh.outputs[0].postprocess(runs)
    assert shown.headers == ["id", "stages", "status", "parent", "versions", "by", "created"]
    assert shown.data == []


def test_the_models_table_travels_as_json(demo: gr.Blocks, ctx: svc.OfflineContext) -> None:
    ctx.store.register_model_version("base", path="/m", content_hash="h" * 64, source="test")
    models = event(demo, "models")
    frame, _aliases, _ = call(demo, "models", "engineer")
    data = models.outputs[0].postprocess(frame).model_dump()
    text = json.dumps(data)  # a Timestamp here broke the Gradio API's stream
    assert "base" in text and data["headers"][5] == "created_at"


def test_cut_answers_are_marked_in_label_and_side_by_side(demo: gr.Blocks, ctx: svc.OfflineContext) -> None:
    store = ctx.store
    seed_campaign(store, "cut", prompts=1, n=2, overlap=1, texts=["a long answer that stops", "short."])
    store.write("UPDATE generations SET finish_reason = 'length' WHERE text = 'a long answer that stops'")
    out = call(demo, "label_next", "annotator", "cut")
    label_next = event(demo, "label_next")
    shown = [out[by_id(label_next, f"label-completion-{i}")] for i in range(2)]
    cut = next(s for s in shown if "a long answer that stops" in s)
    whole = next(s for s in shown if "short." in s)
    assert "cut off" in cut and "cut off" not in whole
    # the task payload carries each completion's finish reason
    task = labeling.next_task(store, "cut", "annotator")
    assert sorted(c["finish_reason"] for c in task["completions"]) == ["length", "stop"]

    seed_battles(store, "duel", [("base", "other", "cut answer", "whole answer")])
    store.write("UPDATE generations SET finish_reason = 'length' WHERE text = 'cut answer'")
    _state, status, _prompt, a, b, _ = call(demo, "sxs_next", "expert", "duel")
    assert ("cut off" in a) != ("cut off" in b)
    assert "cut off" in (a if "cut answer" in a else b)
    assert "base" not in a + b + status and "other" not in a + b + status  # still blind


def test_sampler_failures_show_on_label_and_admin(demo: gr.Blocks, ctx: svc.OfflineContext) -> None:
    store = ctx.store
    store.register_model_version("base", path="/m", content_hash="h" * 64, source="test")
    campaigns.ensure_policy_alias(store, "base")
    msgs = [{"role": "user", "content": "hi?"}]
    store.import_prompts("s", [ImportedPrompt("row 1", msgs, "h1")], source="test")
    campaigns.create_campaign(store, "stuck", prompt_set="s", n=2)
    # a real sampler whose model server is not there: every attempt fails
    backend = OpenAIChatBackend(f"http://127.0.0.1:{free_port()}", timeout=5)
    ctx.task_sampler = TaskSampler(store, Sampler(store, backend), interval=0.1)
    ctx.task_sampler.start()
    try:
        deadline = time.monotonic() + 30
        while ctx.task_sampler.last_error("stuck") is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        ctx.task_sampler.stop()
        backend.close()
    assert "did not answer" in ctx.task_sampler.last_error("stuck")

    out = call(demo, "label_next", "annotator", "stuck")
    status = out[by_id(event(demo, "label_next"), "label-status")]
    assert "sampling answers for this campaign is failing" in status and "did not answer" in status
    overview = call(demo, "admin_overview", "admin")
    row = overview[0].set_index("campaign").loc["stuck"]
    assert row["sampler"].startswith("failing: ") and "did not answer" in row["sampler"]
    # REST and the CLI get it from the same services
    assert "did not answer" in svc.get_campaign(ctx, svc.CLI_USER, "stuck")["sampler_error"]


def test_an_export_folder_goes_at_the_next_export_and_at_the_end(
    demo: gr.Blocks, ctx: svc.OfflineContext
) -> None:
    seed_easy_judgments(ctx.store, "easy", n=3, annotator="annotator")
    export = event(demo, "admin_export")
    folder_state = export.inputs[3]
    assert isinstance(folder_state, gr.State) and folder_state.time_to_live < 3600
    path, card, folder = call(demo, "admin_export", "admin", None, "preference", "jsonl", None)
    assert Path(path).is_file() and Path(path).parent == Path(folder) and card["counts"]["rows"] == 3
    _path2, _, folder2 = call(demo, "admin_export", "admin", None, "preference", "parquet", folder)
    assert not Path(folder).exists() and Path(folder2).is_dir()
    folder_state.delete_callback(folder2)  # what Gradio calls when the session's state expires
    assert not Path(folder2).exists()
    assert demo.delete_cache == (ui.CACHE_LIFETIME_S, ui.CACHE_LIFETIME_S)  # Gradio's copies


def test_download_folders_left_at_shutdown_are_removed(tmp_path: Path) -> None:
    folders = ExportFolders()
    kept = [folders.keep(tmp_path / name) for name in ("a", "b")]
    for folder in kept:
        folder.mkdir()
        (folder / "rows.jsonl").write_text("{}\n")
    folders.remove(kept[0])
    folders.remove_all()  # what build_ui arranges for the end of the process
    assert not any(folder.exists() for folder in kept)


def test_plots_escape_names_and_draw_every_series() -> None:
    rows = [{"version": "<b>v1</b>", "rating": 1010.0, "lower": 990.0, "upper": 1030.0}]
    svg = common.forest_plot(rows)
    assert "&lt;b&gt;v1" in svg and "<b>" not in svg and svg.count("<circle") == 1
    events = [{"event": "step", "stage": "dpo", "step": s, "loss": 1.0 / s, "kl": 0.1 * s} for s in (1, 2, 3)]
    charts = common.run_curves(events)
    assert charts.count("<svg") == 2 and "dpo loss" in charts and "dpo kl" in charts
    assert common.run_curves([]) == "<p>No curves yet.</p>"
    assert list(common.frame([], ["a", "b"]).columns) == ["a", "b"]
    assert list(common.frame([{"b": 1, "c": 2}], ["a", "b"], others=True).columns) == ["a", "b", "c"]
    assert isinstance(common.matrix({}), pd.DataFrame) and list(common.matrix({}).columns) == ["version"]


def test_the_label_tab_says_when_the_model_server_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from studio.config import Settings
    from studio.runtime import Studio
    from studio.serving.vllm_server import VLLMServer
    from studio.store import Store

    studio = Studio(Settings(data_dir=tmp_path, ui=False))
    studio.store = Store(studio.settings.db_path)
    try:
        seed_campaign(studio.store, "c1", prompts=2, n=2, overlap=1)
        studio.store.write("DELETE FROM tasks")  # nothing sampled yet
        make_users(studio.store, ("annotator", "annotator"))
        # the managed server as its watchdog leaves it while it brings vLLM back (not started here)
        server = VLLMServer(tmp_path, "base", tmp_path / "vllm.log", port=1)
        server.state, server.restarts = "restarting", 2
        # the base's managed server as the pool finds it (no pool is started here)
        monkeypatch.setattr(Studio, "server", property(lambda self: server))
        demo = build_ui(studio)
        out = call(demo, "label_next", "annotator", "c1")
        status = out[by_id(event(demo, "label_next"), "label-status")]
        assert "No task is ready: the model server is restarting (restart 2)" in status
        assert "tasks resume when it is back" in status
        server.state = "failed"
        server.last_error = "vLLM exited with code 1 during start-up"
        status = call(demo, "label_next", "annotator", "c1")[by_id(event(demo, "label_next"), "label-status")]
        assert "the model server is down: vLLM exited with code 1" in status
    finally:
        studio.store.close()


def test_the_leaderboard_shows_the_experts_table_to_admins_only(
    demo: gr.Blocks, ctx: svc.OfflineContext
) -> None:
    seed_battles(ctx.store, "duel", [("base", "other", "one", "two")])
    from studio import arena

    battle = arena.next_battle(ctx.store, "duel", "expert")
    arena.vote(ctx.store, "expert", battle["battle_id"], "a")
    fn = event(demo, "leaderboard")
    experts = next(i for i, c in enumerate(fn.outputs) if "Experts" in str(getattr(c, "label", "")))
    for role in ("annotator", "expert", "engineer"):
        shown = call(demo, "leaderboard", role, "duel", False)[experts]
        assert shown["visible"] is False and shown["value"].empty, role
    shown = call(demo, "leaderboard", "admin", "duel", False)[experts]
    assert shown["visible"] is True and list(shown["value"]["expert"]) == ["expert"]
