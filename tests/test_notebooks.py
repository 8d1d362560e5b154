"""The analysis notebooks in notebooks/: committed without outputs, and each runs top to bottom
(papermill, a kernel on this interpreter) on data made here through the studio's own functions,
ending with its own assertion. A notebook whose final check should fail does fail."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest

from studio import arena, cli, labeling, training
from studio.campaigns import ensure_policy_alias
from studio.export import write_export
from studio.jobs import Runner, register_stage
from studio.labeling import Submission
from studio.store import Store
from tests.helpers import make_users, seed_battles, seed_campaign, seed_easy_judgments, tiny_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = {"annotator_agreement.ipynb", "leaderboard.ipynb", "run_report.ipynb"}


# ---------------------------------------------------------------- the committed files


def test_committed_notebooks_have_no_outputs_a_parameters_cell_and_end_with_a_check() -> None:
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.name for p in paths} >= EXPECTED
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        for i, cell in enumerate(code):
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} code cell {i} holds outputs: clear them before committing"
            )
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: first code cell untagged"
        assert "assert " in code[-1].source, f"{path.name}: the last cell should check what it computed"
        assert nb.metadata["kernelspec"]["name"] == "python3"


# ---------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `python3` kernel spec on this interpreter, found before any user-level one, and a kernel
    that imports this checkout's studio package."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3",
                "language": "python",
            }
        )
    )
    return root


@pytest.fixture()
def run_notebook(kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import os

    monkeypatch.setenv("JUPYTER_PATH", str(kernel))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def run(name: str, **parameters: Any) -> nbformat.NotebookNode:
        """Execute into a temporary copy: the committed notebook never gets outputs."""
        import papermill

        out = run.out_dir / name
        out.parent.mkdir(exist_ok=True)
        papermill.execute_notebook(
            str(NOTEBOOKS / name),
            str(out),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(tmp_path),
            progress_bar=False,
            execution_timeout=600,
        )
        return nbformat.read(out, as_version=4)

    run.out_dir = tmp_path / "executed"  # papermill writes there even when a cell fails
    return run


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )


def assert_final_check_fails(run_notebook: Any, name: str, **parameters: Any) -> nbformat.NotebookNode:
    """Run a notebook whose last cell must fail its check; returns what it ran up to there."""
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as failed:
        run_notebook(name, **parameters)
    assert failed.value.ename == "AssertionError", failed.value
    executed = nbformat.read(run_notebook.out_dir / name, as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code[-1].outputs and code[-1].outputs[-1].get("ename") == "AssertionError"
    return executed


# ---------------------------------------------------------------- annotator agreement


@pytest.fixture()
def judgments_export(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Three annotators on every task: one prefers longer answers, one picks in the order shown
    (and calls one task all bad), one ties the two shorter answers. Exported as `judgments`."""
    random.seed(7)  # the order each annotator is shown
    store = Store(tmp_path / "studio-data" / "studio.duckdb")
    make_users(store, ("longer", "annotator"), ("first", "annotator"), ("ties", "annotator"))
    seed_campaign(store, "agree", prompts=8, n=3, overlap=3)
    for name in ("longer", "first", "ties"):
        done = 0
        while (task := labeling.next_task(store, "agree", name)) is not None:
            lengths = [len(c["text"]) for c in task["completions"]]
            by_length = [1 + sorted(lengths, reverse=True).index(n) for n in lengths]
            if name == "longer":
                sub = Submission(task["assignment_id"], ranks=by_length, strength=2)
            elif name == "first":
                sub = Submission(task["assignment_id"], ranks=[1, 2, 3], all_bad=done == 3)
            else:
                sub = Submission(task["assignment_id"], ranks=[min(r, 2) for r in by_length])
            labeling.submit(store, name, sub)
            done += 1
    path = tmp_path / "studio-data" / "exports" / "judgments.parquet"
    card = write_export(store, path, "judgments")
    store.close()
    return path, card


