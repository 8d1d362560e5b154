"""The `studio` command. Every sub-command has --help."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from studio.config import DEFAULT_PORT, Settings, default_data_dir
from studio.importer import FORMATS, PromptFileError, read_prompts
from studio.store import DB_FILE, Store, StoreError, StoreLockedError

SERVER_FILE = "server.json"  # written by a running studio (runtime.Studio): where to reach it


class CLIError(Exception):
    """A message for the user; the command exits with status 1."""


def studio_url(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return args.url.rstrip("/")
    info = Path(args.data_dir) / SERVER_FILE
    if info.is_file():
        return json.loads(info.read_text())["url"].rstrip("/")
    return f"http://127.0.0.1:{DEFAULT_PORT}"


def rest(args: argparse.Namespace, method: str, route: str, **kwargs: Any) -> Any:
    url = studio_url(args)
    try:
        resp = httpx.request(method, f"{url}/api/v1{route}", timeout=600.0, **kwargs)
    except httpx.HTTPError:
        raise CLIError(
            f"no studio answers at {url}. Start one with `studio serve` in another terminal, "
            "or pass --url to reach a studio elsewhere."
        ) from None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise CLIError(f"the studio at {url} refused it (HTTP {resp.status_code}): {detail}")
    return resp.json()


def with_store_or_rest(
    args: argparse.Namespace, direct: Callable[[Store], Any], via_rest: Callable[[], Any]
) -> Any:
    """Use the database directly when it is free; go through the running studio when it holds it."""
    if getattr(args, "url", None):
        return via_rest()
    try:
        store = Store(Path(args.data_dir) / DB_FILE)
    except StoreLockedError as exc:
        try:
            return via_rest()
        except CLIError as rest_error:
            raise CLIError(f"{exc}\n({rest_error})") from None
    try:
        return direct(store)
    finally:
        store.close()


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
    uvicorn.run(create_app(settings, studio), host=settings.host, port=settings.port, log_level="warning")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args.file, args.format, args.split)
    except PromptFileError as exc:
        raise CLIError(f"{exc}\nNothing was imported.") from None
    source = str(Path(args.file).resolve())

    def direct(store: Store) -> str:
        return store.import_prompts(args.set, prompts, source=source).summary()

    def via_rest() -> str:
        body = {
            "source": source,
            "records": [_record(p) for p in prompts],
            "locations": [p.location for p in prompts],
        }
        return rest(args, "POST", f"/prompt-sets/{args.set}/prompts", json=body)["summary"]

    try:
        print(with_store_or_rest(args, direct, via_rest))
    except StoreError as exc:
        raise CLIError(f"{exc}\nNothing was imported.") from None
    return 0


def _record(p: Any) -> dict[str, Any]:
    record = {"messages": p.messages, **p.metadata}
    if p.external_id is not None:
        record["id"] = p.external_id
    return record


def cmd_models_list(args: argparse.Namespace) -> int:
    def direct(store: Store) -> list[dict[str, Any]]:
        return [{k: str(v) if k == "created_at" else v for k, v in m.items()} for m in store.model_versions()]

    models = with_store_or_rest(args, direct, lambda: rest(args, "GET", "/models")["models"])
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


def cmd_sample(args: argparse.Namespace) -> int:
    body = {
        "prompt": args.prompt,
        "n": args.n,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "model": args.model,
    }
    result = rest(args, "POST", "/sample", json=body)
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

    serve = sub.add_parser(
        "serve",
        help="start vLLM and the studio (UI at /, REST at /api/v1)",
        description="Prepare the model, start vLLM and serve the studio.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; loopback only until users exist (default 127.0.0.1)",
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="studio port (default 8000)")
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

    sample = sub.add_parser(
        "sample",
        help="sample completions from the served model and store them",
        description="Sample through the running studio; every completion is stored.",
    )
    sample.add_argument("prompt", help="the user prompt")
    sample.add_argument("-n", type=int, default=1, help="number of completions (default 1)")
    sample.add_argument("--temperature", type=float, default=0.8, help="default 0.8")
    sample.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    sample.add_argument("--max-tokens", type=int, default=128, help="default 128")
    sample.add_argument("--seed", type=int, help="sampling seed, for reproducible completions")
    sample.add_argument("--model", help="model version (default: the served base)")
    sample.add_argument("--json", action="store_true", help="print the stored rows as JSON")
    data_dir_arg(sample)
    url_arg(sample)
    sample.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, StoreLockedError) as exc:
        print(f"studio: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
