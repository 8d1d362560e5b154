"""The `studio` command. Every sub-command has --help.

Each command reads its flags, calls one method of a `studio.client.Client` and prints the answer.
The client is the database itself (in this process) when no studio holds it, else the running
studio's REST API (see studio/client.py). A flag left out is not sent: the defaults (shown in the
help) are the service specs' (studio/services.py).
"""

from __future__ import annotations

import argparse
import getpass
import json
import signal
import socket
import sys
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from studio import users
from studio.client import SERVER_FILE, Client, CLIError, api_token, connect, studio_url
from studio.config import DEFAULT_PORT, Settings, default_data_dir
from studio.export import FORMATS as EXPORT_FORMATS
from studio.export import KINDS
from studio.importer import FORMATS, PromptFileError, read_prompts
from studio.services import (
    BattleCampaignSpec,
    CampaignSpec,
    ExportSpec,
    LeaderboardSpec,
    PromoteSpec,
    RunSpec,
    SampleSpec,
    UserSpec,
    given,
    parse_overrides,
    rate_battle_log,
)
from studio.serving.client import BackendError
from studio.store import StoreError, StoreLockedError
from studio.users import AuthError

__all__ = ["SERVER_FILE", "CLIError", "api_token", "build_parser", "main", "studio_url"]
CREDENTIALS = "Changing credentials needs the studio stopped."


def client_for(args: argparse.Namespace, local_only: str | None = None) -> AbstractContextManager[Client]:
    """The command's client: --url's studio, else the database when free, else the studio holding it."""
    return connect(
        Path(args.data_dir), getattr(args, "url", None), getattr(args, "token", None), local_only=local_only
    )


