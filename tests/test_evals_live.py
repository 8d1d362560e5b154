"""Evaluation on the packaged model through the running studio's vLLM (slow).

- every suite gives the same numbers twice with the same seed, and the second evaluation of the
  same pair reuses the stored runs;
- a LoRA version taught here to refuse harmless requests shows a large refusal_rate jump and
  fails the gate, the reason naming refusal_rate with its numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.evals import evaluate, get_eval, list_evals, run_items, start_eval
from studio.evals.suites import available_suites
from tests.conftest import LiveStudio

pytestmark = pytest.mark.slow

LIMIT = 3  # items per suite: enough to see that each repeats, short enough for CI


def base_folder(live: LiveStudio) -> Path:
    return Path(live.studio.store.model_version(live.studio.base_version)["path"])


@pytest.fixture(scope="module")
def other_version(live_studio: LiveStudio, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA version with small random weights: answers a little differently from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("random-lora")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_folder(live_studio))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    peft_model.save_pretrained(out)
    live_studio.studio.add_adapter("eval-random", out, source="test")
    return "eval-random"


def test_each_suite_gives_the_same_numbers_twice_with_the_same_seed(
    live_studio: LiveStudio, other_version: str
) -> None:
    store, backend = live_studio.studio.store, live_studio.studio.backend
    first = evaluate(store, backend, other_version, "base", seed=3, limit=LIMIT, use_cache=False)
    second = evaluate(store, backend, other_version, "base", seed=3, limit=LIMIT, use_cache=False)
    expected = {m for s in available_suites().values() for m in s.metrics}
    assert set(first["metrics"]) == expected
    assert first["metrics"] == second["metrics"]
    for metric in first["metrics"].values():
        assert set(metric) == {"version", "against", "delta", "ci"}
        assert metric["ci"][0] <= metric["delta"] <= metric["ci"][1]
    # the answers themselves repeat, item by item
    a, b = (get_eval(store, e["id"]) for e in list_evals(store, other_version, limit=2))
    for suite, info in a["details"]["suites"].items():
        left = run_items(store, info["version_run"])
        right = run_items(store, b["details"]["suites"][suite]["version_run"])
        assert [(i["item_id"], i["outputs"], i["score"]) for i in left] == [
            (i["item_id"], i["outputs"], i["score"]) for i in right
        ], suite
        assert len(left) == LIMIT
    # the same request again reuses the stored runs; a REST route can start one in the background
    record = start_eval(store, backend, other_version, "base", seed=3, limit=LIMIT, wait=True)
    assert record["status"] == "succeeded", record["error"]
    assert record["result"] == first
    assert all(all(s["cached"].values()) for s in record["details"]["suites"].values())
    # multiple choice kept its evidence: every choice's token log-probabilities
    mc = run_items(store, record["details"]["suites"]["capability"]["version_run"])[0]
    assert len(mc["logprobs"]) == 4 and all(c["logprobs"] for c in mc["logprobs"])


REFUSAL = "I'm sorry, but I can't help with that request."
TOPICS = [
    "volcanoes", "bread", "magnets", "glaciers", "comets", "coffee", "bridges", "clouds", "owls",
    "rivers", "violins", "chess", "salt", "kites", "penguins", "moss", "yeast", "coral", "windmills",
    "tunnels", "cheese", "sails", "gears", "maps",
]  # fmt: skip
TASKS = [
    "Tell me one fact about {}.",
    "Explain how {} work in two sentences.",
    "Write a short poem about {}.",
    "Give me a tip about {}.",
]


def train_refuser(base: Path, out: Path, steps: int = 20) -> Path:
    """A LoRA adapter taught, with a few SFT steps, to answer harmless requests with a refusal
    (20 steps of 8 reach a loss under 0.5 here: 43 s; 40 steps took 83 s)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    model = get_peft_model(model, config)
    rows = []
    for i, topic in enumerate(TOPICS):
        prompt = [{"role": "user", "content": TASKS[i % len(TASKS)].format(topic)}]
        head_text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        answer = [*prompt, {"role": "assistant", "content": REFUSAL}]
        full_text = tok.apply_chat_template(answer, tokenize=False)
        head = tok(head_text, add_special_tokens=False).input_ids
        full = tok(full_text, add_special_tokens=False).input_ids
        assert full[: len(head)] == head
        rows.append((full, [-100] * len(head) + full[len(head) :]))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        batch = [rows[(step * 8 + k) % len(rows)] for k in range(8)]
        width = max(len(ids) for ids, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    assert loss.item() < 0.5, f"the refusal was not learnt (loss {loss.item():.2f})"
    model.save_pretrained(out)
    return out


def test_a_version_taught_to_refuse_fails_the_gate_on_refusal_rate(
    live_studio: LiveStudio, tmp_path: Path
) -> None:
    studio = live_studio.studio
    adapter = train_refuser(base_folder(live_studio), tmp_path / "refuser")
    studio.add_adapter("refuser", adapter, source="test")
    result = evaluate(studio.store, studio.backend, "refuser", "base", suites=["refusal"], limit=32)
    refusal = result["metrics"]["refusal_rate"]
    assert refusal["delta"] >= 0.4, refusal  # most harmless requests are refused now
    assert refusal["ci"][0] > 0.05  # and the interval says it is no accident
    assert not result["gate"]["passed"]
    reason = next(r for r in result["gate"]["reasons"] if r.startswith("refusal_rate:"))
    assert f"{refusal['against']:.3f} -> {refusal['version']:.3f}" in reason
    assert "more than the allowed 5.0 points" in reason
    # the evidence: the refuser's stored answers are refusals, matched by the documented rule
    record = list_evals(studio.store, "refuser", limit=1)[0]
    items = run_items(studio.store, record["details"]["suites"]["refusal"]["version_run"])
    refused = [i for i in items if i["metric"] == "refusal_rate" and i["score"] == 1.0]
    assert refused and all(i["parsed"]["phrase"] for i in refused)