def test_annotator_agreement_notebook_matches_studio_quality(
    run_notebook: Any, judgments_export: tuple[Path, dict[str, Any]]
) -> None:
    path, card = judgments_export
    # the data has the biases it was built with, so the notebook's comparison is not between Nones
    quality = {q["annotator"]: q for q in card["annotator_quality"]}
    assert quality["first"]["position_bias_first_shown"] == 1.0
    assert quality["longer"]["length_bias_longer"] == 1.0 == quality["ties"]["length_bias_longer"]
    assert card["agreement"]["units"] == 24 and -1 <= card["agreement"]["krippendorff_alpha"] < 1
    nb = run_notebook("annotator_agreement.ipynb", export_path=str(path))
    assert "checked against studio.quality" in printed(nb)

    tampered = json.loads(path.with_name(path.name + ".card.json").read_text())
    tampered["annotator_quality"][0]["position_bias_first_shown"] = 0.123
    path.with_name(path.name + ".card.json").write_text(json.dumps(tampered))
    assert_final_check_fails(run_notebook, "annotator_agreement.ipynb", export_path=str(path))


# ---------------------------------------------------------------- leaderboard


def test_leaderboard_notebook_rates_a_battle_log_written_by_studio_arena_battles(
    run_notebook: Any, tmp_path: Path
) -> None:
    """Three versions, every pair 16 times with sides alternating, judged by two scripted experts
    whose preference follows a Bradley-Terry model (strengths 0, 1, 2), with a few ties and
    both-bad votes. The log is written by `studio arena battles --out`."""
    data = tmp_path / "studio-data"
    store = Store(data / "studio.duckdb")
    make_users(store, ("exp1", "expert"), ("exp2", "expert"))
    strength = {"base": 0.0, "dpo-a": 1.0, "dpo-b": 2.0}
    pairs = [("base", "dpo-a"), ("base", "dpo-b"), ("dpo-a", "dpo-b")]
    outcomes = [
        (x, z, f"answer {i} of one side", f"another answer {i}") if i % 2 else (z, x, f"one {i}", f"two {i}")
        for x, z in pairs
        for i in range(16)
    ]
    ids = seed_battles(store, "duel", outcomes, versions=tuple(strength))
    truth = dict(zip(ids, outcomes, strict=True))
    rng = random.Random(3)
    for n in range(len(ids)):
        expert = ("exp1", "exp2")[n % 2]
        battle = arena.next_battle(store, "duel", expert)
        va, vb = truth[battle["battle_id"]][:2]
        draw = rng.random()
        if draw < 0.08:
            winner = "tie" if draw < 0.05 else "both_bad"
        else:
            p_a = 1 / (1 + math.exp(strength[vb] - strength[va]))
            winner = "a" if rng.random() < p_a else "b"
        arena.vote(store, expert, battle["battle_id"], winner)
    store.close()
    log = data / "exports" / "battles.jsonl"
    assert cli.main(["arena", "battles", "--out", str(log), "--data-dir", str(data)]) == 0
    assert len(log.read_text().splitlines()) == len(ids)

    nb = run_notebook("leaderboard.ipynb", battles_path=str(log), rounds=50)
    out = printed(nb)
    assert f"checked: {len(ids)} battles, 3 versions" in out and "every pair met equally often" in out


# ---------------------------------------------------------------- run report


class OfflineStudio:
    """What the runner's registration uses of Studio: adapters are registered, not served."""

    def __init__(self, store: Store):
        self.store, self.task_sampler = store, None

    def add_adapter(self, name: str, path: Path, source: str, meta: dict, parent: str) -> dict:
        return self.store.register_model_version(
            name, path=str(path), content_hash=name, source=source, kind="lora", parent=parent, meta=meta
        )


def handmade_stage(store: Store, data: Path, tiny: Path, model_cache: Path) -> str:
    """A finished full-weights SFT stage as trainers/common.py writes one (Reporter, write_meta)
    over a real snapshot, registered as the runner registers it; its weights are a tiny model."""
    import argparse

    from studio.jobs import version_name
    from trainers import configs
    from trainers.common import Reporter, read_snapshot, write_meta

    run_id = "run-handmade00"
    folder = data / "runs" / run_id / "1-sft"
    tiny_model(folder, model_cache / "smollm2-135m-instruct", seed=1)
    snapshot = training.take_snapshot(store, data, "sft", ["easy"], created_by="eng")
    reporter = Reporter(folder, "sft", max_steps=4)
    for step in range(1, 5):
        reporter.step(step, loss=2.0 / step, mean_token_accuracy=0.1 * step, learning_rate=1e-4)
    reporter.emit("end", step=4, train_loss=1.0)
    args = argparse.Namespace(parent=tiny, snapshot=Path(snapshot["path"]), parent_version="base")
    rows = read_snapshot(Path(snapshot["path"]))
    config = configs.validate("sft", ROOT / "data" / "recipes" / "sft.yaml", {"lora.enabled": False})
    meta = write_meta(folder, "sft", args, config, rows, {"train_loss": 1.0}, {"kind": "full"})
    name = version_name({"id": run_id}, "sft")
    store.register_model_version(
        name,
        path=str(folder.resolve()),
        content_hash="s" * 64,
        source=f"run:{run_id}",
        parent="base",
        meta=meta,
    )
    return name


