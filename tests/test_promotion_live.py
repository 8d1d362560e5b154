"""Evaluation through the running studio's doors, on the packaged model (slow):

- `studio eval ... --json` over REST prints exactly the issue's shape; `POST /evals` answers at
  once with the record's id, `GET /evals/{id}` then has the same result; a sibling evaluated
  against the same parent reuses the parent's stored runs;
- the evaluation worker hands a finished evaluation against the parent to the gate, which
  records its decision;
- multiple choice reads every choice token of a prompt from one request, with the same
  log-probabilities as one forced token per request, on the base and on a LoRA version, batched.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from studio import promotion
from studio.evals import list_evals
from studio.users import local_token
from tests.conftest import LiveStudio
from tests.test_evals_live import base_folder

pytestmark = pytest.mark.slow


def random_lora(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def kids(live_studio: LiveStudio, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    names = ("wire-a", "wire-b")
    for seed, name in enumerate(names, start=11):
        folder = random_lora(base_folder(live_studio), tmp_path_factory.mktemp(name), seed)
        live_studio.studio.add_adapter(name, folder, source="test")
    return names


def wait(api: httpx.Client, eval_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = api.get(f"/evals/{eval_id}").json()
        if record["status"] not in ("queued", "running"):
            return record
        time.sleep(1)
    raise AssertionError(f"evaluation {eval_id} did not finish")


def test_studio_eval_over_rest_prints_the_exact_shape_and_siblings_reuse_the_parent(
    live_studio: LiveStudio, kids: tuple[str, str], api: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    from studio.cli import main

    data_dir = live_studio.settings.data_dir
    door = ["--data-dir", str(data_dir), "--url", live_studio.url, f"--token={local_token(data_dir)}"]
    quick = ["--against", "base", "--suite", "factual", "--suite", "refusal", "--limit", "4"]
    assert main(["eval", kids[0], *quick, "--json", *door]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"version", "against", "metrics", "gate"}
    assert (result["version"], result["against"]) == (kids[0], "base")
    assert set(result["metrics"]) == {"factual_accuracy", "refusal_rate", "safe_refusal_rate"}
    for metric in result["metrics"].values():
        assert set(metric) == {"version", "against", "delta", "ci"} and len(metric["ci"]) == 2
    assert set(result["gate"]) == {"passed", "reasons"} and result["gate"]["passed"] is False

    # REST: the record comes back at once, and reads the same result when done (stored runs reused)
    body = {"version": kids[0], "against": "base", "suites": ["factual", "refusal"], "limit": 4}
    started = time.monotonic()
    queued = api.post("/evals", json=body)
    assert queued.status_code == 200 and time.monotonic() - started < 10
    assert queued.json()["status"] in ("queued", "running") and queued.json()["id"].startswith("eval-")
    record = wait(api, queued.json()["id"])
    assert record["status"] == "succeeded" and record["result"] == result
    assert all(
        s["cached"] == {"version": True, "against": True} for s in record["details"]["suites"].values()
    )

    # a sibling against the same parent: only its own side runs
    assert main(["eval", kids[1], *quick, *door]) == 0
    table = capsys.readouterr().out
    assert "factual_accuracy" in table and "gate: did not pass" in table and "95% INTERVAL" in table
    sibling = list_evals(live_studio.studio.store, kids[1], limit=1)[0]
    for suite in sibling["details"]["suites"].values():
        assert suite["cached"] == {"version": False, "against": True}


def test_a_finished_evaluation_against_the_parent_reaches_the_gate(
    live_studio: LiveStudio, kids: tuple[str, str], api: httpx.Client
) -> None:
    store = live_studio.studio.store
    queued = api.post("/evals", json={"version": kids[1], "suites": ["factual"]}).json()  # every item
    assert queued["against"] == "base"  # its parent by default
    assert wait(api, queued["id"])["status"] == "succeeded"
    deadline = time.monotonic() + 30  # the worker calls the gate right after recording the result
    while not promotion.history(store, kids[1]) and time.monotonic() < deadline:
        time.sleep(0.2)
    (decision,) = [d for d in promotion.history(store, kids[1]) if d["eval_id"] == queued["id"]]
    assert decision["decided_by"] == "gate" and decision["action"] == "hold"
    assert "re-battle: none was opened against base" in decision["reasons"][0]
    assert any(r.startswith("refusal_rate: not measured") for r in decision["reasons"])
    card = api.get(f"/models/{kids[1]}/card").json()
    assert card["evaluation"]["id"] == queued["id"] and card["promotions"][0]["id"] == decision["id"]
    assert {m["metric"] for m in card["metrics"]} == {"factual_accuracy"}


def test_choice_tokens_read_in_one_request_match_one_forced_token_each(
    live_studio: LiveStudio, kids: tuple[str, str]
) -> None:
    backend = live_studio.studio.backend
    questions = [
        "Which planet is closest to the Sun?",
        "What is frozen water called?",
        "How many legs has a spider?",
    ]
    choices = [" Mercury", " Venus", " Ice", " Steam", " Eight", " Six", " Paris"]
    jobs = []
    for model in ("base", kids[0]):
        tokens = sorted({backend.tokenize(model, text=c)[0] for c in choices})
        for q in questions:
            jobs.append((model, backend.tokenize(model, text=f"Question: {q}\nAnswer:"), tokens))
    with ThreadPoolExecutor(16) as pool:  # batched together, base and LoRA mixed, as the runner sends them
        together = list(pool.map(lambda j: backend.next_token_logprobs(*j), jobs))
        one_by_one = list(pool.map(lambda j: {t: backend.token_logprob(j[0], j[1], t) for t in j[2]}, jobs))
    for (model, _, tokens), a, b in zip(jobs, together, one_by_one, strict=True):
        assert list(a) == tokens
        # vLLM on CPU sums in a different order when requests batch differently: a rare token's
        # log-probability moved by 0.007 nats in CI. A wrong token or position moves it by whole
        # nats, and the choice a multiple-choice item scores (the best token) must be the same.
        for t in tokens:
            assert a[t] == pytest.approx(b[t], abs=0.05), (model, t)
        assert max(a, key=a.get) == max(b, key=b.get), model
    assert backend.health()
