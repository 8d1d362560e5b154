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
import sys
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from studio import users
from studio.client import SERVER_FILE, Client, CLIError, api_token, connect, studio_url
from studio.config import DEFAULT_PORT, LORA_MODES, Settings, default_data_dir
from studio.export import FORMATS as EXPORT_FORMATS
from studio.export import KINDS
from studio.importer import FORMATS, PromptFileError, read_prompts
from studio.launchers import LAUNCHERS
from studio.services import (
    BattleCampaignSpec,
    CampaignSpec,
    EvalSpec,
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

    from studio.app import create_app, freeze_startup_heap
    from studio.model_prep import ModelError
    from studio.ports import PortError, listen_sockets
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
            shared_dir=args.shared_dir,
            vllm_port=args.vllm_port,
            ui=not args.no_ui,
            lora="off" if args.no_lora else args.lora,
            max_servers=args.max_servers,
            probe=not args.no_probe,
            max_runs=args.max_runs,
            auto_eval=not args.no_auto_eval,
            launcher=args.launcher,
            num_processes=args.num_processes,
            accelerate_config=args.accelerate_config,
            ray_address=args.ray_address,
            ray_gpus_per_process=args.ray_gpus_per_process,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    # Bind now, not after a minute of loading the model: a busy port is told at once (naming
    # who holds it), and nothing can take it meanwhile. uvicorn listens on these sockets.
    try:
        sockets = listen_sockets(settings.host, settings.port)
    except PortError as exc:
        raise CLIError(str(exc)) from None
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
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    config = uvicorn.Config(
        create_app(settings, studio), host=settings.host, port=settings.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    freeze_startup_heap()

    def announce_when_listening() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.1)
        if server.started:
            studio.announce()

    threading.Thread(target=announce_when_listening, daemon=True).start()
    server.run(sockets=sockets)
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
    elif run.get("rebattle_prompts"):
        line += f" rebattle-prompts={run['rebattle_prompts']}"
    launch = run.get("launch") or {}
    if launch.get("launcher"):
        line += f" launcher={launch['launcher']}x{launch.get('num_processes', 1)}"
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
            eval_prompt_set=args.eval_prompt_set,
            launcher=args.launcher,
            num_processes=args.num_processes,
        ),
    )
    with client_for(args) as client:
        run = client.start_run(spec)
        _print_run(run)
        for note in run.get("notes") or []:
            print(f"note: {note}")
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
    spec = PromoteSpec(**given(alias=args.alias, force=True if args.force else None))
    with client_for(args) as client:
        done = client.promote(args.name, spec)
    print(f"'{done['alias']}' now points at {done['version']}")
    if done.get("forced"):
        print(
            "forced (recorded): the gate did not pass:\n" + "".join(f"  - {r}\n" for r in done["reasons"]),
            end="",
        )
    return 0


def print_eval(result: dict[str, Any]) -> None:
    """An evaluation's result as a table: each metric, the other version's value beside this
    one's, the change and its 95% paired-bootstrap interval; then the gate's answer."""
    version, against = result["version"], result["against"]
    width = max([len("METRIC"), *(len(m) for m in result["metrics"])])
    print(f"{'METRIC':<{width}}  {against[:12]:>12}  {version[:12]:>12}  {'CHANGE':>8}  95% INTERVAL")
    for name, m in sorted(result["metrics"].items()):
        lo, hi = m["ci"]
        print(
            f"{name:<{width}}  {m['against']:>12.3f}  {m['version']:>12.3f}  {m['delta']:>+8.3f}"
            f"  [{lo:+.3f}, {hi:+.3f}]"
        )
    gate = result["gate"]
    print("gate: " + ("passed" if gate["passed"] else "did not pass"))
    for reason in gate["reasons"]:
        print(f"  - {reason}")


