"""The running studio: store, model version, serving backend and sampler, started and stopped together."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from studio.campaigns import ensure_policy_alias
from studio.config import Settings, is_loopback
from studio.jobs import Runner, register_stage
from studio.model_prep import (
    check_hf_folder,
    default_model_ready,
    folder_hash,
    prepare_default_model,
)
from studio.probe import curve_file, curve_key, load_curve, probe_concurrency, save_curve
from studio.sampling import Sampler
from studio.serving.client import OpenAIChatBackend
from studio.serving.vllm_server import MAX_LORA_RANK, ServingError, VLLMServer
from studio.store import Store, StoreError
from studio.task_sampler import TaskSampler
from studio.users import BOOTSTRAP_FILE, bootstrap_admin, user_count

BASE_VERSION = "base"


def say(message: str) -> None:
    print(f"[studio] {message}", file=sys.stderr, flush=True)


def version_name_for(path: Path) -> str:
    """A version name (studio.names' rule) from a model folder's name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).lstrip("._-")[:64].rstrip("-")
    return name or "model"


def cached_folder_hash(folder: Path, cache_file: Path) -> str:
    """Hash a model folder once per change of its files (a 7B folder takes minutes to hash)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    signature = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    key = hashlib.sha256(signature.encode()).hexdigest()
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        cache[key] = folder_hash(folder)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache))
    return cache[key]


class Studio:
    """Everything one studio process owns. `start()` brings it up, `stop()` takes it down."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: Store | None = None
        self.server: VLLMServer | None = None
        self.backend: OpenAIChatBackend | None = None
        self.sampler: Sampler | None = None
        self.task_sampler: TaskSampler | None = None
        self.runner: Runner | None = None
        self.base_version: str = BASE_VERSION

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(s.db_path)
        say(f"store: {s.db_path} (migrations applied now: {self.store.applied_now or 'none'})")
        try:
            self._check_users()
            if s.backend_url:
                self._use_external_backend(s.backend_url)
            else:
                self._start_managed_vllm()
        except BaseException:
            self.stop()
            raise
        assert self.backend is not None
        self.sampler = Sampler(self.store, self.backend)
        ensure_policy_alias(self.store, self.base_version)
        self.task_sampler = TaskSampler(
            self.store, self.sampler, probe=self.serving_probe() if s.probe else None
        )
        self.task_sampler.start()
        self.runner = Runner(self.store, s.data_dir, partial(register_stage, self), max_parallel=s.max_runs)
        self.runner.start()

    def serving_probe(self, fresh: bool = False) -> Callable[[], list[dict[str, float]]]:
        """The throughput probe of this studio's server: a curve measured before for the same
        server, model and LoRA setting is reused unless `fresh`; a new one is kept for next time."""
        s, store, backend = self.settings, self.store, self.backend
        assert store is not None and backend is not None
        version = self.base_version
        key = curve_key(s.backend_url, store.model_version(version).get("content_hash"), s.lora)
        path = curve_file(s.data_dir)

        def run() -> list[dict[str, float]]:
            curve = None if fresh else load_curve(path, key)
            if curve is None:
                say("measuring the model server's throughput against requests in flight (about 30 s)")
                curve = probe_concurrency(backend, version)
                save_curve(path, key, curve)
            return curve

        return run

    def announce(self) -> None:
        """Called once the HTTP server listens: tell the user, and tell CLI commands where we are."""
        # CLI commands read this to find the running studio (the database is ours now).
        self._server_file.write_text(json.dumps({"url": self.url, "pid": os.getpid()}))
        say(f"Preference Studio is ready: open {self.url}/")

    @property
    def started(self) -> bool:
        return self.sampler is not None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def _server_file(self) -> Path:
        return self.settings.data_dir / "server.json"

    def _register_local_model(self) -> tuple[str, Path]:
        s, store = self.settings, self.store
        assert store is not None
        if s.model is None:
            if not default_model_ready(s.data_dir):
                say(
                    "converting the packaged model SmolLM2-135M-Instruct from GGUF "
                    "(first start only, about 30 s)"
                )
            prepared = prepare_default_model(s.data_dir)
            name = s.model_name or BASE_VERSION
            store.register_model_version(
                name,
                path=str(prepared.path),
                content_hash=prepared.content_hash,
                source=prepared.source,
            )
            return name, prepared.path
        check_hf_folder(s.model)
        name = s.model_name or version_name_for(s.model)
        say(f"hashing model folder {s.model} (cached after the first start)")
        digest = cached_folder_hash(s.model, s.data_dir / "cache" / "model-hashes.json")
        store.register_model_version(
            name, path=str(s.model.resolve()), content_hash=digest, source=f"local:{s.model.resolve()}"
        )
        return name, s.model

    def _start_managed_vllm(self) -> None:
        name, path = self._register_local_model()
        self.base_version = name
        self.server = VLLMServer(
            path,
            name,
            self.settings.log_dir / "vllm.log",
            port=self.settings.vllm_port,
            startup_timeout=self.settings.vllm_startup_timeout,
            lora=self.settings.lora,
            progress=say,
        )
        say(f"starting vLLM on {path} as version '{name}'")
        self.server.start()
        self.backend = OpenAIChatBackend(self.server.url)
        self.server.on_restart = self.load_adapters
        self.load_adapters()

    def load_adapters(self) -> None:
        """Serve every registered LoRA version over the base (after a start or a restart of vLLM).

        A trained version's parent may be another adapter (lineage), but every adapter folder is a
        delta over the base weights (trainers.common.save_policy_adapter), so all load the same way.
        """
        assert self.store is not None and self.backend is not None
        versions = {v["name"]: v for v in self.store.model_versions()}
        for version in versions.values():
            root, seen = version, set()
            while root["kind"] == "lora" and root["parent"] in versions and root["name"] not in seen:
                seen.add(root["name"])
                root = versions[root["parent"]]
            if version["kind"] == "lora" and root["name"] == self.base_version:
                self.backend.load_lora(version["name"], version["path"])

    def add_adapter(
        self,
        name: str,
        path: Path,
        source: str,
        meta: dict[str, Any] | None = None,
        parent: str | None = None,
    ) -> dict:
        """Register a LoRA adapter folder (a delta over the base) as a version and hot-load it into vLLM."""
        assert self.store is not None and self.backend is not None
        config = path / "adapter_config.json"
        if not config.is_file():
            raise StoreError(f"adapter {path}: adapter_config.json is missing; pass a PEFT adapter folder")
        rank = json.loads(config.read_text()).get("r", 0)
        if self.server is not None and not self.settings.lora:
            raise StoreError("this studio runs vLLM with --no-lora; restart it without that flag")
        if rank > MAX_LORA_RANK:
            raise StoreError(f"adapter {path}: rank {rank} is above the served maximum {MAX_LORA_RANK}")
        version = self.store.register_model_version(
            name,
            path=str(path.resolve()),
            content_hash=folder_hash(path),
            source=source,
            kind="lora",
            parent=parent or self.base_version,
            meta=meta,
        )
        self.backend.load_lora(name, str(path.resolve()))
        return version

    def _use_external_backend(self, url: str) -> None:
        assert self.store is not None
        backend = OpenAIChatBackend(url)
        try:
            served = backend.models()
        except Exception as exc:
            backend.close()
            raise ServingError(
                f"--backend-url {url}: no OpenAI-compatible server answered /v1/models ({exc}); "
                "check the URL and that the server is running"
            ) from None
        name = self.settings.model_name or served[0]
        if name not in served:
            backend.close()
            raise ServingError(
                f"--model-name {name}: the server at {url} serves {', '.join(served)}; pick one"
            )
        self.store.register_model_version(
            name,
            path=url,
            content_hash="external:" + hashlib.sha256(f"{url}|{name}".encode()).hexdigest(),
            source=f"external:{url}",
            served_id=True,  # requests must name the model exactly as that server does
        )
        self.base_version = name
        self.backend = backend
        say(f"using the external server at {url}, model '{name}'")

    def _check_users(self) -> None:
        assert self.store is not None
        if not is_loopback(self.settings.host):
            if not user_count(self.store):
                # anyone who reaches the port would meet an account-less studio
                raise ServingError(
                    f"--host {self.settings.host}: no users exist yet, so the studio serves only on "
                    "a loopback address. Create an admin first (`studio users add NAME --role admin`), "
                    "or use --host 127.0.0.1"
                )
            return
        creds = bootstrap_admin(self.store, self.settings.data_dir)
        if creds:
            say(
                f"created the first user: admin / {creds['password']} (also in "
                f"{self.settings.data_dir / BOOTSTRAP_FILE}, readable only by you). "
                "Add people with `studio users add NAME --role ROLE`."
            )

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        if self.task_sampler is not None:
            self.task_sampler.stop()
            self.task_sampler = None
        try:
            if json.loads(self._server_file.read_text()).get("pid") == os.getpid():
                self._server_file.unlink()
        except (OSError, ValueError):
            pass
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.server is not None:
            say("stopping vLLM")
            self.server.stop()
            self.server = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self.sampler = None

    def health(self) -> dict[str, Any]:
        store_state: dict[str, Any] = {"path": str(self.settings.db_path), "ok": False}
        if self.store is not None:
            try:
                store_state.update(ok=True, migrations=self.store.migrations())
            except Exception as exc:  # report, never crash the health route
                store_state["error"] = str(exc)
        if self.server is not None:
            backend = self.server.status()
        elif self.backend is not None:
            backend = {"kind": "external", "url": self.backend.base_url, "healthy": self.backend.health()}
        else:
            backend = {"kind": "none", "healthy": False}
        ok = store_state["ok"] and bool(backend.get("healthy"))
        return {
            "studio": "ok" if ok else "degraded",
            "store": store_state,
            "backend": backend,
            "base_version": self.base_version,
        }