# commands ---------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from studio.app import create_app
    from studio.model_prep import ModelError
    from studio.runtime import Studio
    from studio.serving.vllm_server import ServingError

    try:
        settings = Settings(
            data_dir=args.data_dir,
            host=args.host,
            port=args.port,
            model=args.model,
            model_name=args.model_name,
            backend_url=args.backend_url,
            vllm_port=args.vllm_port,
            ui=not args.no_ui,
            lora=not args.no_lora,
            probe=not args.no_probe,
            max_runs=args.max_runs,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    with socket.socket() as probe:  # fail now, not after a minute of loading the model
        try:
            probe.bind((settings.host, settings.port))
        except OSError:
            raise CLIError(
                f"--port {settings.port}: already in use on {settings.host}; "
                "stop what uses it or pick another port"
            ) from None
    studio = Studio(settings)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Until uvicorn takes over the signals, SIGTERM while the model loads must
    # still stop vLLM: make it unwind like Ctrl-C (Studio.start cleans up).
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        studio.start()
    except (ModelError, ServingError, StoreError) as exc:
        raise CLIError(str(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    config = uvicorn.Config(
        create_app(settings, studio), host=settings.host, port=settings.port, log_level="warning"
    )
    server = uvicorn.Server(config)

    def announce_when_listening() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.1)
        if server.started:
            studio.announce()

    threading.Thread(target=announce_when_listening, daemon=True).start()
    server.run()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args.file, args.format, args.split)
    except PromptFileError as exc:
        raise CLIError(f"{exc}\nNothing was imported.") from None
    try:
        with client_for(args) as client:
            print(client.import_prompts(args.set, prompts, str(Path(args.file).resolve()))["summary"])
    except StoreError as exc:
        raise CLIError(f"{exc}\nNothing was imported.") from None
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        models = client.list_models()["models"]
    if args.json:
        print(json.dumps(models, indent=2, default=str))
        return 0
    if not models:
        print("no model versions yet; `studio serve` registers the base model on its first start")
        return 0
    print(f"{'NAME':<24} {'KIND':<5} {'PARENT':<12} {'HASH':<14} {'CREATED':<26} SOURCE")
    for m in models:
        print(
            f"{m['name']:<24} {m['kind']:<5} {m['parent'] or '-':<12} "
            f"{m['content_hash'][:12]:<14} {str(m['created_at'])[:25]:<26} {m['source']}"
        )
    return 0


def read_password(args: argparse.Namespace) -> str:
    """From a prompt on a terminal (asked twice), else the first line of stdin (for scripts)."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {args.name}: ")
        if first != getpass.getpass("again: "):
            raise CLIError("the two passwords differ; nothing was changed")
        return first
    line = sys.stdin.readline().rstrip("\n")
    if not line:
        raise CLIError("no password on stdin: pipe one line, e.g. `echo PASSWORD | studio users add ...`")
    return line


def cmd_users_add(args: argparse.Namespace) -> int:
    password = read_password(args)
    with client_for(args) as client:
        token = client.add_user(UserSpec(args.name, args.role, password))["token"]
    print(f"user '{args.name}' ({args.role}) added.\nREST token (shown once; keep it secret): {token}")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        listed = client.list_users()
    for u in listed:
        print(f"{u['name']:<24} {u['role']:<10} {'disabled' if u['disabled'] else ''}")
    return 0


def cmd_users_passwd(args: argparse.Namespace) -> int:
    password = read_password(args)
    # credentials are changed on the database itself, never over REST
    with client_for(args, local_only=CREDENTIALS) as client:
        client.set_password(args.name, password)
    print(f"password of '{args.name}' changed")
    return 0


def cmd_users_token(args: argparse.Namespace) -> int:
    with client_for(args, local_only=CREDENTIALS) as client:
        token = client.new_token(args.name)["token"]
    print(f"new REST token for '{args.name}' (the old one no longer works): {token}")
    return 0


def cmd_campaigns_create(args: argparse.Namespace) -> int:
    spec = CampaignSpec(
        args.name,
        args.prompt_set,
        **given(
            model=args.model,
            n=args.n,
            overlap=args.overlap,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
            task_timeout_s=args.task_timeout,
            guidelines=args.guidelines.read_text() if args.guidelines else None,
        ),
    )
    with client_for(args) as client:
        created = client.create_campaign(spec)
    print(
        f"campaign '{created['name']}' created: set {created['prompt_set']}, model {created['model']}, "
        f"n={created['n']}, overlap={created['overlap']}"
    )
    return 0


def cmd_campaigns_list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        listed = client.list_campaigns()
    for c in listed:
        print(
            f"{c['name']:<24} {c['kind']:<6} {c['status']:<8} set={c['prompt_set']} model={c['model']} "
            f"n={c['n']} overlap={c['overlap']}"
        )
    return 0


def _print_run(run: dict[str, Any]) -> None:
    stages = "+".join(run["stages"])
    versions = ", ".join(run.get("versions") or []) or "-"
    line = f"{run['id']}  {stages:<8} {run['status']:<9} parent={run['parent']} versions={versions}"
    if run.get("rebattle"):
        line += f" rebattle={run['rebattle']}"
    if run.get("reason"):
        line += f"\n    reason: {run['reason']}"
    print(line)


def cmd_train(args: argparse.Namespace) -> int:
    spec = RunSpec(
        args.stage,
        **given(
            parent=args.parent,
            campaigns=args.campaign or None,
            held_out=args.held_out,
            recipe=args.recipe,
            steps=args.steps,
            overrides=parse_overrides(args.set, where="--set") or None,
            reward_model=args.reward_model,
            annotators=args.annotator or None,
            min_strength=args.min_strength,
        ),
    )
    with client_for(args) as client:
        run = client.start_run(spec)
        _print_run(run)
        if run["status"] == "queued" and client.offline:
            print("queued: it starts when the studio runs (`studio serve`)")
        if not args.wait:
            return 0
        if client.offline:
            raise CLIError(
                f"--wait: no studio runs to start it. Start one with `studio serve`; "
                f"`studio runs show {run['id']}` then shows its progress."
            )
        while run["status"] in ("queued", "running"):
            time.sleep(2)
            run = client.get_run(run["id"])
            info = run["progress"]
            if info.get("step"):
                eta = f", ETA {info['eta_s']:.0f} s" if info.get("eta_s") else ""
                print(
                    f"  {info['stage']}: step {info['step']}/{info.get('max_steps') or '?'}{eta}", flush=True
                )
    _print_run(run)
    return 0 if run["status"] == "succeeded" else 1


def cmd_runs(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.runs_command == "list":
            for run in client.list_runs():
                _print_run(run)
        elif args.runs_command == "show":
            run = client.get_run(args.run_id)
            shown = {k: v for k, v in run.items() if k not in ("curves", "log")}
            print(json.dumps(shown, indent=2, default=str))
            if run.get("log"):
                print("--- log (tail) ---\n" + run["log"])
        else:  # cancel: only a running studio's runner can stop its subprocess
            _print_run(client.cancel_run(args.run_id))
    return 0


def cmd_models_lineage(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        chain = client.lineage(args.name)
    if args.json:
        print(json.dumps(chain, indent=2, default=str))
        return 0
    for step in chain:
        line = f"{step['version']} ({step['kind']})"
        if step.get("run"):
            line += (
                f" <- run {step['run']} [{step['stage']}] <- snapshot {step['snapshot']} "
                f"({step['judgments']} judgments)"
            )
        print(line)
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        done = client.promote(args.name, PromoteSpec(**given(alias=args.alias)))
    print(f"'{done['alias']}' now points at {done['version']}")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        done = client.rollback(args.alias or PromoteSpec.alias)
    print(f"'{done['alias']}' now points at {done['version']} (rolled back from {done['previous']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    spec = ExportSpec(**given(kind=args.kind, format=args.format, campaign=args.campaign))
    with client_for(args) as client:
        result = client.export(args.out, spec)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.get("counts", {}).items()))
    print(
        f"exported {result['kind']} rows as {result['format']} to {result['path']}"
        + (f" ({counts})" if counts else "")
    )
    return 0


def read_battle_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise CLIError(f"--battles {path}: no such file")
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CLIError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
    return rows


def cmd_leaderboard(args: argparse.Namespace) -> int:
    spec = LeaderboardSpec(
        **given(
            campaign=args.campaign,
            style="length" if args.style_control else None,
            rounds=args.rounds,
            min_battles=args.min_battles,
        )
    )
    if args.battles is None:  # the studio's own battles
        with client_for(args) as client:
            board = client.leaderboard(spec)
    else:
        rows = read_battle_log(args.battles)
        try:
            board = rate_battle_log(rows, str(args.battles), not args.both_bad_is_loss_for_both, spec)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps(board, indent=2))
        return 0
    print(f"{'RANK':<5} {'VERSION':<32} {'RATING':>8} {'95% CI':>17} {'BATTLES':>8}")
    for r in board:
        note = "  (provisional)" if r["provisional"] else ""
        ci = f"{r['lower']:.0f} .. {r['upper']:.0f}"
        print(f"{r['rank']:<5} {r['version']:<32} {r['rating']:>8.1f} {ci:>17} {r['battles']:>8}{note}")
    return 0


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [w.strip() for w in text.split(",") if w.strip()]


def cmd_arena_create(args: argparse.Namespace) -> int:
    spec = BattleCampaignSpec(
        args.name,
        args.prompt_set,
        _names(args.versions) or [],
        **given(
            budget=args.budget,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            criteria=_names(args.criteria),
            leak_words=_names(args.leak_words),
            both_bad_as_tie=False if args.both_bad_is_no_vote else None,
        ),
    )
    with client_for(args) as client:
        created = client.create_battle_campaign(spec)
    print(
        f"battle campaign '{created['name']}' created: {', '.join(created['versions'])}, "
        f"budget {created['budget']} votes"
    )
    return 0


def cmd_arena_battles(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        rows = client.battle_log(args.campaign)
    if not rows:
        raise CLIError("no votes yet" + (f" in campaign '{args.campaign}'" if args.campaign else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), args.out)
    else:
        args.out.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    print(f"wrote {len(rows)} battles to {args.out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    spec = SampleSpec(
        prompt=args.prompt,
        **given(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
            model=args.model,
        ),
    )
    with client_for(args) as client:
        result = client.sample(spec)
    if args.json:
        print(json.dumps(result["generations"], indent=2))
        return 0
    for g in result["generations"]:
        print(
            f"--- completion {g['choice_index'] + 1} · {g['model_version']} · "
            f"{g['completion_tokens']} tokens · {g['finish_reason']} · "
            f"{g['latency_ms']:.0f} ms · id {g['id']}"
        )
        print(g["text"])
    return 0


# parser -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="studio", description="Preference Studio: label, battle, train, reload, compare."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            type=Path,
            default=default_data_dir(),
            help="the studio's data directory (default: $STUDIO_DATA_DIR or ./studio-data)",
        )

    def url_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            help="a running studio to go through (default: the one "
            "recorded in the data directory, else http://127.0.0.1:8000)",
        )
        p.add_argument(
            "--token",
            help="REST token for --url (default: $STUDIO_TOKEN, else the first admin's token "
            "that a local studio wrote to its data directory)",
        )

    serve = sub.add_parser(
        "serve",
        help="start vLLM and the studio (UI at /, REST at /api/v1)",
        description="Prepare the model, start vLLM and serve the studio.",
    )
    serve.add_argument(
        "--host",
        default=Settings.host,
        help=f"address to listen on; loopback only until users exist (default {Settings.host})",
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"studio port (default {DEFAULT_PORT})")
    data_dir_arg(serve)
    serve.add_argument(
        "--model",
        type=Path,
        help="a local Hugging Face model folder to serve instead of the packaged SmolLM2-135M-Instruct",
    )
    serve.add_argument(
        "--model-name",
        help="version name for --model or --backend-url "
        "(default: the folder name, or the server's first model)",
    )
    serve.add_argument(
        "--backend-url",
        help="use this running OpenAI-compatible server "
        "(e.g. vLLM on a GPU machine) instead of starting vLLM here",
    )
    serve.add_argument("--vllm-port", type=int, help="port for the managed vLLM (default: a free one)")
    serve.add_argument("--no-ui", action="store_true", help="serve the REST API only")
    serve.add_argument(
        "--no-lora",
        action="store_true",
        help="start vLLM without runtime LoRA: faster sampling on the CPU, but "
        "trained adapters cannot be hot-loaded",
    )
    serve.add_argument(
        "--no-probe",
        action="store_true",
        help="do not measure the model server's throughput at start; the task sampler keeps "
        "a curve measured before, else a default number of requests in flight",
    )
    serve.add_argument(
        "--max-runs",
        type=int,
        default=Settings.max_runs,
        help=f"training runs at once (default {Settings.max_runs}: each takes all the CPU it can get)",
    )
    serve.set_defaults(func=cmd_serve)

    imp = sub.add_parser(
        "import",
        help="import a prompt set from JSONL, CSV, Parquet or a datasets folder",
        description="Import prompts atomically: a bad file stores nothing.",
    )
    imp.add_argument(
        "file", type=Path, help="a .jsonl, .csv or .parquet file, or a datasets save_to_disk folder"
    )
    imp.add_argument("--set", required=True, help="name of the prompt set to add to")
    imp.add_argument("--format", choices=FORMATS, help="override the format found from the name")
    imp.add_argument("--split", help="which split of a datasets folder with several")
    data_dir_arg(imp)
    url_arg(imp)
    imp.set_defaults(func=cmd_import)

    models = sub.add_parser("models", help="model versions", description="Model versions.")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    mlist = models_sub.add_parser(
        "list", help="list registered model versions", description="List registered model versions."
    )
    mlist.add_argument("--json", action="store_true", help="print JSON")
    data_dir_arg(mlist)
    url_arg(mlist)
    mlist.set_defaults(func=cmd_models_list)

    mlin = models_sub.add_parser(
        "lineage",
        help="a version's lineage",
        description="Version <- run <- snapshot <- judgments, to the base.",
    )
    mlin.add_argument("name", help="model version or alias")
    mlin.add_argument("--json", action="store_true", help="print JSON")
    mprom = models_sub.add_parser(
        "promote",
        help="point the policy alias at a version (roll back by promoting the parent)",
        description="Point an alias (policy by default) at a version: new labeling samples from it.",
    )
    mprom.add_argument("name", help="model version")
    mprom.add_argument("--alias", help=f"alias to move (default: {PromoteSpec.alias})")
    mroll = models_sub.add_parser(
        "rollback",
        help="point the policy alias back at the parent of its version",
        description="Point an alias (policy by default) back at the parent of the version it points at.",
    )
    mroll.add_argument("--alias", help=f"alias to move back (default: {PromoteSpec.alias})")
    for p, func in (
        (mlin, cmd_models_lineage),
        (mprom, cmd_models_promote),
        (mroll, cmd_models_rollback),
    ):
        data_dir_arg(p)
        url_arg(p)
        p.set_defaults(func=func)

    train = sub.add_parser(
        "train",
        help="start a training run",
        description="Queue a training run: the studio snapshots the data and runs the stage in a subprocess. "
        "A finished policy run becomes a version, hot-loaded and sent into a blind re-battle against its"
        " parent.",
    )
    train.add_argument("stage", choices=["reward", "dpo", "ppo", "sft", "ppo_then_dpo"])
    train.add_argument(
        "--campaign", action="append", default=[], help="labeling campaign (repeat; default: all)"
    )
    train.add_argument("--parent", help=f"version or alias to start from (default: {RunSpec.parent})")
    train.add_argument("--held-out", type=float, help="share of prompts kept out for evaluation")
    train.add_argument(
        "--recipe", help="recipe name in data/recipes or DATA_DIR/recipes (default: the stage's)"
    )
    train.add_argument("--steps", type=int, help="override the recipe's steps (ppo: iterations)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting, e.g. --set train.beta=0.2 (repeat)",
    )
    train.add_argument("--reward-model", help="ppo: reward version (default: the newest)")
    train.add_argument(
        "--annotator", action="append", default=[], help="only this annotator's judgments (repeat)"
    )
    train.add_argument(
        "--min-strength", type=int, choices=[1, 2, 3], help="only judgments at least this strong"
    )
    train.add_argument("--wait", action="store_true", help="follow progress until the run ends")
    data_dir_arg(train)
    url_arg(train)
    train.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="training runs", description="Training runs.")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    rl = runs_sub.add_parser("list", help="list runs", description="List training runs, newest first.")
    rs = runs_sub.add_parser("show", help="one run with its log", description="Show a run and its log tail.")
    rc = runs_sub.add_parser("cancel", help="cancel a run", description="Cancel a queued or running run.")
    for p in (rs, rc):
        p.add_argument("run_id")
    for p in (rl, rs, rc):
        data_dir_arg(p)
        url_arg(p)
        p.set_defaults(func=cmd_runs)

    sample = sub.add_parser(
        "sample",
        help="sample completions from the served model and store them",
        description="Sample through the running studio; every completion is stored.",
    )
    sample.add_argument("prompt", help="the user prompt")
    sample.add_argument("-n", type=int, help=f"number of completions (default {SampleSpec.n})")
    sample.add_argument("--temperature", type=float, help=f"default {SampleSpec.temperature}")
    sample.add_argument("--top-p", type=float, help=f"default {SampleSpec.top_p}")
    sample.add_argument("--max-tokens", type=int, help=f"default {SampleSpec.max_tokens}")
    sample.add_argument("--seed", type=int, help="sampling seed, for reproducible completions")
    sample.add_argument("--model", help="model version (default: the served base)")
    sample.add_argument("--json", action="store_true", help="print the stored rows as JSON")
    data_dir_arg(sample)
    url_arg(sample)
    sample.set_defaults(func=cmd_sample)

    users_p = sub.add_parser("users", help="user accounts and roles", description="User accounts.")
    users_sub = users_p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    uadd = users_sub.add_parser(
        "add",
        help="add a user (password from a prompt or stdin)",
        description="Add a user; prints their REST token once.",
    )
    uadd.add_argument("name", help="login name")
    uadd.add_argument("--role", required=True, choices=users.ROLES, help="what the user may do")
    ulist = users_sub.add_parser("list", help="list users", description="List users.")
    upass = users_sub.add_parser(
        "passwd",
        help="set a user's password (studio stopped)",
        description="Set a user's password from a prompt or stdin.",
    )
    upass.add_argument("name")
    utoken = users_sub.add_parser(
        "token",
        help="issue a new REST token for a user (studio stopped)",
        description="Replace a user's REST token.",
    )
    utoken.add_argument("name")
    for p in (uadd, ulist, upass, utoken):
        data_dir_arg(p)
    for p in (uadd, ulist):
        url_arg(p)
    uadd.set_defaults(func=cmd_users_add)
    ulist.set_defaults(func=cmd_users_list)
    upass.set_defaults(func=cmd_users_passwd)
    utoken.set_defaults(func=cmd_users_token)

    camps = sub.add_parser("campaigns", help="labeling campaigns", description="Labeling campaigns.")
    camps_sub = camps.add_subparsers(dest="campaigns_command", required=True, metavar="ACTION")
    ccreate = camps_sub.add_parser(
        "create",
        help="create a labeling campaign",
        description="Create a labeling campaign over a prompt set.",
    )
    ccreate.add_argument("name")
    ccreate.add_argument("--prompt-set", required=True, help="an imported prompt set")
    ccreate.add_argument("--model", help=f"version or alias (default: {CampaignSpec.model})")
    ccreate.add_argument("-n", type=int, help=f"completions per task, 2-8 (default {CampaignSpec.n})")
    ccreate.add_argument("--overlap", type=int, help=f"annotators per task (default {CampaignSpec.overlap})")
    ccreate.add_argument("--temperature", type=float, help=f"default {CampaignSpec.temperature}")
    ccreate.add_argument("--top-p", type=float, help=f"default {CampaignSpec.top_p}")
    ccreate.add_argument("--max-tokens", type=int, help=f"default {CampaignSpec.max_tokens}")
    ccreate.add_argument("--seed", type=int, help="sampling seed")
    ccreate.add_argument(
        "--task-timeout",
        type=int,
        help="seconds before an unsubmitted task goes back to the pool "
        f"(default {CampaignSpec.task_timeout_s})",
    )
    ccreate.add_argument("--guidelines", type=Path, help="a Markdown file with the guidelines")
    clist = camps_sub.add_parser("list", help="list campaigns", description="List campaigns.")
    for p in (ccreate, clist):
        data_dir_arg(p)
        url_arg(p)
    ccreate.set_defaults(func=cmd_campaigns_create)
    clist.set_defaults(func=cmd_campaigns_list)

    lb = sub.add_parser(
        "leaderboard",
        help="Bradley-Terry ratings with bootstrap intervals",
        description="Rate model versions from battles (Elo-like scale: 400 points per "
        "factor of ten in odds, mean 1000).",
    )
    lb.add_argument(
        "--battles",
        type=Path,
        help="a FastChat-style battle log (JSONL or Parquet: model_a, model_b, winner in "
        "model_a, model_b, tie, tie (bothbad)); needs no studio or database",
    )
    lb.add_argument(
        "--json",
        action="store_true",
        help="print [{version, rating, lower, upper, battles, rank, provisional}]",
    )
    lb.add_argument("--rounds", type=int, help=f"bootstrap rounds (default {LeaderboardSpec.rounds})")
    lb.add_argument(
        "--min-battles",
        type=int,
        help=f"versions with fewer battles are marked provisional (default {LeaderboardSpec.min_battles})",
    )
    lb.add_argument(
        "--both-bad-is-loss-for-both",
        action="store_true",
        help="drop 'tie (bothbad)' battles instead of counting them as ties",
    )
    lb.add_argument("--campaign", help="one battle campaign of this studio (default: all of them)")
    lb.add_argument(
        "--style-control",
        action="store_true",
        help="rate with answer length held fixed (the studio's battles)",
    )

    data_dir_arg(lb)
    url_arg(lb)
    lb.set_defaults(func=cmd_leaderboard)

    ar = sub.add_parser(
        "arena",
        help="blind side-by-side battle campaigns",
        description="Blind side-by-side battle campaigns.",
    )
    ar_sub = ar.add_subparsers(dest="arena_command", required=True, metavar="ACTION")
    acreate = ar_sub.add_parser(
        "create",
        help="create a battle campaign",
        description="Create a battle campaign between two or more versions.",
    )
    acreate.add_argument("name")
    acreate.add_argument("--prompt-set", required=True, help="an imported prompt set")
    acreate.add_argument(
        "--versions", required=True, help="comma-separated versions or aliases, e.g. base,policy"
    )
    acreate.add_argument(
        "--budget", type=int, help=f"votes before it stops (default {BattleCampaignSpec.budget})"
    )
    acreate.add_argument("--max-tokens", type=int, help=f"default {BattleCampaignSpec.max_tokens}")
    acreate.add_argument("--temperature", type=float, help=f"default {BattleCampaignSpec.temperature}")
    acreate.add_argument("--criteria", help="comma-separated criteria scored 1-5 (optional)")
    acreate.add_argument(
        "--leak-words",
        help="comma-separated words that reveal an identity (default: a built-in list "
        "of model and lab names, plus the version names)",
    )
    acreate.add_argument(
        "--both-bad-is-no-vote",
        action="store_true",
        help="leave 'both bad' votes out of the ratings (default: they count as ties)",
    )

    abattles = ar_sub.add_parser(
        "battles",
        help="export votes as a FastChat-style battle log",
        description="Write votes with FastChat's battle-log columns plus ours.",
    )
    abattles.add_argument("--out", type=Path, required=True, help="a .jsonl or .parquet file")
    abattles.add_argument("--campaign", help="only this campaign")
    for p in (acreate, abattles):
        data_dir_arg(p)
        url_arg(p)
    acreate.set_defaults(func=cmd_arena_create)
    abattles.set_defaults(func=cmd_arena_battles)

    exp = sub.add_parser(
        "export",
        help="export judgments for training",
        description="Export judgments as TRL-ready rows with a data card.",
    )
    exp.add_argument(
        "--kind",
        choices=KINDS,
        help="preference (prompt/chosen/rejected/margin), unpaired (prompt/completion/label), "
        "sft (messages), or judgments (one row per judgment as given, for analysis); "
        f"default {ExportSpec.kind}",
    )
    exp.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="datasets folder, parquet or jsonl (default: from --out's suffix, else datasets)",
    )
    exp.add_argument("--out", type=Path, required=True, help="file or folder to write")
    exp.add_argument("--campaign", help="only this campaign (default: all)")
    data_dir_arg(exp)
    url_arg(exp)
    exp.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, StoreLockedError, AuthError, BackendError, ValueError) as exc:
        # ValueError: StoreError, PromptFileError and bad values, each with its message
        print(f"studio: {exc}", file=sys.stderr)
        return 1

    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
