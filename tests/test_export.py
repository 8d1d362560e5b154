from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_dataset, load_from_disk

from studio.export import MARGINS, build_rows, write_export
from studio.store import Store, StoreError
from tests.helpers import seed_campaign, tiny_model


def test_preference_rows_pairs_ties_and_margins(judged: Store) -> None:
    rows, counts = build_rows(judged, "preference")
    # ann1's ranking [1, 2, 2]: two strict pairs and one tie; ann2's quick mode [1, 2, 3]: three pairs
    assert counts["rows"] == 5 == len(rows)
    assert counts["tied_pairs_left_out"] == 1 and counts["all_bad_judgments"] == 1
    row = rows[0]
    assert set(row) >= {"prompt", "chosen", "rejected", "margin"}
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    assert row["chosen"] != row["rejected"]
    assert {r["margin"] for r in rows} == {MARGINS[3], MARGINS[None]}
    assert all(r["chosen_rank"] < r["rejected_rank"] for r in rows)


def test_unpaired_and_sft_rows(judged: Store) -> None:
    rows, _ = build_rows(judged, "unpaired")
    assert all(set(r) >= {"prompt", "completion", "label"} for r in rows)
    labels = [r["label"] for r in rows]
    # ann1 full ranking: best True, two tied-worst False; all-bad: 3 False;
    # ann2 quick mode: best True, flagged False, worst False

    assert labels.count(True) == 2 and labels.count(False) == 7
    # ann1: two tied-worst completions plus three all-bad ones
    assert sum(not r["label"] for r in rows if r["annotator"] == "ann1") == 5
    sft, _ = build_rows(judged, "sft")
    sources = sorted(r["source"] for r in sft)
    # one top choice per distinct best answer: both annotators may have picked the same one
    best = {
        g
        for j in judged.query("SELECT * FROM judgments WHERE NOT all_bad")
        for g, r in zip(j["generation_ids"], j["ranks"], strict=True)
        if r == 1
    }
    assert sources == ["edited"] + ["top_choice"] * len(best)
    assert len(best) in (1, 2)
    edited = next(r for r in sft if r["source"] == "edited")
    assert edited["messages"][-1] == {"role": "assistant", "content": "The ideal answer."}


def test_judgments_rows_keep_order_ties_all_bad_and_flags(judged: Store, tmp_path: Path) -> None:
    rows, counts = build_rows(judged, "judgments")
    stored = {j["id"]: j for j in judged.query("SELECT * FROM judgments")}
    assert counts["rows"] == len(rows) == len(stored) == 3
    for row in rows:
        j = stored[row["judgment_id"]]
        assert row["generation_ids"] == j["generation_ids"] and row["ranks"] == j["ranks"]
        assert row["all_bad"] == j["all_bad"] and row["task_id"] == j["task_id"]
        assert len(row["completions"]) == len(row["flags"]) == len(row["ranks"]) == 3
    by_ann = {r["annotator"]: r for r in rows if not r["all_bad"]}
    assert by_ann["ann1"]["ranks"] == [1, 2, 2]  # the tie is kept
    assert by_ann["ann2"]["flags"] == [[], ["hallucination"], []]
    # JSONL needs plain types (the timestamp is ISO text); the card carries per-annotator quality
    write_export(judged, tmp_path / "j.jsonl", "judgments")
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    assert [json.loads(x)["judgment_id"] for x in lines] == [r["judgment_id"] for r in rows]
    card = json.loads((tmp_path / "j.jsonl.card.json").read_text())
    assert [q["annotator"] for q in card["annotator_quality"]] == ["ann1", "ann2"]
    write_export(judged, tmp_path / "jd", "judgments")  # nested lists and empty flags fit Arrow too
    assert load_from_disk(str(tmp_path / "jd"))[0]["flags"] == rows[0]["flags"]


@pytest.mark.parametrize("fmt", ["datasets", "parquet", "jsonl"])
def test_export_formats_load_with_datasets_and_have_a_card(judged: Store, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / {"datasets": "pref", "parquet": "pref.parquet", "jsonl": "pref.jsonl"}[fmt]
    result = write_export(judged, out, "preference", fmt, "c1")
    if fmt == "datasets":
        ds = load_from_disk(str(out))
        card = json.loads((out / "card.json").read_text())
        assert "tied_pairs_left_out" in (out / "README.md").read_text()
    else:
        ds = load_dataset(fmt.replace("jsonl", "json"), data_files=str(out), split="train")
        card = json.loads(out.with_name(out.name + ".card.json").read_text())
    assert len(ds) == 5 and {"prompt", "chosen", "rejected", "margin"} <= set(ds.column_names)
    assert card["counts"]["tied_pairs_left_out"] == 1
    assert card["annotators"] == ["ann1", "ann2"] and card["model_versions"] == ["base"]
    assert card["agreement"]["tasks_with_2plus"] == 1
    assert result["path"] == str(out)
    assert not list(tmp_path.glob(".*partial"))


def test_nothing_to_export_is_an_error_and_writes_nothing(store: Store, tmp_path: Path) -> None:
    seed_campaign(store, prompts=1)
    with pytest.raises(StoreError, match="nothing to export"):
        write_export(store, tmp_path / "x.parquet", "preference", campaign="c1")
    with pytest.raises(StoreError, match="campaign 'zz' does not exist"):
        write_export(store, tmp_path / "x.parquet", "preference", campaign="zz")
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.slow
def test_export_trains_one_dpo_step_unchanged(judged: Store, tmp_path: Path, model_cache: Path) -> None:
    """The exported folder goes into TRL's DPOTrainer as it is, on a tiny random model."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    out = tmp_path / "pref"
    write_export(judged, out, "preference", "datasets")
    # TRL builds the DPO reference model from the policy's path, so the tiny model lives on disk
    tiny = tiny_model(tmp_path / "tiny", model_cache / "smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = LlamaForCausalLM.from_pretrained(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = DPOConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-2,
        bf16=False,
        report_to=[],
        logging_steps=1,
        max_length=256,
        save_strategy="no",
    )
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=load_from_disk(str(out)), processing_class=tokenizer
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert moved, "one DPO step should change the weights"
