"""Training without the model server: snapshots, every stage on a tiny random model, the runner."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from studio import training
from studio.campaigns import set_alias
from studio.export import build_rows
from studio.jobs import Runner, progress, register_stage
from studio.serving.vllm_server import live_group_members
from studio.store import Store, StoreError
from tests.helpers import easy_preference_rows, tiny_model, write_parquet
from trainers.dpo import next_budget_check

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
TINY_LORA = ["--lora.target_modules", "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


@pytest.fixture(scope="module")
def tiny(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", model_cache / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def pref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_parquet(easy_preference_rows(12), tmp_path_factory.mktemp("snap") / "pref.parquet")


def run_stage(
    stage: str, snapshot: Path, parent: Path, out: Path, *extra: str, launcher: list[str] | None = None
) -> dict[str, Any]:
    cmd = [
        *(launcher or [sys.executable]),
        "-m",
        f"trainers.{stage}",
        "--config",
        str(RECIPES / f"{stage}.yaml"),
        "--snapshot",
        str(snapshot),
        "--parent",
        str(parent),
        "--output",
        str(out),
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "meta.json").read_text())


def steps_logged(out: Path, key: str = "loss") -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e[key] for e in events if e["event"] == "step" and key in e]


def assert_all_moved(meta: dict[str, Any]) -> None:
    m = meta["metrics"]
    assert m["trainable_tensors"] > 0
    assert m["moved_tensors"] == m["trainable_tensors"], f"not trained: {m['unmoved']}"


# ---------------------------------------------------------------- each stage on a tiny random model


def test_reward_stage_logs_loss_moves_every_parameter_and_reports_accuracy(
    tiny: Path, pref: Path, tmp_path: Path
) -> None:
    meta = run_stage("reward", pref, tiny, tmp_path / "rm", "--train.max_steps", "3")
    assert len(steps_logged(tmp_path / "rm")) == 3
    assert_all_moved(meta)
    assert meta["stage"] == "reward" and meta["snapshot_rows"] == 12 and meta["parent_version"] == "tiny"
    assert 0 <= meta["metrics"]["heldout_accuracy"] <= 1 and meta["metrics"]["heldout_pairs"] > 0
    saved = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] and "score" in saved["modules_to_save"]


def test_dpo_stage_and_sft_stacked_on_it_give_one_servable_adapter(
    tiny: Path, pref: Path, tmp_path: Path
) -> None:

    dpo = run_stage(
        "dpo",
        pref,
        tiny,
        tmp_path / "dpo",
        "--train.max_steps",
        "3",
        "--train.loss_type",
        "robust",
        "--train.label_smoothing",
        "0.1",
        "--train.sft_weight",  # RPO: TRL must take the weighted list of losses it becomes
        "1.0",
        "--train.margin_budget",  # checked after steps 1 and 2 and never reached: TRL must get no such key
        "1e6",
    )
    assert len(steps_logged(tmp_path / "dpo")) == 3
    assert len(steps_logged(tmp_path / "dpo", "heldout_margin_gain")) == 2
    assert "margin_budget_step" not in dpo["metrics"]
    assert_all_moved(dpo)
    assert dpo["config"]["train"]["loss_type"] == "robust"
    assert dpo["config"]["train"]["sft_weight"] == 1.0
    assert (
        dpo["metrics"]["heldout_logp_margin_before"] is not None and "eval_rewards/margins" in dpo["metrics"]
    )

    sft_rows = [
        {"messages": r["prompt"] + r["chosen"], "judgment_id": r["judgment_id"]}
        for r in easy_preference_rows(8)
    ]
    sft_snap = write_parquet(sft_rows, tmp_path / "sft.parquet")
    sft = run_stage("sft", sft_snap, tmp_path / "dpo", tmp_path / "sft", "--train.max_steps", "3")
    assert_all_moved(sft)
    assert sft["stacked_on"] and sft["exact"] and sft["rank"] == 16
    assert json.loads((tmp_path / "sft" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tiny)


def test_the_margin_budget_checks_more_often_near_the_budget_and_stops_nearest_it() -> None:
    # full run 16's checks every 3rd step read 0.34, 0.96 and 1.73 nats against a budget of 1:
    # DPO went 0.73 past it and broke a guard
    assert next_budget_check(3, 0.34, (0, 0.0), 1.0, every=3) == 4  # 5.7 steps left: every step now
    assert next_budget_check(6, 0.96, (3, 0.34), 1.0, every=3) is None  # 0.2 steps left: stop here
    assert next_budget_check(6, 0.80, (3, 0.34), 1.0, every=3) == 7  # 1.3 left: check the next step
    assert next_budget_check(9, 1.73, (6, 0.96), 1.0, every=3) is None  # past the budget
    assert next_budget_check(8, 0.10, (0, 0.0), 1.0, every=8) == 16  # slow (64-step runs): every 8th
    assert next_budget_check(40, 0.80, (32, 0.64), 1.0, every=8) == 42  # 10 steps left: a quarter
    assert next_budget_check(16, 0.05, (8, 0.10), 1.0, every=8) == 24  # a fall: nothing to predict


def test_dpo_stops_once_the_held_out_margin_has_risen_by_its_budget(
    tiny: Path, pref: Path, tmp_path: Path
) -> None:
    # a learning rate that moves the tiny model's held-out margin within a step or two
    dpo = run_stage(
        "dpo",
        pref,
        tiny,
        tmp_path / "dpo",
        *("--train.max_steps", "8", "--train.learning_rate", "1e-2", "--train.margin_budget", "0.01"),
    )
    m = dpo["metrics"]
    events = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    checks = [(e["step"], e["heldout_margin_gain"]) for e in events if "heldout_margin_gain" in e]
    assert m["steps"] < 8 and m["margin_budget_step"] == m["steps"] == checks[-1][0], (m, checks)
    assert m["margin_budget_gain"] == checks[-1][1] > 0
    # the run kept to the schedule: each check came when the one before it said, the last said stop
    previous = (0, 0.0)
    for (step, gain), (next_step, _) in zip(checks, [*checks[1:], (None, None)], strict=True):
        assert next_budget_check(step, gain, previous, 0.01, every=1) == next_step, checks
        previous = (step, gain)
    last = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "end" and last["max_steps"] == m["steps"]  # progress shows it finished
    # a run stopped early is still a whole version: trained (LoRA's B first: A moves from step 2),
    # evaluated, saved
    assert m["moved_tensors"] > 0
    assert m["eval_loss"] > 0 and (tmp_path / "dpo" / "adapter_model.safetensors").is_file()


def test_lora_enabled_false_trains_all_weights_and_model_dtype_is_honoured(
    tiny: Path, tmp_path: Path
) -> None:
    import torch

    from trainers.common import load_model
    from trainers.configs import ModelSettings

    rows = [{"messages": r["prompt"] + r["chosen"]} for r in easy_preference_rows(6)]
    snap = write_parquet(rows, tmp_path / "sft.parquet")
    meta = run_stage(
        "sft", snap, tiny, tmp_path / "full", "--lora.enabled", "false", "--train.max_steps", "2"
    )
    assert meta["kind"] == "full" and meta["config"]["lora"]["enabled"] is False
    assert (tmp_path / "full" / "config.json").is_file()
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    assert_all_moved(meta)
    assert meta["metrics"]["trainable_tensors"] == len(list(load_model(tiny).parameters()))
    half = load_model(tiny, settings=ModelSettings(dtype="bfloat16"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_stacked_adapter_equals_parent_adapter_plus_new_one(tiny: Path, tmp_path: Path) -> None:
    """vLLM serves adapters over the base only: a child of an adapter is saved as one exact delta."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainers.common import load_model, save_policy_adapter

    def randomised(model: Any, seed: int) -> Any:
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # LoRA starts at B = 0; make both deltas non-zero
        return peft

    parent = randomised(AutoModelForCausalLM.from_pretrained(tiny), 1)
    parent.save_pretrained(tmp_path / "parent")
    child = randomised(load_model(tmp_path / "parent"), 2)  # trained over the merged parent
    info = save_policy_adapter(child, tmp_path / "parent", tmp_path / "child")
    assert info == {"rank": 8, "stacked_on": str(tmp_path / "parent"), "exact": True}
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "child").eval()
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        expected, got = child.eval()(input_ids=ids).logits, served(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny)(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_ppo_stage_on_a_tiny_model_moves_every_parameter(tiny: Path, pref: Path, tmp_path: Path) -> None:
    meta = run_stage(
        "ppo",
        pref,
        tiny,
        tmp_path / "ppo",
        "--reward-model",
        "rule:spaces",
        "--ppo.iterations",
        "2",
        "--ppo.max_new_tokens",
        "8",
        *TINY_LORA,
    )
    assert_all_moved(meta)
    events = steps_logged(tmp_path / "ppo", "policy_loss")
    assert len(events) == 2
    for key in ("reward", "kl", "entropy", "clipfrac", "value_loss", "response_length", "beta"):
        assert len(steps_logged(tmp_path / "ppo", key)) == 2, key
    assert (tmp_path / "ppo" / "value_head.safetensors").is_file()


def test_accelerate_launch_runs_a_stage_unchanged(tiny: Path, pref: Path, tmp_path: Path) -> None:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is installed with the package"
    meta = run_stage(
        "dpo",
        pref,
        tiny,
        tmp_path / "acc",
        "--train.max_steps",
        "2",
        launcher=[
            accelerate,
            "launch",
            "--num_processes",
            "1",
            "--cpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
    )
    assert_all_moved(meta)


def test_bad_inputs_are_named(tiny: Path, pref: Path, tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "trainers.dpo", *args], capture_output=True, text=True)
        assert done.returncode != 0
        return done.stderr

    base = ["--config", str(RECIPES / "dpo.yaml"), "--parent", str(tiny), "--output", str(tmp_path / "o")]
    assert "--snapshot /nope: no such file" in fails(*base, "--snapshot", "/nope")
    sft_snap = write_parquet([{"messages": [{"role": "user", "content": "x"}]}], tmp_path / "s.parquet")
    assert "needs column(s) prompt, chosen, rejected" in fails(*base, "--snapshot", str(sft_snap))
    assert "every --key needs a value" in fails(*base, "--snapshot", str(pref), "--train.max_steps")
    assert not (tmp_path / "o" / "meta.json").exists()


# ---------------------------------------------------------------- snapshots and the runner


class OfflineStudio:
    """The parts of Studio the runner's registration uses; adapters are registered, not served
    (the live tests hot-load into the real vLLM)."""

    def __init__(self, store: Store):
        self.store, self.task_sampler = store, None

    def add_adapter(self, name: str, path: Path, source: str, meta: dict, parent: str) -> dict:
        return self.store.register_model_version(
            name, path=str(path), content_hash=name, source=source, kind="lora", parent=parent, meta=meta
        )


@pytest.fixture()
def base_model_path(tiny: Path) -> str:
    return str(tiny)  # version `base` of `easy_judged` (conftest) is the tiny model: runs train it


@pytest.fixture()
def judged(easy_judged: Store) -> Store:
    return easy_judged


def test_snapshot_is_immutable_content_addressed_and_lists_its_judgments(
    judged: Store, tmp_path: Path
) -> None:
    a = training.take_snapshot(judged, tmp_path, "preference", ["easy"])
    b = training.take_snapshot(judged, tmp_path, "preference", ["easy"])
    assert a["id"] == b["id"] and a["content_hash"] == b["content_hash"] and a["rows"] == 10
    assert not os.stat(a["path"]).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    from trainers.common import read_snapshot, rows_hash

    assert rows_hash(read_snapshot(Path(a["path"]))) == a["content_hash"]
    ids = {r["judgment_id"] for r in judged.query("SELECT judgment_id FROM snapshot_judgments")}
    assert ids == {r["id"] for r in judged.query("SELECT id FROM judgments")}
    strong = training.take_snapshot(
        judged, tmp_path, "preference", ["easy"], annotators=["ann1"], min_strength=3
    )
    assert strong["id"] == a["id"]  # every judgment passes these filters: the same rows, the same snapshot
    with pytest.raises(StoreError, match=r"nothing to train on: .*annotators bob"):
        training.take_snapshot(judged, tmp_path, "preference", ["easy"], annotators=["bob"])
    with judged.transaction() as cur:
        cur.execute("UPDATE judgments SET strength = 1 WHERE id = (SELECT min(id) FROM judgments)")
    weaker = training.take_snapshot(judged, tmp_path, "preference", ["easy"], min_strength=2)
    assert weaker["rows"] == 9 and weaker["id"] != a["id"] and weaker["filter"]["min_strength"] == 2
    with pytest.raises(StoreError, match="campaign 'nope' does not exist"):
        training.take_snapshot(judged, tmp_path, "preference", ["nope"])
    with judged.transaction() as cur:
        cur.execute("UPDATE judgments SET all_bad = true")  # all-bad judgments give no preference pairs
    with pytest.raises(StoreError, match=r"nothing to train on: campaign.s. easy has no preference rows"):
        training.take_snapshot(judged, tmp_path, "preference", ["easy"])


def test_submit_refuses_bad_requests_and_stores_nothing(judged: Store, tmp_path: Path) -> None:
    judged.register_model_version("rm0", path="/rm", content_hash="r" * 64, source="t", kind="reward")
    cases = [
        ({"stage": "dpo", "parent": "rm0"}, "'rm0' is a reward model"),
        ({"stage": "ppo", "reward_model": "base"}, "reward_model 'base' is not a reward model"),
        ({"stage": "rlhf"}, "stage 'rlhf': use one of"),
        ({"stage": "dpo", "recipe": "nope"}, "recipe 'nope': not found"),
        ({"stage": "dpo", "held_out": 1.5}, "held_out 1.5"),
        ({"stage": "dpo", "parent": "ghost"}, "model version 'ghost' is not registered"),
        ({"stage": "dpo", "overrides": {"x; rm -rf": 1}}, "override"),
        (
            {"stage": "dpo", "overrides": {"train.lerning_rate": 1e-4}},
            r"override: unknown setting 'train.lerning_rate' for stage dpo; did you mean "
            r"'train.learning_rate'\? valid: .*train\.\{learning_rate, ",
        ),
        ({"stage": "dpo", "overrides": {"train.learning_rate": "fast"}}, "expected a number"),
        (
            {"stage": "reward", "overrides": {"train.beta": 0.2}},
            "unknown setting 'train.beta' for stage reward",
        ),
        (
            {"stage": "ppo_then_dpo", "overrides": {"train.beta": 0}},
            r"dpo: override: train.beta 0.0: must be",
        ),
    ]
    for body, message in cases:
        with pytest.raises(StoreError, match=message):
            training.submit_run(judged, tmp_path, created_by="eng", **body)
    assert judged.count("runs") == 0 and judged.count("snapshots") == 0
    with judged.transaction() as cur:
        cur.execute("DELETE FROM model_versions WHERE name = 'rm0'")
    with pytest.raises(StoreError, match="ppo needs a reward model"):
        training.submit_run(judged, tmp_path, created_by="eng", stage="ppo")
    judged.register_model_version("rm1", path="/rm", content_hash="s" * 64, source="t", kind="reward")
    with pytest.raises(StoreError, match="'rm1' is a reward model; only policy versions"):
        set_alias(judged, "policy", "rm1")


def wait_for(store: Store, run_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = training.get_run(store, run_id)
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not finish: {training.get_run(store, run_id)}")


def test_runner_trains_registers_with_lineage_and_keeps_crashes_and_cancels_contained(
    judged: Store, tmp_path: Path
) -> None:
    runner = Runner(judged, tmp_path, lambda *a: register_stage(OfflineStudio(judged), *a))
    runner.start()
    try:
        ok = training.submit_run(
            judged, tmp_path, stage="reward", created_by="eng", campaigns=["easy"], steps=2
        )
        crash = training.submit_run(  # valid settings, but no module of the model has that name
            judged, tmp_path, stage="dpo", created_by="eng", overrides={"lora.target_modules": ["nope_proj"]}
        )
        slow = training.submit_run(judged, tmp_path, stage="dpo", created_by="eng", steps=500)
        runner.poke()
        done = wait_for(judged, ok["id"])
        assert done["status"] == "succeeded", done["reason"]
        rm = done["versions"][0]
        version = judged.model_version(rm)
        assert version["kind"] == "reward" and version["parent"] == "base"
        chain = training.lineage(judged, rm)
        assert chain[0]["run"] == ok["id"] and chain[0]["snapshot"] == ok["snapshot_id"]
        assert chain[0]["judgments"] == 10 and chain[-1]["version"] == "base"
        linked = judged.query("SELECT DISTINCT version FROM lineage WHERE run_id = ?", [ok["id"]])
        assert [r["version"] for r in linked] == [rm]

        failed = wait_for(judged, crash["id"])
        assert failed["status"] == "failed" and "stage dpo exited with code" in failed["reason"]
        assert failed["versions"] == []

        # the long run starts; cancel it while it trains
        deadline = time.monotonic() + 120
        while training.get_run(judged, slow["id"])["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        while not progress(training.get_run(judged, slow["id"])).get("step") and time.monotonic() < deadline:
            time.sleep(0.2)
        info = progress(training.get_run(judged, slow["id"]))
        assert info["max_steps"] == 500 and info["eta_s"] > 0
        trainer_group = runner.process_group(slow["id"])
        assert trainer_group is not None
        runner.cancel(slow["id"], "cancelled by eng")
        cancelled = wait_for(judged, slow["id"], 60)
        assert cancelled["status"] == "cancelled" and cancelled["reason"] == "cancelled by eng"
        assert cancelled["versions"] == []
        assert {v["name"] for v in judged.model_versions()} == {"base", rm}
    finally:
        runner.stop()
    leftovers = live_group_members(trainer_group)  # this test's trainer only, not the machine's
    assert not leftovers, "a cancelled trainer process is still alive"


def test_queued_run_cancels_at_once_and_a_dead_studio_fails_its_running_run(
    judged: Store, tmp_path: Path
) -> None:
    run = training.submit_run(judged, tmp_path, stage="dpo", created_by="eng", steps=1)
    with judged.transaction() as cur:  # as if the studio died mid-run
        cur.execute("UPDATE runs SET status = 'running' WHERE id = ?", [run["id"]])
    queued = training.submit_run(judged, tmp_path, stage="dpo", created_by="eng", steps=1)
    runner = Runner(judged, tmp_path, lambda *a: "never", max_parallel=0)
    runner.start()
    try:
        assert training.get_run(judged, run["id"])["status"] == "failed"
        assert "studio stopped" in training.get_run(judged, run["id"])["reason"]
        assert runner.cancel(queued["id"], "changed my mind")["status"] == "cancelled"
        with pytest.raises(StoreError, match="already cancelled"):
            runner.cancel(queued["id"], "again")
    finally:
        runner.stop()


def test_advisor_says_why(judged: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    advice = training.advise(judged)
    assert advice["stage"] == "dpo" and "no reward model" in advice["why"]
    # the ten pairs the trainers would get (the export's rows), said first
    pairs = len(build_rows(judged, "preference")[0])
    assert advice["signals"]["ranked_pairs"] == pairs == 10
    assert advice["why"].startswith(f"only {pairs} ranked pairs") and "label more" in advice["why"]
    judged.register_model_version(
        "rm1",
        path="/x",
        content_hash="r" * 64,
        source="test",
        kind="reward",
        parent="base",
        meta={"metrics": {"heldout_accuracy": 0.95}},
    )
    with judged.transaction() as cur:
        cur.execute("""UPDATE judgments SET flags = '{"g": ["unsafe"]}'""")
    advice = training.advise(judged)
    assert (
        advice["stage"] == "ppo_then_dpo"
        and "95%" in advice["why"]
        and advice["signals"]["unsafe_rate"] > 0.1
    )
    monkeypatch.setattr(training, "FEW_PAIRS", 10)  # enough pairs: the stage's reason alone
    assert "ranked pairs" not in training.advise(judged)["why"]
