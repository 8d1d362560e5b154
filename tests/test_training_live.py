"""The loop on the packaged model through the running studio: label -> reward -> PPO -> DPO ->
hot-loaded versions -> blind re-battle against the parent, with lineage; and the Train tab."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from studio import users
from tests.conftest import LiveStudio
from tests.helpers import PASSWORD, login, seed_easy_judgments

pytestmark = pytest.mark.slow


def wait_run(api: httpx.Client, run_id: str, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen_progress = False
    while time.monotonic() < deadline:
        run = api.get(f"/runs/{run_id}").json()
        seen_progress |= bool(run["progress"].get("step"))
        if run["status"] in ("succeeded", "failed", "cancelled"):
            assert run["status"] == "succeeded", f"{run['reason']}\n{run['log'][-3000:]}"
            assert seen_progress or run["curves"], "no progress was ever reported"
            return run
        time.sleep(2)
    raise AssertionError(f"run {run_id} still {run['status']} after {timeout} s")


@pytest.fixture(scope="module")
def easy(live_studio: LiveStudio) -> str:
    seed_easy_judgments(live_studio.studio.store, "easy", n=40, annotator="easy-annotator")
    return "easy"


def test_reward_then_ppo_then_dpo_on_the_packaged_model(
    live_studio: LiveStudio, api: httpx.Client, easy: str
) -> None:
    # reward model: 30 training prompts, 10 held out; one epoch (8 steps) learns this easy
    # preference (held-out accuracy 1.0 measured), the recipe's two only cost the suite time
    one_epoch = {"train.num_train_epochs": 1}
    rm_run = api.post(
        "/runs", json={"stage": "reward", "campaigns": [easy], "held_out": 0.25, "overrides": one_epoch}
    ).json()
    assert rm_run["status"] == "queued", rm_run
    rm_run = wait_run(api, rm_run["id"])
    rm = rm_run["versions"][0]
    metrics = rm_run["metrics"]["reward"]
    assert metrics["heldout_pairs"] >= 8 and metrics["heldout_accuracy"] >= 0.9, metrics
    assert metrics["moved_tensors"] == metrics["trainable_tensors"]

    # the pipeline: PPO against the newest reward model, then DPO on the same snapshot. PPO rolls
    # out on every prompt, so the re-battle samples a prompt set marked for evaluation
    fresh = [{"prompt": f"Tell me one fact about the number {i}."} for i in range(6)]
    api.post("/prompt-sets/easy-eval/prompts", json={"records": fresh}).raise_for_status()
    pipe = api.post(
        "/runs",
        json={
            "stage": "ppo_then_dpo",
            "campaigns": [easy],
            "held_out": 0.25,
            "overrides": {"ppo.iterations": 2, "ppo.batch_size": 4, "ppo.max_new_tokens": 24, **one_epoch},
            "eval_prompt_set": "easy-eval",
        },
    ).json()
    assert pipe["reward_model"] == rm and pipe["stages"] == ["ppo", "dpo"]
    assert pipe["rebattle_prompts"] == f"heldout-{pipe['id']}" and pipe["notes"] == []
    pipe = wait_run(api, pipe["id"])
    ppo_version, dpo_version = pipe["versions"]
    ppo_m, dpo_m = pipe["metrics"]["ppo"], pipe["metrics"]["dpo"]
    assert ppo_m["iterations"] == 2 and ppo_m["moved_tensors"] == ppo_m["trainable_tensors"]
    gain = dpo_m["heldout_logp_margin_after"] - dpo_m["heldout_logp_margin_before"]
    assert gain > 5, dpo_m  # nats of log p(chosen) - log p(rejected) on held-out prompts
    assert dpo_m["eval_rewards/accuracies"] >= 0.9
    stages_logged = {e["stage"] for e in pipe["curves"] if e["event"] == "step"}
    assert stages_logged == {"ppo", "dpo"}

    # lineage: dpo <- ppo <- base, each with its run, snapshot and judgment count
    chain = api.get(f"/models/{dpo_version}/lineage").json()
    assert [s["version"] for s in chain] == [dpo_version, ppo_version, "base"]
    assert chain[0]["run"] == pipe["id"] and chain[0]["judgments"] == 40
    assert chain[0]["snapshot"] == pipe["snapshot_id"] == rm_run["snapshot_id"]  # same data, same snapshot

    # hot-loaded: the running vLLM serves the new version
    out = api.post(
        "/sample",
        json={
            "prompt": "Tell me one fact about tides.",
            "model": dpo_version,
            "max_tokens": 16,
            "temperature": 0,
        },
    ).json()
    assert out["generations"][0]["text"] and out["generations"][0]["model_version"] == dpo_version
    # and it went into a blind re-battle against its parent
    assert pipe["rebattle"] == f"rebattle-{dpo_version}"
    battle = live_studio.studio.store.query(
        "SELECT versions FROM battle_campaigns WHERE name = ?", [pipe["rebattle"]]
    )
    assert sorted(battle[0]["versions"]) == sorted([dpo_version, ppo_version])
    campaign = api.get(f"/campaigns/{pipe['rebattle']}").json()
    assert campaign["prompt_set"] == pipe["rebattle_prompts"]  # never a prompt trained on

    # not evaluated (this studio runs with auto_eval off): the gate refuses; forced, it is recorded
    refused = api.post(f"/models/{dpo_version}/promote", json={})
    assert refused.status_code == 422 and "no complete evaluation" in refused.json()["detail"]
    assert api.post(f"/models/{dpo_version}/promote", json={"force": True}).json()["version"] == dpo_version
    assert api.get("/models").json()["aliases"]["policy"] == dpo_version
    assert api.post("/models/base/promote", json={}).json()["version"] == "base"
    refused = api.post(f"/models/{rm}/promote", json={})
    assert refused.status_code == 422 and "reward model" in refused.json()["detail"]


def test_train_tab_starts_a_run_shows_progress_and_cancel_stops_it(
    live_studio: LiveStudio, easy: str, browser: Any
) -> None:
    store = live_studio.studio.store
    users.add_user(store, "ui-engineer", "engineer", PASSWORD)
    page = login(browser, live_studio.url, "ui-engineer")
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#advice:has-text('Advisor')", timeout=30_000)
    page.locator("#train-steps input").fill("500")
    page.locator("#start-run").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#run-status').innerText;"
        " return t.includes('running') && t.includes('/500') && t.includes('ETA'); }",
        timeout=180_000,
    )
    status = page.locator("#run-status").inner_text()
    assert "running" in status and "/500" in status and "ETA" in status
    run_id = next(word for word in status.split() if word.startswith("run-"))
    page.wait_for_selector("#run-curves svg", timeout=60_000)
    page.locator("#cancel-run").click()
    page.wait_for_selector("#run-status:has-text('cancelled')", timeout=60_000)
    run = store.query("SELECT status, reason, versions FROM runs WHERE id = ?", [run_id])[0]
    assert (
        run["status"] == "cancelled" and run["reason"] == "cancelled by ui-engineer" and run["versions"] == []
    )
    assert live_studio.studio.health()["studio"] == "ok"  # the studio kept serving
    page.close()
