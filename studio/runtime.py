"""The running studio: store, model version, serving backend and sampler, started and stopped together."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from studio.campaigns import aliases, ensure_policy_alias, resolve_model
from studio.config import Settings, is_loopback
from studio.jobs import Runner, register_stage
from studio.launchers import LaunchSettings
from studio.model_prep import (
    ModelError,
    check_hf_folder,
    default_model_ready,
    folder_hash,
    prepare_default_model,
)
from studio.names import check_name
from studio.probe import curve_file, curve_key, load_curve, probe_concurrency, save_curve
from studio.sampling import Sampler
from studio.serving.client import AdapterLoadError, BackendError, OpenAIChatBackend
from studio.serving.identity import check_same_model
from studio.serving.pool import ServingPool
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
        self.pool: ServingPool | None = None
        self.backend: ServingPool | None = None  # the pool: OpenAIChatBackend's interface, routed
        self.sampler: Sampler | None = None
        self.task_sampler: TaskSampler | None = None
        self.runner: Runner | None = None
        self.base_version: str = BASE_VERSION
        self._registering = threading.Lock()  # one version registration at a time
        self._stopping = threading.Event()  # set first by stop(): a running probe gives up

    def start(self) -> None:
        s = self.settings
        self._stopping.clear()
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(s.db_path)
        say(f"store: {s.db_path} (migrations applied now: {self.store.applied_now or 'none'})")
        try:
            self._check_users()
            self.pool = self.backend = ServingPool(
                BASE_VERSION,
                s.log_dir,
                versions=self._full_versions,
                in_use=self._in_use,
                max_servers=s.max_servers,
                startup_timeout=s.vllm_startup_timeout,
                watch_interval=s.watch_interval,
                progress=say,
            )
            if s.backend_urls:
                self._use_external_fleet(s.backend_urls)
            else:
                self._start_managed_vllm()
            self.load_adapters()
            self.pool.start_watcher()
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
        self.runner = Runner(
            self.store,
            s.data_dir,
            partial(register_stage, self),
            max_parallel=s.max_runs,
            launch=LaunchSettings.from_settings(s),
        )
        self.runner.start()

    def serving_probe(self, fresh: bool = False) -> Callable[[], list[dict[str, float]]]:
        """The throughput probe of this studio's server: a curve measured before for the same
        server, model and LoRA setting is reused unless `fresh`; a new one is kept for next time."""
        s, store, backend = self.settings, self.store, self.backend
        assert store is not None and backend is not None
        version = self.base_version
        path = curve_file(s.data_dir)

        def run() -> list[dict[str, float]]:
            # runtime LoRA as the base is served now ("auto" turns it on with the first adapter)
            key = curve_key(
                s.backend_url, store.model_version(version).get("content_hash"), self._base_lora()
            )
            curve = None if fresh else load_curve(path, key)
            if curve is None:
                say("measuring the model server's throughput against requests in flight (about 30 s)")
                curve = probe_concurrency(backend, version, stop=self._stopping)
                save_curve(path, key, curve)
            return curve

        return run

    def _base_lora(self) -> bool | str:
        """Whether the base's servers run with runtime LoRA (the setting, without a pool)."""
        if self.pool is None:
            return self.settings.lora
        return any(e.lora for e in self.pool.endpoints() if e.base == self.base_version)

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
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.settings.port}"  # IPv6 in brackets

    @property
    def server(self) -> VLLMServer | None:
        """The managed vLLM serving the base now (a swap replaces it), or None."""
        if self.pool is None:
            return None
        for ep in self.pool.endpoints():
            if ep.server is not None and ep.base == self.base_version and ep.state in ("up", "down"):
                return ep.server
        return None

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
        assert self.pool is not None
        name, path = self._register_local_model()
        self.base_version = self.pool.base = name
        mode = self.settings.lora
        # "auto": runtime LoRA costs sampling speed on the CPU, so only once an adapter exists
        lora = mode == "on" or (mode == "auto" and any(root == name for _, root in self._stored_adapters()))
        say(f"starting vLLM on {path} as version '{name}'")
        self.pool.start_managed(name, path, lora=lora, port=self.settings.vllm_port)

    def _stored_adapters(self) -> list[tuple[dict[str, Any], str]]:
        """Every registered LoRA version with its root: the full-weight version it is a delta over.

        A trained version's parent may be another adapter (lineage), but every adapter folder is a
        delta over its root's weights (trainers.common.save_policy_adapter), so all load the same way.
        """
        assert self.store is not None
        versions = {v["name"]: v for v in self.store.model_versions()}
        found = []
        for version in versions.values():
            if version["kind"] != "lora":
                continue
            found.append((version, self._root_of(version["name"], versions)))
        return found

    def _root_of(self, name: str, versions: dict[str, dict[str, Any]] | None = None) -> str:
        """The full-weight version under `name` (itself when it is one), following LoRA parents."""
        assert self.store is not None
        versions = versions or {v["name"]: v for v in self.store.model_versions()}
        node, seen = versions.get(name), set()
        while node is not None and node["kind"] == "lora" and node["name"] not in seen:
            seen.add(node["name"])
            node = versions.get(node["parent"]) if node["parent"] else None
        return node["name"] if node is not None else self.base_version

    def load_adapters(self) -> None:
        """Serve every registered LoRA version (at start). One the server refuses is reported in the
        log, /health and the Admin tab, and skipped: the studio serves the others."""
        assert self.pool is not None
        servable = {self.base_version, *self._full_versions()}
        for version, root in self._stored_adapters():
            name = version["name"]
            if root not in servable:
                self.pool.failed[name] = f"its base '{root}' is not a version this studio can serve"
                say(f"version '{name}' is not served: {self.pool.failed[name]}")
            elif self.settings.lora == "off" and not self.settings.backend_urls:
                self.pool.failed[name] = "runtime LoRA is off (studio serve --lora off)"
            else:
                self.pool.adopt_adapter(name, version["path"], root)

    def _full_versions(self) -> dict[str, Path]:
        """Full-weight versions with a model folder here, servable on demand (the base excluded)."""
        if self.store is None:
            return {}
        return {
            v["name"]: Path(v["path"])
            for v in self.store.model_versions()
            if v["kind"] == "full"
            and v["name"] != self.base_version
            and Path(v["path"], "config.json").is_file()
        }

    def _in_use(self) -> set[str]:
        """Versions a server must not be stopped for: aliases' targets, active campaigns' versions."""
        store = self.store
        if store is None:
            return set()
        names = set(aliases(store).values())
        rows = store.query(
            "SELECT c.model, b.versions FROM campaigns c LEFT JOIN battle_campaigns b ON b.name = c.name "
            "WHERE c.status = 'active'"
        )
        for row in rows:
            for name in [row["model"], *(row["versions"] or [])]:
                try:
                    names.add(resolve_model(store, name))
                except StoreError:
                    continue
        return {self._root_of(n) for n in names} | names

    # -- registering versions: served first, stored after (all or nothing) ------------------
    def add_adapter(
        self,
        name: str,
        path: Path,
        source: str,
        meta: dict[str, Any] | None = None,
        parent: str | None = None,
    ) -> dict:
        """Register a LoRA adapter folder as a version, once every server of its base has loaded it.

        A folder the servers refuse is never stored (422); the first adapter over a base served
        without runtime LoRA switches it to a server with it first (blue/green, no failed request)."""
        path = Path(path)
        check_adapter_folder(path)
        if self.store is None or self.pool is None:
            raise BackendError("the model servers are not running yet; try again when /health says ok")
        if self.settings.lora == "off" and not self.settings.backend_urls:
            raise StoreError(
                "this studio serves without runtime LoRA (--lora off); restart it with --lora auto"
            )
        with self._registering:
            digest = folder_hash(path)
            existing = self._existing_version(name, digest)
            if existing is not None:  # the same weights again: make sure they are served
                if name not in self.pool.adapters() and name not in self.pool.failed:
                    self.pool.add_adapter(name, existing["path"], self._root_of(name))
                return existing
            parent = parent or self.base_version
            root = self._root_of(parent)
            served_path, copied = self._shared_path(name, path)
            lora_before = self._base_lora()
            try:
                self.pool.add_adapter(name, str(served_path), root)
                if self.settings.probe and self.task_sampler is not None and self._base_lora() != lora_before:
                    # the base now runs with runtime LoRA, which costs throughput on the CPU: take
                    # its curve (kept from before, or measured now) in the background
                    sampler, probe = self.task_sampler, self.serving_probe()
                    threading.Thread(target=sampler.measure, args=(probe,), daemon=True).start()
                return self.store.register_model_version(
                    name,
                    path=str(served_path),
                    content_hash=digest,
                    source=source,
                    kind="lora",
                    parent=parent,
                    meta=meta,
                )
            except BaseException as exc:
                if name in self.pool.adapters():
                    self.pool.remove_adapter(name)
                if copied:
                    shutil.rmtree(served_path, ignore_errors=True)
                if isinstance(exc, AdapterLoadError):
                    raise StoreError(
                        f"adapter {path}: the model server could not load it ({exc}); nothing was stored"
                    ) from None
                raise

    def add_full_version(
        self,
        name: str,
        path: Path,
        source: str,
        meta: dict[str, Any] | None = None,
        parent: str | None = None,
    ) -> dict:
        """Register a full-weight model folder as a version, once its own vLLM answers.

        Both it and its parent stay servable (a re-battle needs both). A folder vLLM cannot serve
        is never stored (422)."""
        path = Path(path)
        try:
            check_hf_folder(path)
        except ModelError as exc:
            raise StoreError(str(exc).replace("--model ", "model folder ", 1)) from None
        if self.store is None or self.pool is None:
            raise BackendError("the model servers are not running yet; try again when /health says ok")
        with self._registering:
            digest = folder_hash(path)
            existing = self._existing_version(name, digest)
            try:
                self.pool.serve_full(name, path)
            except ServingError as exc:
                self.pool.failed.pop(name, None)
                raise StoreError(
                    f"model folder {path}: vLLM could not serve it ({exc}); nothing was stored"
                ) from None
            if existing is not None:
                return existing
            try:
                return self.store.register_model_version(
                    name,
                    path=str(path.resolve()),
                    content_hash=digest,
                    source=source,
                    kind="full",
                    parent=parent or self.base_version,
                    meta=meta,
                )
            except BaseException:
                self.pool.release(name)
                raise

    def _existing_version(self, name: str, digest: str) -> dict[str, Any] | None:
        """The version already stored under `name` with these weights; an error for other weights
        or a bad name (checked before any server loads anything under that name)."""
        assert self.store is not None
        rows = self.store.query("SELECT content_hash FROM model_versions WHERE name = ?", [name])
        if not rows:
            check_name("version", name)
            return None
        if rows[0]["content_hash"] != digest:
            raise StoreError(
                f"model version '{name}' already exists with other weights "
                f"(hash {rows[0]['content_hash'][:12]}, new {digest[:12]}); pick another name"
            )
        return self.store.model_version(name)

    def _shared_path(self, name: str, path: Path) -> tuple[Path, bool]:
        """Where the servers read the adapter, and whether it is a copy made for them: the folder
        itself, unless external servers need it under the shared directory (the one folder they
        see at the same path)."""
        shared = self.settings.shared_dir
        assert shared is not None
        path = path.resolve()
        if not self.settings.backend_urls or path.is_relative_to(shared.resolve()):
            return path, False
        target = shared / "adapters" / name
        shutil.rmtree(target, ignore_errors=True)  # a copy left by an attempt that was refused
        tmp = target.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp)
        tmp.rename(target)
        return target.resolve(), True

    def _use_external_fleet(self, urls: list[str]) -> None:
        """Serve from running servers: each must answer and serve the same model (checked against
        --model's config and tokenizer when given); one that is down is skipped and watched."""
        assert self.store is not None and self.pool is not None
        s = self.settings
        cards: dict[str, list[dict[str, Any]]] = {}
        down: dict[str, str] = {}
        for url in urls:
            try:
                with OpenAIChatBackend(url) as client:
                    cards[url] = client.model_cards()
            except BackendError as exc:
                down[url] = str(exc)
        if not cards:
            raise ServingError(
                "--backend-url: no server answered /v1/models ("
                + "; ".join(f"{u}: {e}" for u, e in down.items())
                + "); check the URLs and that the servers run"
            )
        first = next(iter(cards.values()))
        base_ids = [str(c["id"]) for c in first if not c.get("parent")] or [str(c["id"]) for c in first]
        name = s.model_name or base_ids[0]
        for url, served in cards.items():
            ids = [str(c["id"]) for c in served]
            if name not in ids:
                raise ServingError(
                    f"--model-name {name}: the server at {url} serves {', '.join(ids)}; pick one"
                )
        for url, error in down.items():
            say(f"--backend-url {url} does not answer ({error}); skipped until it does")
        if s.model is not None:
            check_hf_folder(s.model)
            for url in cards:
                facts = check_same_model(url, name, s.model)
                say(f"{url} serves the same model as {s.model}: {facts}")
            digest = cached_folder_hash(s.model, s.data_dir / "cache" / "model-hashes.json")
            path = str(s.model.resolve())
        else:
            say(
                "--backend-url without --model: training stages cannot start from this base "
                "(pass --model DIR, the served model's weights)"
            )
            digest = "external:" + hashlib.sha256(f"{urls[0]}|{name}".encode()).hexdigest()
            path = urls[0]
        self.store.register_model_version(
            name,
            path=path,
            content_hash=digest,
            source="external:" + ",".join(urls),
            served_id=True,  # requests must name the model exactly as those servers do
        )
        self.base_version = self.pool.base = name
        for url in urls:
            self.pool.add_external(url)
        say(f"serving '{name}' from {len(urls)} external server(s): {', '.join(urls)}")

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
        self._stopping.set()
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
        if self.pool is not None:
            if any(ep.server is not None for ep in self.pool.endpoints()):
                say("stopping vLLM")
            self.pool.stop()
            self.pool = self.backend = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self.sampler = None

    def serving_state(self) -> dict[str, Any] | None:
        """The model server's state without asking it (cheap enough for every empty next task):
        {"state": starting | ready | restarting | failed | stopped, "restarts": N, "last_error"}
        for the managed vLLM, {"state": "ready"} for an external server, None without one."""
        if self.server is not None:
            return {
                "state": self.server.state,
                "restarts": self.server.restarts,
                "last_error": self.server.last_error,
            }
        return {"state": "ready", "restarts": 0, "last_error": None} if self.backend is not None else None

    def health(self) -> dict[str, Any]:
        store_state: dict[str, Any] = {"path": str(self.settings.db_path), "ok": False}
        if self.store is not None:
            try:
                store_state.update(ok=True, migrations=self.store.migrations())
            except Exception as exc:  # report, never crash the health route
                store_state["error"] = str(exc)
        backend = self.pool.status() if self.pool is not None else {"kind": "none", "healthy": False}
        ok = store_state["ok"] and bool(backend.get("healthy"))
        return {
            "studio": "ok" if ok else "degraded",
            "store": store_state,
            "backend": backend,
            "base_version": self.base_version,
        }


def check_adapter_folder(path: Path) -> int:
    """The adapter's rank, once its folder is a PEFT adapter the servers may load; else a StoreError
    (422) naming what is wrong."""
    config = path / "adapter_config.json"
    if not path.is_dir():
        raise StoreError(f"adapter {path}: no such folder; pass a PEFT adapter folder (save_pretrained)")
    if not config.is_file():
        raise StoreError(f"adapter {path}: adapter_config.json is missing; pass a PEFT adapter folder")
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"adapter {path}: adapter_config.json is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise StoreError(f"adapter {path}: adapter_config.json is not a JSON object")
    rank = data.get("r")
    if type(rank) is not int or rank < 1:
        raise StoreError(
            f"adapter {path}: adapter_config.json has r={json.dumps(rank)[:40]}; expected the LoRA "
            f"rank, a whole number from 1 to {MAX_LORA_RANK}"
        )
    if rank > MAX_LORA_RANK:
        raise StoreError(f"adapter {path}: rank {rank} is above the served maximum {MAX_LORA_RANK}")
    return rank
