"""Launchers without launching: command lines, the checks of a run's launch choice and of the
studio's launch flags, what a run records, and the shared-directory rule of the ray launcher.
tests/test_scale.py starts stages for real (accelerate with 2 processes, a local Ray head)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from studio import launchers as ln
from studio import training
from studio.campaigns import ensure_policy_alias
from studio.config import Settings
from studio.store import Store, StoreError
from tests.helpers import seed_easy_judgments

ARGS = ["--config", "r.yaml", "--output", "out"]


def test_stage_command_lines() -> None:
    assert ln.stage_command("py", "dpo", ARGS) == ["py", "-m", "trainers.dpo", *ARGS]
    two = ln.stage_command("py", "dpo", ARGS, 2, accelerate=True, port=29511)
    assert two[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert (
        two[two.index("--num_processes") + 1] == "2" and two[two.index("--main_process_port") + 1] == "29511"
    )
    # on a CPU without an MPI launcher, accelerate starts N processes only through torchrun
    assert "--multi_gpu" in two and "--cpu" not in two
    assert two[-len(ARGS) - 2 :] == ["-m", "trainers.dpo", *ARGS]
    one = ln.stage_command("py", "sft", ARGS, 1, accelerate=True)
    assert "--multi_gpu" not in one  # accelerate refuses --multi_gpu with one process
    gpu = ln.stage_command("py", "sft", ARGS, 8, accelerate=True, accelerate_config=Path("/c/multi.yaml"))
    assert gpu[gpu.index("--config_file") + 1] == "/c/multi.yaml" and "--multi_gpu" not in gpu
    assert gpu[gpu.index("--num_processes") + 1] == "8"  # the studio's count wins over the file's


def test_a_runs_launch_choice_is_checked_against_the_studio() -> None:
    here = ln.LaunchSettings()
    cluster = ln.LaunchSettings(launcher="ray", ray_address="http://head:8265", num_processes=4)
    assert ln.check_choice(here, None, None) is None
    assert ln.check_choice(here, "accelerate", 2) == {"launcher": "accelerate", "num_processes": 2}
    with pytest.raises(ValueError, match="launcher 'ray': this studio has no Ray cluster"):
        ln.check_choice(here, "ray", None)
    assert ln.check_choice(None, "ray", None) == {"launcher": "ray"}  # no studio runs: checked at start
    with pytest.raises(ValueError, match="the local launcher runs one process"):
        ln.check_choice(here, "local", 2)
    with pytest.raises(ValueError, match="launcher 'mpi': use one of local, accelerate, ray"):
        ln.check_choice(here, "mpi", None)
    with pytest.raises(ValueError, match="num_processes 0: use 1 to 64"):
        ln.check_choice(here, "accelerate", 0)
    assert ln.resolve(cluster, None) == {"launcher": "ray", "num_processes": 4}
    assert ln.resolve(cluster, {"launcher": "local"}) == {"launcher": "local", "num_processes": 1}
    assert ln.resolve(here, {"num_processes": 2}) == {"launcher": "local", "num_processes": 2}


def test_serve_flags_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--launcher ray needs --ray-address"):
        Settings(data_dir=tmp_path, launcher="ray")
    with pytest.raises(ValueError, match="--num-processes 0"):
        Settings(data_dir=tmp_path, num_processes=0)
    with pytest.raises(ValueError, match=r"--accelerate-config .*nope.yaml: no such file"):
        Settings(data_dir=tmp_path, accelerate_config=tmp_path / "nope.yaml")
    s = Settings(data_dir=tmp_path, launcher="accelerate", num_processes=2, shared_dir=str(tmp_path / "nfs"))
    launch = ln.LaunchSettings.from_settings(s)
    assert launch.shared_dir == tmp_path / "nfs" and launch.num_processes == 2
    assert ln.shared_root(Settings(data_dir=tmp_path)) == tmp_path  # default: the data directory


def test_cli_serve_and_train_take_the_launch_flags() -> None:
    from studio.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            "serve",
            "--launcher",
            "ray",
            "--ray-address",
            "http://h:8265",
            "--num-processes",
            "2",
            "--shared-dir",
            "/s",
        ]
    )
    assert (args.launcher, args.ray_address, args.num_processes, str(args.shared_dir)) == (
        "ray",
        "http://h:8265",
        2,
        "/s",
    )
    train = parser.parse_args(["train", "dpo", "--launcher", "accelerate", "--num-processes", "2"])
    assert (train.launcher, train.num_processes) == ("accelerate", 2)


@pytest.fixture()
def judged(tmp_path: Path) -> Store:
    store = Store(tmp_path / "s.duckdb")
    store.register_model_version(
        "base", path=str(tmp_path / "models" / "base"), content_hash="t" * 64, source="t"
    )
    ensure_policy_alias(store, "base")
    seed_easy_judgments(store, n=6)
    return store


def test_a_run_records_its_launch_and_lives_under_the_shared_dir(judged: Store, tmp_path: Path) -> None:
    shared = tmp_path / "nfs"
    studio = ln.LaunchSettings(launcher="local", shared_dir=shared)
    run = training.submit_run(
        judged,
        tmp_path,
        stage="dpo",
        created_by="eng",
        launcher="accelerate",
        num_processes=2,
        launch_defaults=studio,
        shared_dir=shared,
    )
    assert run["launch"] == {"launcher": "accelerate", "num_processes": 2}
    assert Path(run["output_dir"]).parent == shared / "runs"
    snap = judged.query("SELECT path FROM snapshots WHERE id = ?", [run["snapshot_id"]])[0]["path"]
    assert Path(snap).is_relative_to(shared / "snapshots")
    plain = training.submit_run(judged, tmp_path, stage="dpo", created_by="eng")
    assert plain["launch"] is None  # the studio's launcher decides when it starts
    with pytest.raises(StoreError, match=r"ppo.batch_size 8 and ppo.mini_batch_size 4 are shared among 3"):
        judged.register_model_version("rm", path="rule:spaces", content_hash="r", source="t", kind="reward")
        training.submit_run(
            judged,
            tmp_path,
            stage="ppo",
            created_by="eng",
            launcher="accelerate",
            num_processes=3,
            launch_defaults=studio,
        )
    # 8 answers over 2 processes is 4 each: 4 answers per prompt fit, 8 would split a prompt's group
    with pytest.raises(StoreError, match=r"4 answers each, which ppo.samples_per_prompt 8 does not divide"):
        training.submit_run(
            judged,
            tmp_path,
            stage="ppo",
            created_by="eng",
            overrides={"ppo.batch_size": 8, "ppo.samples_per_prompt": 8},
            launcher="accelerate",
            num_processes=2,
            launch_defaults=studio,
        )
    with pytest.raises(StoreError, match="this studio has no Ray cluster"):
        training.submit_run(
            judged, tmp_path, stage="dpo", created_by="eng", launcher="ray", launch_defaults=studio
        )
    assert judged.count("runs") == 2


def test_the_ray_launcher_refuses_paths_the_cluster_cannot_see(tmp_path: Path) -> None:
    launcher = ln.Launcher(
        ln.LaunchSettings(launcher="ray", ray_address="http://127.0.0.1:1", shared_dir=tmp_path / "nfs"),
        python=sys.executable,
        cwd=tmp_path,
    )
    launcher.check_shared(
        {"the snapshot": str(tmp_path / "nfs" / "snapshots" / "s.parquet"), "rm": "rule:spaces"}
    )
    with pytest.raises(
        ln.LaunchError, match=r"the parent's folder /models/base is outside the shared directory"
    ):
        launcher.check_shared({"the parent's folder": "/models/base"})
    # nothing answers at the address: the message names the flag and what to give
    with pytest.raises(ln.LaunchError, match=r"--ray-address http://127.0.0.1:1: no Ray job server answers"):
        launcher.ray()
