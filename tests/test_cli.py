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