def cmd_eval(args: argparse.Namespace) -> int:
    spec = EvalSpec(
        args.version,
        **given(
            against=args.against,
            suites=args.suite or None,
            seed=args.seed,
            limit=args.limit,
            judge_url=args.judge_url,
            judge_model=args.judge_model,
            temperature=args.temperature,
            waive_rebattle=True if args.waive_rebattle else None,
        ),
    )
    with client_for(args) as client:
        record = client.start_eval(spec)
        if args.no_wait:
            print(f"{record['id']}: {record['status']}; GET /api/v1/evals/{record['id']} reads it")
            return 0
        print(
            f"{record['id']}: {record['version']} against {record['against']}, {record['status']}",
            file=sys.stderr,
        )
        started = shown = time.monotonic()
        while record["status"] in ("queued", "running"):
            time.sleep(2)
            record = client.get_eval(record["id"])
            if time.monotonic() - shown >= 30:  # a full evaluation takes minutes on a CPU
                shown = time.monotonic()
                print(f"  {record['status']}, {shown - started:.0f} s", file=sys.stderr, flush=True)
    if record["status"] != "succeeded":
        raise CLIError(f"evaluation {record['id']} {record['status']}: {record['error']}")
    if args.json:
        print(json.dumps(record["result"], indent=2))
    else:
        print_eval(record["result"])
    return 0


