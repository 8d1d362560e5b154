from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio.store import Store


def commands(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and sub-command of the parser, so a new one is tested without a list to update."""
    from studio.cli import build_parser

    parser = parser or build_parser()
    found = [list(path)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, (*path, name))
    return found


COMMANDS = commands()


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


def seed_studio_data(data_dir: Path) -> str:
    """A studio's data: base and a LoRA child 'other' with policy -> other, a judged campaign
    'easy', an admin; returns the admin's token."""
    from studio.campaigns import ensure_policy_alias, set_alias
    from studio.users import add_user
    from tests.helpers import seed_easy_judgments

    store = Store(data_dir / "studio.duckdb")
    store.register_model_version("base", path="/models/base", content_hash="b" * 64, source="test")
    store.register_model_version(
        "other", path="/models/other", content_hash="o" * 64, source="test", kind="lora", parent="base"
    )
    ensure_policy_alias(store, "base")
    set_alias(store, "policy", "other")
    seed_easy_judgments(store, n=4)
    token = add_user(store, "boss", "admin", "password123")
    store.close()
    return token


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from studio.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# what both ways must print alike (the client answers the REST API's shapes in-process too)
LISTINGS = [
    ["campaigns", "list"],
    ["models", "list", "--json"],
    ["models", "lineage", "other", "--json"],
    ["users", "list"],
    ["runs", "list"],
    ["leaderboard", "--json"],
]


def test_commands_in_process_then_over_rest_say_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import NoModelStudio

    token = seed_studio_data(tmp_path)
    data = ["--data-dir", str(tmp_path)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')

    # no studio: the CLI opens the database itself
    assert run_cli(capsys, "import", str(prompts), "--set", "s1", *data)[1].startswith("prompt set 's1': 2")
    code, out, _ = run_cli(capsys, "campaigns", "create", "c1", "--prompt-set", "s1", "-n", "3", *data)
    assert code == 0 and "n=3, overlap=1" in out  # the spec's overlap; -n as given
    code, out, _ = run_cli(
        capsys, "arena", "create", "duel", "--prompt-set", "s1", "--versions", "base,other", *data
    )
    assert code == 0 and "budget 200 votes" in out
    code, out, _ = run_cli(capsys, "models", "rollback", *data)
    assert (code, out) == (0, "'policy' now points at base (rolled back from other)\n")
    code, _, err = run_cli(capsys, "models", "promote", "other", *data)  # not evaluated yet: the gate refuses
    assert (
        code == 1 and "its gate did not pass: evaluation: no complete evaluation" in err and "--force" in err
    )
    code, out, _ = run_cli(capsys, "models", "promote", "other", "--force", *data)
    assert code == 0 and out.startswith(
        "'policy' now points at other\nforced (recorded): the gate did not pass:"
    )
    code, out, _ = run_cli(capsys, "train", "dpo", "--campaign", "easy", *data)
    assert code == 0 and "queued: it starts when the studio runs" in out
    run_id = out.split()[0]
    code, out, err = run_cli(capsys, "runs", "cancel", run_id, *data)
    assert code == 1 and "needs the training runner" in err and "studio serve" in err
    code, _, err = run_cli(capsys, "sample", "hi", *data)
    assert code == 1 and "sampling needs the model server" in err and "studio serve" in err
    export = tmp_path / "out" / "easy.jsonl"
    code, out, _ = run_cli(capsys, "export", "--out", str(export), "--campaign", "easy", *data)
    assert code == 0 and "as jsonl" in out and len(export.read_text().splitlines()) == 4
    code, out, _ = run_cli(capsys, "users", "token", "boss", *data)
    assert code == 0 and "new REST token for 'boss'" in out
    token = out.rsplit(" ", 1)[1].strip()
    offline = {" ".join(c): run_cli(capsys, *c, *data) for c in LISTINGS}
    assert all(code == 0 for code, _, _ in offline.values()), offline

    with NoModelStudio(tmp_path) as served:
        # --token=: a token may start with '-'
        rest = [*data, "--url", served.url, f"--token={token}"]
        capsys.readouterr()  # the studio's "ready" line
        for command in LISTINGS:
            assert run_cli(capsys, *command, *rest) == offline[" ".join(command)], command
        code, out, _ = run_cli(capsys, "train", "dpo", "--campaign", "easy", "--steps", "2", *rest)
        assert code == 0 and "queued" in out and "it starts when" not in out  # a studio runs
        run_id = out.split()[0]
        code, out, _ = run_cli(capsys, "runs", "cancel", run_id, *rest)
        assert code == 0 and "cancelled" in out and "reason: cancelled by boss" in out
        code, out, _ = run_cli(capsys, "runs", "show", run_id, *rest)
        assert json.loads(out)["overrides"] == {"dpo": {"train.max_steps": 2}}
        code, out, _ = run_cli(capsys, "models", "rollback", *rest)
        assert (code, out) == (0, "'policy' now points at base (rolled back from other)\n")
        code, _, err = run_cli(capsys, "sample", "hi", *rest)
        assert code == 1 and "(HTTP 503)" in err and "sampling needs the model server" in err
        export = tmp_path / "out" / "rest.parquet"
        code, out, _ = run_cli(capsys, "export", "--out", str(export), *rest)
        assert code == 0 and "as parquet" in out and export.stat().st_size > 0
        code, _, err = run_cli(capsys, "arena", "battles", "--out", str(tmp_path / "b.jsonl"), *rest)
        assert code == 1 and "no votes yet" in err
        code, _, err = run_cli(capsys, "campaigns", "create", "c1", "--prompt-set", "s1", *rest)
        assert code == 1 and "(HTTP 422): campaign 'c1' already exists" in err

        # a CLI process finds the studio holding the database through its server.json
        env = {**os.environ, "STUDIO_TOKEN": token}
        locked = studio("users", "token", "boss", *data, env=env)
        assert locked.returncode == 1 and "Changing credentials needs the studio stopped." in locked.stderr
        listed = studio("campaigns", "list", *data, env=env)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout == offline["campaigns list"][1]
        refused = studio("campaigns", "list", *data, env={**os.environ, "STUDIO_TOKEN": "wrong"})
        assert refused.returncode == 1 and "(HTTP 401)" in refused.stderr


def test_backup_while_the_studio_runs_and_restore(tmp_path: Path) -> None:
    """`studio backup` through a running studio (it holds the file) while judgments are written,
    and on the database itself; the copy opens as a studio database with everything in it."""
    import threading

    from studio import labeling
    from studio.labeling import Submission
    from tests.conftest import NoModelStudio
    from tests.helpers import make_users, seed_campaign

    data = tmp_path / "data"
    with NoModelStudio(data) as running:
        store = running.studio.store
        seed_campaign(store, "c1", prompts=300, n=2, overlap=1)
        token = make_users(store, ("ann", "annotator"), ("boss", "admin"))["boss"]
        done = threading.Event()

        def judge() -> None:  # writes going on during the backup
            while not done.is_set() and (task := labeling.next_task(store, "c1", "ann")) is not None:
                labeling.submit(store, "ann", Submission(task["assignment_id"], ranks=[1, 2]))

        writer = threading.Thread(target=judge)
        writer.start()
        env = {**os.environ, "STUDIO_TOKEN": token}
        out = studio("backup", str(tmp_path / "copy.duckdb"), "--data-dir", str(data), env=env)
        done.set()
        writer.join()
        assert out.returncode == 0, out.stderr
        assert "backed up the database to" in out.stdout
        again = studio("backup", str(tmp_path / "copy.duckdb"), "--data-dir", str(data), env=env)
        assert again.returncode == 1 and "already exists" in again.stderr
        final = store.count("judgments")
    copy = Store(tmp_path / "copy.duckdb")  # opens as a studio database: its migrations all there
    assert copy.count("tasks") == 300 and copy.count("users") == 2
    assert 0 <= copy.count("judgments") <= final
    copy.close()
    # no studio running: the CLI copies the database itself
    out = studio("backup", str(tmp_path / "offline.duckdb"), "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    offline = Store(tmp_path / "offline.duckdb")
    assert offline.count("judgments") == final
    offline.close()


def test_serve_freezes_the_startup_heap_out_of_full_collections(tmp_path: Path) -> None:
    """What `studio serve` calls before it serves: startup's objects leave the collector's
    passes (benchmarks/README.md, annotate.py: a full collection over them paused every request
    ~100 ms), and young collections come less often. In a child process, not to freeze this one."""
    code = f"""
import gc
from studio.app import create_app, freeze_startup_heap
from studio.config import Settings
app = create_app(Settings(data_dir={str(tmp_path)!r}, ui=False))
before = len(gc.get_objects())
freeze_startup_heap()
print(before, gc.get_freeze_count(), len(gc.get_objects()), gc.get_threshold()[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, frozen, left, young = map(int, out.split())
    assert frozen >= before * 0.9 and left < before * 0.05, out
    from studio.app import YOUNG_COLLECTION_THRESHOLD

    assert young == YOUNG_COLLECTION_THRESHOLD > 700  # in-flight requests die young (see the docstring)