@pytest.fixture()
def trained(tmp_path: Path, model_cache: Path) -> dict[str, Any]:
    """A data dir whose DPO version was trained for real by the studio's runner (2 steps on a tiny
    model) on top of a hand-made SFT stage on the base: a lineage of three versions."""
    data = tmp_path / "studio-data"
    tiny = tiny_model(tmp_path / "tiny", model_cache / "smollm2-135m-instruct")
    store = Store(data / "studio.duckdb")
    store.register_model_version("base", path=str(tiny), content_hash="t" * 64, source="test")
    ensure_policy_alias(store, "base")
    seed_easy_judgments(store, n=12)
    parent = handmade_stage(store, data, tiny, model_cache)
    runner = Runner(store, data, lambda *a: register_stage(OfflineStudio(store), *a))
    runner.start()
    try:
        run = training.submit_run(
            store, data, stage="dpo", created_by="eng", parent=parent, campaigns=["easy"], steps=2
        )
        runner.poke()
        deadline = time.monotonic() + 600
        while (run := training.get_run(store, run["id"]))["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(0.5)
    finally:
        runner.stop()
    assert run["status"] == "succeeded", run["reason"]
    version = run["versions"][0]
    chain = [step["version"] for step in training.lineage(store, version)]
    store.close()
    return {"data": data, "run": run, "version": version, "parent": parent, "chain": chain}


def eval_result(version: str, against: str) -> dict[str, Any]:
    """`studio eval VERSION --against PARENT --json`'s shape (issue 11) with made-up means, each
    number rounded to 6 decimals as the engine rounds them (so a delta may be 1e-6 off)."""
    means = {"win_rate_vs_parent": (0.64, 0.5), "property_rate": (0.4, 0.25), "refusal": (0.1000006, 4e-7)}
    metrics = {}
    for name, (v, a) in means.items():
        d = v - a
        metrics[name] = {
            "version": round(v, 6),
            "against": round(a, 6),
            "delta": round(d, 6),
            "ci": [round(d - 0.1, 6), round(d + 0.1, 6)],
        }
    assert metrics["refusal"]["delta"] != metrics["refusal"]["version"] - metrics["refusal"]["against"]
    return {
        "version": version,
        "against": against,
        "metrics": metrics,
        "gate": {"passed": False, "reasons": ["refusal: +0.10 is past the tolerance of +0.05"]},
    }


def test_run_report_notebook_shows_curves_deltas_and_the_lineage_of_a_real_run(
    run_notebook: Any, trained: dict[str, Any], tmp_path: Path
) -> None:
    data, version, parent = trained["data"], trained["version"], trained["parent"]
    assert trained["chain"] == [version, parent, "base"]
    eval_path = tmp_path / "eval.json"
    eval_path.write_text(json.dumps(eval_result(version, parent)))
    nb = run_notebook(
        "run_report.ipynb", data_dir=str(data), run=trained["run"]["id"], eval_path=str(eval_path)
    )
    out = printed(nb)
    # the lineage read from meta.json files is the one the studio's database records
    assert (
        "  <-  ".join(f"{v} ({s})" for v, s in zip(trained["chain"], ["dpo", "sft", "base"], strict=True))
        in out
    )
    assert "lineage of 3 versions down to base, 3 evaluation deltas" in out

    # defaults pick the newest finished stage; a delta that is not version - against fails the check
    wrong = eval_result(version, parent)
    wrong["metrics"]["property_rate"]["delta"] = 0.5
    eval_path.write_text(json.dumps(wrong))
    failed = assert_final_check_fails(
        run_notebook, "run_report.ipynb", data_dir=str(data), eval_path=str(eval_path)
    )
    assert f"version {version}:" in printed(failed)