def cmd_models_card(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        card = client.model_card(args.name)
    if args.json:
        print(json.dumps(card, indent=2, default=str))
        return 0
    print(f"{card['version']} ({card['kind']}), parent {card['parent'] or '-'}", end="")
    print(f", aliases: {', '.join(card['aliases'])}" if card["aliases"] else "")
    evaluation = card["evaluation"]
    if evaluation is None:
        print("evaluation: none yet" + (f"; `studio eval {card['version']}`" if card["parent"] else ""))
    else:
        print(f"evaluation {evaluation['id']}: {evaluation['status']}")
        if card["metrics"]:
            print_eval(
                {
                    "version": card["version"],
                    "against": card["parent"],
                    "metrics": {m["metric"]: m for m in card["metrics"]},
                    "gate": {"passed": card["gate"]["passed"], "reasons": []},
                }
            )
    battle = card["rebattle"]
    if battle is not None:
        line = f"re-battle {battle['campaign']} ({battle['status']}): {battle['votes']} votes"
        if battle.get("win_rate") is not None:
            lo, hi = battle["interval"]
            line += f", wins {battle['win_rate']:.2f} of decisive votes [{lo:.2f}, {hi:.2f}]"
        print(line + (f"\n  verdict: {battle['verdict']}" if battle["verdict"] else ""))
    gate = card["gate"]
    if not gate.get("root"):
        state = "passed" if gate["passed"] else "does not pass"
        print(f"gate: {state}" + ("" if gate["ready"] else " (waiting for evidence)"))
        for reason in gate["reasons"]:
            print(f"  - {reason}")
    for p in card["promotions"]:
        who = p["decided_by"] + (" (forced)" if p["forced"] else "")
        print(f"{str(p['decided_at'])[:19]}  {p['action']:<8} {p['alias']} -> {p['version']}  by {who}")
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


def cmd_backup(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        result = client.backup(args.out)
    print(f"backed up the database to {result['path']} ({result['bytes']:,} bytes)")
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
            board = rate_battle_log(rows, str(args.battles), not args.drop_both_bad, spec)
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
def cmd_demo(args: argparse.Namespace) -> int:
    from studio import demo

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the demo stops its studio and vLLM
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        report = demo.run_demo(
            args.preference,
            data_dir=args.data_dir,
            keep=args.keep,
            config=demo.QUICK if args.quick else demo.FULL,
            port=args.port,
        )
    except demo.DemoError as exc:
        raise CLIError(f"the demo stopped: {exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if all(report.checks.values()) else 3


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
        help="a local Hugging Face model folder to serve instead of the packaged SmolLM2-135M-Instruct; "
        "with --backend-url, the served model's weights (training starts from them; checked to be "
        "the servers' model by config and tokenizer)",
    )
    serve.add_argument(
        "--model-name",
        help="version name for --model or --backend-url "
        "(default: the folder name, or the server's first model)",
    )
    serve.add_argument(
        "--backend-url",
        metavar="URL[,URL...]",
        help="use these running OpenAI-compatible servers (e.g. a vLLM fleet on GPU machines) "
        "instead of starting vLLM here: sampling spreads over them, adapters are hot-loaded into "
        "each (and again after one restarts), a server that is down is skipped",
    )
    serve.add_argument(
        "--shared-dir",
        type=Path,
        help="a folder the studio and the external servers (and training launchers) see at the same "
        "path; adapters loaded into external servers are read from there (default: the data dir)",
    )
    serve.add_argument(
        "--vllm-port",
        type=int,
        help="port of the first managed vLLM (default: a free one; a replacement takes a free one)",
    )
    serve.add_argument("--no-ui", action="store_true", help="serve the REST API only")
    serve.add_argument(
        "--lora",
        choices=LORA_MODES,
        default=Settings.lora,
        help="runtime LoRA in the managed vLLM: 'auto' serves without it (faster sampling on the "
        "CPU) until the first adapter version exists, then switches to a server with it without "
        "a failed request; 'on' always; 'off' never (adapters are refused) "
        f"(default {Settings.lora})",
    )
    serve.add_argument("--no-lora", action="store_true", help="the same as --lora off")
    serve.add_argument(
        "--max-servers",
        type=int,
        default=Settings.max_servers,
        help="managed vLLM processes at once: the base and full-weight versions, each 4-5 GB here; "
        "beyond it the least recently used version nothing uses is stopped, and started again "
        f"when asked for (default {Settings.max_servers})",
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
    serve.add_argument(
        "--no-auto-eval",
        action="store_true",
        help="do not evaluate each new version against its parent when its run finishes (the gate then "
        "holds it until someone runs `studio eval`)",
    )
    launch = serve.add_argument_group(
        "training launchers", "how the runner starts a training stage (docs/scaling.md); runs may pick"
    )
    launch.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=Settings.launcher,
        help="local: one process here; accelerate: `accelerate launch` with --num-processes here; "
        f"ray: a Ray Job on the cluster at --ray-address (default {Settings.launcher})",
    )
    launch.add_argument(
        "--num-processes",
        type=int,
        default=Settings.num_processes,
        help=f"processes per stage under accelerate, data parallel (default {Settings.num_processes})",
    )
    launch.add_argument(
        "--accelerate-config",
        type=Path,
        help="`accelerate launch --config_file` for GPUs: multi-GPU, DeepSpeed ZeRO or FSDP "
        "(data/recipes/gpu/); without it accelerate runs on the CPU (gloo)",
    )
    launch.add_argument(
        "--ray-address",
        help="the Ray cluster's Jobs address, e.g. http://HEAD:8265 (needed by --launcher ray)",
    )
    launch.add_argument(
        "--ray-gpus-per-process",
        type=float,
        default=Settings.ray_gpus_per_process,
        help=f"GPUs a Ray job reserves per process (default {Settings.ray_gpus_per_process}: a CPU job)",
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
    mprom.add_argument(
        "--force",
        action="store_true",
        help="promote although the gate did not pass (its reasons are printed; who forced it is recorded)",
    )
    mcard = models_sub.add_parser(
        "card",
        help="a version's card: metrics against its parent, re-battle, gate, promotions",
        description="A version's metrics beside its parent's (change and 95% interval), its blind "
        "re-battle, the gate's state and reasons, and every promotion decision about it.",
    )
    mcard.add_argument("name", help="model version or alias")
    mcard.add_argument(
        "--json", action="store_true", help="print the card as JSON (as GET /models/NAME/card)"
    )
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
        (mcard, cmd_models_card),
    ):
        data_dir_arg(p)
        url_arg(p)
        p.set_defaults(func=func)

    ev = sub.add_parser(
        "eval",
        help="evaluate a version against its parent on the suites in data/evals",
        description="Run the evaluation suites on a version and the version it is compared with (its "
        "parent by default; stored runs of the same version, suite and seed are reused), print each "
        "metric with the change and its 95% paired-bootstrap interval, and the gate's answer. Needs a "
        "running studio (the model server); waits until the evaluation ends.",
    )
    ev.add_argument("version", help="model version or alias")
    ev.add_argument("--against", help="version to compare with (default: its parent)")
    ev.add_argument(
        "--suite", action="append", default=[], help="a suite (repeat; default: all in data/evals)"
    )
    ev.add_argument("--limit", type=int, help="only the first N items of each suite (default: all)")
    ev.add_argument(
        "--seed", type=int, help=f"seed of every request and of the bootstrap (default {EvalSpec.seed})"
    )
    ev.add_argument("--judge-url", help="an OpenAI-compatible server for the judge (default: the studio's)")
    ev.add_argument("--judge-model", help="the judge's model (default: the served base model)")
    ev.add_argument(
        "--temperature", type=float, help="the consistency suite's temperature (default: the suite's)"
    )
    ev.add_argument(
        "--waive-rebattle",
        action="store_true",
        help="let the gate pass without the blind re-battle's verdict (recorded with the evaluation)",
    )
    ev.add_argument(
        "--json",
        action="store_true",
        help='print exactly {"version", "against", "metrics": {NAME: {"version", "against", "delta", '
        '"ci"}}, "gate": {"passed", "reasons"}}',
    )
    ev.add_argument("--no-wait", action="store_true", help="print the evaluation's id and return at once")
    data_dir_arg(ev)
    url_arg(ev)
    ev.set_defaults(func=cmd_eval)

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
    train.add_argument(
        "--eval-prompt-set",
        help="a prompt set marked for evaluation: the blind re-battle samples it (less any prompt "
        "trained on) instead of the prompts held out of the snapshot",
    )
    train.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        help="how to start each stage: local, accelerate or ray (default: the studio's --launcher)",
    )
    train.add_argument(
        "--num-processes", type=int, help="processes per stage under accelerate (default: the studio's)"
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
        help="versions with fewer battles are marked provisional; this can only raise the leaderboard's own "
        "minimum (studio.ratings.PROVISIONAL_BATTLES), which always applies",
    )
    lb.add_argument(
        "--drop-both-bad",
        # the first name said "loss for both", which is not what it does; kept so scripts still run
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

    bak = sub.add_parser(
        "backup",
        help="copy the database to a new file (safe while the studio runs)",
        description="Write a consistent copy of the whole database (every table, users included) to a "
        "new file. While a studio runs it makes the copy itself (DuckDB's COPY FROM DATABASE, one "
        "snapshot while writes go on); never copy studio.duckdb with cp while a studio holds it. "
        "To restore: stop the studio, put the copy in place of DATA_DIR/studio.duckdb (and remove "
        "studio.duckdb.wal), start it. See docs/operations.md.",
    )
    bak.add_argument("out", type=Path, help="the new file to write, e.g. backups/studio-2026-12-01.duckdb")
    data_dir_arg(bak)
    url_arg(bak)
    bak.set_defaults(func=cmd_backup)

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

    from studio.demo import DEFAULT_PREFERENCE, PREFERENCES

    dm = sub.add_parser(
        "demo",
        help="run the whole loop with scripted people (about an hour on 2 CPU cores; --quick 12-15 min)",
        description="From a fresh data directory: import prompts, sample, label (scripted annotators), "
        "train a reward model, PPO and DPO, hot-load, evaluate, re-battle blind on held-out prompts "
        "(a scripted expert), gate and promote; then a table of every version. Exit code 3 when a "
        "check of the loop failed (docs/demo.md). Preferences: "
        + "; ".join(f"{p.name}: {p.rewards}" for p in PREFERENCES.values()),
    )
    dm.add_argument(
        "--preference",
        choices=list(PREFERENCES),
        default=DEFAULT_PREFERENCE,
        help=f"what the scripted annotators and expert reward (default {DEFAULT_PREFERENCE})",
    )
    dm.add_argument(
        "--data-dir",
        type=Path,
        help="a new or empty folder for the demo's studio (default: a temporary folder, removed at "
        "the end unless --keep)",
    )
    dm.add_argument(
        "--keep",
        action="store_true",
        help="leave the studio running on the data directory afterwards (prints the URL and the "
        "admin password); Ctrl-C stops it",
    )
    dm.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run (12-15 min on 2 cores): fewer prompts and steps, 4-item evaluations",
    )
    dm.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"studio port (default {DEFAULT_PORT}; a free one if taken)",
    )
    dm.set_defaults(func=cmd_demo)
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
