from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from studio.store import Store

COMMANDS = [
    [],
    ["serve"],
    ["import"],
    ["models"],
    ["models", "list"],
    ["sample"],
    ["users"],
    ["users", "add"],
    ["users", "list"],
    ["users", "passwd"],
    ["users", "token"],
    ["campaigns"],
    ["campaigns", "create"],
    ["campaigns", "list"],
    ["export"],
    ["leaderboard"],
    ["train"],
    ["runs"],
    ["runs", "list"],
    ["runs", "cancel"],
    ["models", "lineage"],
    ["models", "promote"],
]


def studio(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "studio")
def test_every_command_has_help(command: list[str]) -> None:
    out = studio(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: studio")
    assert "--help" in out.stdout


def test_serve_help_lists_its_options() -> None:
    text = studio("serve", "--help").stdout
    for option in ("--host", "--port", "--data-dir", "--model", "--backend-url"):
        assert option in text


def test_import_and_models_list_directly(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n')
    out = studio("import", str(prompts), "--set", "demo", "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 0, out.stderr
    assert "2 prompt(s) added, 1 duplicate(s) stored once" in out.stdout
    assert "line 3 repeats" in out.stdout

    listing = studio("models", "list", "--json", "--data-dir", str(tmp_path / "d"))
    assert listing.returncode == 0 and json.loads(listing.stdout) == []


def test_bad_import_exits_1_with_the_place_and_stores_nothing(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    out = studio("import", str(prompts), "--set", "demo", "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 1
    assert "p.jsonl line 2: field 'prompt' is missing" in out.stderr
    assert "Nothing was imported" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "d").exists() or Store.in_dir(tmp_path / "d").count("prompts") == 0


def test_locked_database_and_no_studio_says_what_to_do(tmp_path: Path) -> None:
    holder = Store.in_dir(tmp_path)
    # a stale record of a studio that no longer answers
    (tmp_path / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": 1}))
    out = studio("models", "list", "--data-dir", str(tmp_path))
    assert out.returncode == 1
    assert "is in use by process" in out.stderr and "studio serve" in out.stderr
    assert "no studio answers at http://127.0.0.1:9" in out.stderr
    assert "Traceback" not in out.stderr
    holder.close()


def test_sample_without_a_studio_says_how_to_start_one(tmp_path: Path) -> None:
    out = studio("sample", "hi", "--url", "http://127.0.0.1:9")
    assert out.returncode == 1
    assert "no studio answers at http://127.0.0.1:9" in out.stderr and "studio serve" in out.stderr


def test_serve_refuses_non_loopback_until_users_exist(tmp_path: Path) -> None:
    out = studio("serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert out.returncode == 1
    assert "--host 0.0.0.0" in out.stderr and "loopback" in out.stderr


def test_serve_with_a_model_folder_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    out = studio("serve", "--model", str(tmp_path / "m"), "--data-dir", str(tmp_path / "d"), "--port", "0")
    assert out.returncode == 1
    assert "config.json is missing" in out.stderr and "Traceback" not in out.stderr


def test_missing_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from studio.serving import vllm_server

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(vllm_server.ServingError) as err:
        vllm_server.require_vllm()
    assert "pip install -e '.[cpu]'" in str(err.value) and "'.[gpu]'" in str(err.value)


def test_train_queues_a_run_without_a_studio_and_runs_list_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from studio.campaigns import ensure_policy_alias
    from studio.cli import main
    from tests.helpers import seed_easy_judgments

    store = Store(tmp_path / "studio.duckdb")
    store.register_model_version("base", path="/models/base", content_hash="b" * 64, source="test")
    ensure_policy_alias(store, "base")
    seed_easy_judgments(store, n=4)
    store.close()
    data = ["--data-dir", str(tmp_path)]
    assert main(["train", "dpo", "--campaign", "easy", "--set", "train.beta=0.2", "--steps", "3", *data]) == 0
    out = capsys.readouterr().out
    assert "queued" in out and "it starts when the studio runs" in out
    assert main(["runs", "list", *data]) == 0
    listed = capsys.readouterr().out
    assert "dpo" in listed and "queued" in listed
    assert main(["train", "dpo", "--set", "beta", *data]) == 1
    assert "--set beta: write recipe overrides as KEY=VALUE" in capsys.readouterr().err
    assert main(["models", "promote", "ghost", *data]) == 1
    assert "model version 'ghost' is not registered" in capsys.readouterr().err
    store = Store(tmp_path / "studio.duckdb")
    run = store.query("SELECT overrides FROM runs")[0]
    assert json.loads(run["overrides"]) == {"dpo": {"train.beta": 0.2, "train.max_steps": 3}}
    store.close()
