"""The serving pool: every model server the studio samples from, behind one backend.

An endpoint is an OpenAI-compatible server: a vLLM process the studio manages (`VLLMServer`), or
an external one (`--backend-url`). Each runs one full-weight model under a name (the studio's
base version, or a full-weight version trained with `lora: false`) and, when runtime LoRA is on,
the LoRA adapters loaded into it. The pool has `OpenAIChatBackend`'s methods (`chat`,
`tokenize`, `token_logprob`, `next_token_logprobs`, `max_model_len`, `models`, `health`), so the
sampler, the task sampler, evaluation and the services use it as they used one server.

- **Routing.** A request for model M goes to an endpoint that is up and serves M, the one with
  the fewest requests in flight (then the least recently used), so sampling spreads over the
  servers. An adapter an up server lacks is loaded into it first; a full-weight version no
  server runs is started on demand.
- **Retry.** A request that fails because its endpoint went away (no answer, a 5xx, or a 404
  for a model it lost in a restart) is retried once, on another endpoint serving M (or on the
  same one once the lost adapter is loaded again), without the caller seeing it. A refusal of
  the request itself (a 4xx) is the caller's and is never retried.
- **Blue/green.** A server is replaced by starting the new one, checking its health, loading
  its adapters, routing to it, and only then draining the old one (it gets no new requests;
  those in flight finish) and stopping it. The LoRA switch (a base served without runtime LoRA
  until the first adapter exists) is such a replacement.
- **Memory.** Each managed vLLM holds its weights, a KV cache and its own Python/torch runtime
  (about 4-5 GB of RSS for the packaged model with a 2 GiB KV cache; benchmarks/README.md). At
  most `max_servers` run at once; starting another stops the least recently used full-weight
  server whose version nothing uses (not the base, not an alias's target such as `policy`, not
  in an active campaign or battle) and it starts again when asked for. A replacement holds one
  server more while both run.
- **Watcher.** Every `watch_interval` seconds each endpoint's `/v1/models` is read: a server
  that does not answer is marked down and skipped (shown in /health and the Admin tab), one
  that answers again is marked up, and adapters it lacks (an external server that restarted)
  are loaded into it again.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from studio.serving.client import (
    AdapterLoadError,
    BackendError,
    BackendUnavailable,
    ChatResult,
    ModelNotServed,
    OpenAIChatBackend,
    SamplingParams,
)
from studio.serving.vllm_server import VLLMServer

T = TypeVar("T")
Progress = Callable[[str], None]

# A request in flight on a server being retired finishes first: longer than the client's timeout.
DRAIN_TIMEOUT_S = 660.0
# A full-weight version whose server failed to start is not started again for this long (the
# task sampler asks every few seconds; each try costs a minute of CPU).
START_RETRY_S = 300.0


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    root: str  # the full-weight model (served name) it is a delta over


@dataclass(eq=False)
class Endpoint:
    """One server in the pool, and what the pool knows of it."""

    id: str
    url: str
    base: str  # the full-weight model it runs, under this served name
    client: OpenAIChatBackend
    server: VLLMServer | None = None  # None: an external server
    lora: bool = True  # accepts runtime LoRA adapters
    state: str = "starting"  # starting | up | down | draining | stopped
    models: frozenset[str] = frozenset()  # what it serves (its /v1/models at the last look)
    in_flight: int = 0
    answered: int = 0
    last_used: float = 0.0
    last_error: str | None = None
    refused: dict[str, str] = field(default_factory=dict)  # adapters it refused since it came up
    sync: threading.Lock = field(default_factory=threading.Lock)

    @property
    def routable(self) -> bool:
        return self.state == "up" and (self.server is None or self.server.state == "ready")

    def describe(self) -> dict[str, Any]:
        server = self.server
        state = self.state
        if server is not None and state in ("up", "down") and server.state != "ready":
            state = server.state  # restarting / failed, as the process watchdog says
        return {
            "id": self.id,
            "kind": "managed" if server is not None else "external",
            "url": self.url,
            "state": state,
            "base": self.base,
            "serves": sorted(self.models),
            "lora": self.lora,
            "in_flight": self.in_flight,
            "answered": self.answered,
            "last_error": self.last_error or (server.last_error if server is not None else None),
            "pid": server.pid if server is not None else None,
            "restarts": server.restarts if server is not None else 0,
            "log": str(server.log_path) if server is not None else None,
        }


class ServingPool:
    """The studio's model servers behind `OpenAIChatBackend`'s interface (see the module doc).

    `versions()` lists the full-weight versions that can be served on demand (name -> model
    folder; the base excluded); `in_use()` the versions that must stay served (aliases' targets,
    active campaigns and battles).
    """

    def __init__(
        self,
        base: str,
        log_dir: Path,
        *,
        versions: Callable[[], dict[str, Path]] | None = None,
        in_use: Callable[[], set[str]] | None = None,
        max_servers: int = 2,
        startup_timeout: float = 600.0,
        max_model_len: int = 2048,
        kv_cache_gib: int = 2,
        version_kv_cache_gib: int = 1,
        watch_interval: float = 5.0,
        progress: Progress | None = None,
    ):
        self.base = base
        self.log_dir = Path(log_dir)
        self.versions = versions or dict
        self.in_use = in_use or set
        self.max_servers = max_servers
        self.startup_timeout = startup_timeout
        # the context a managed server is started with (not `max_model_len`: that is the method
        # that reads what the servers serve, as OpenAIChatBackend's)
        self.server_context = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.version_kv_cache_gib = version_kv_cache_gib
        self.watch_interval = watch_interval
        self.say = progress or (lambda msg: print(f"[studio] {msg}", file=sys.stderr, flush=True))
        self.failed: dict[str, str] = {}  # versions that could not be served: name -> why
        self._failed_at: dict[str, float] = {}
        self._endpoints: list[Endpoint] = []
        self._adapters: dict[str, Adapter] = {}
        self._cond = threading.Condition()
        self._topology = threading.RLock()  # one start, swap or stop at a time
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- the endpoints ----------------------------------------------------------------------
    def endpoints(self) -> list[Endpoint]:
        with self._cond:
            return list(self._endpoints)

    def add_external(self, url: str) -> Endpoint:
        """Add a running server (it must serve `self.base`); one that is down now is added as down."""
        client = OpenAIChatBackend(url)
        ep = Endpoint(id=client.base_url, url=client.base_url, base=self.base, client=client, state="down")
        try:
            self._sync(ep)
            ep.state = "up"
        except BackendError as exc:
            ep.last_error = str(exc)
        with self._cond:
            self._endpoints.append(ep)
        return ep

    def start_managed(
        self, name: str, path: Path, *, lora: bool, port: int | None = None, kv_cache_gib: int | None = None
    ) -> Endpoint:
        """Start a vLLM for `path` served as `name`, wait for its health, load its adapters, route to it."""
        with self._topology:
            ep = self._launch(name, path, lora=lora, port=port, kv_cache_gib=kv_cache_gib)
            self._go_live(ep)
            return ep

    def _launch(
        self, name: str, path: Path, *, lora: bool, port: int | None = None, kv_cache_gib: int | None = None
    ) -> Endpoint:
        ep_id = f"{name}-{next(self._ids)}"
        server = VLLMServer(
            Path(path),
            name,
            self.log_dir / f"vllm-{ep_id}.log",
            port=port,
            max_model_len=self.server_context,
            kv_cache_gib=kv_cache_gib or self.kv_cache_gib,
            startup_timeout=self.startup_timeout,
            lora=lora,
            progress=self.say,
        )
        ep = Endpoint(
            id=ep_id,
            url=server.url,
            base=name,
            client=OpenAIChatBackend(server.url),
            server=server,
            lora=lora,
        )
        with self._cond:
            self._endpoints.append(ep)  # listed as starting, never routed to until it is up
        self.say(
            f"starting vLLM for '{name}' at {server.url} "
            f"(runtime LoRA {'on' if lora else 'off'}; log: {server.log_path})"
        )
        try:
            server.start()
        except BaseException:
            server.stop()
            ep.client.close()
            with self._cond:
                self._endpoints.remove(ep)
            raise
        server.on_restart = lambda: self._check(ep)  # adapters are lost with the process
        return ep

    def _go_live(self, ep: Endpoint) -> None:
        try:
            self._sync(ep)
        except BaseException:
            self._stop_endpoint(ep)
            raise
        self._mark(ep, "up", quiet=True)

    def _retire(self, ep: Endpoint) -> None:
        """Route nothing new to it, let what it has in flight finish, then stop it."""
        with self._cond:
            ep.state = "draining"
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while ep.in_flight > 0 and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
        self._stop_endpoint(ep)

    def _stop_endpoint(self, ep: Endpoint) -> None:
        ep.state = "stopped"
        if ep.server is not None:
            ep.server.stop()
        ep.client.close()
        with self._cond:
            if ep in self._endpoints:
                self._endpoints.remove(ep)

    def replace(self, old: Endpoint, *, lora: bool) -> Endpoint:
        """Blue/green: a new server for the same model, live before the old one is drained and stopped."""
        assert old.server is not None, "only a managed server can be replaced"
        with self._topology:
            self.say(f"replacing {old.id} (runtime LoRA {'on' if lora else 'off'}); it serves meanwhile")
            new = self._launch(
                old.base, old.server.model_dir, lora=lora, kv_cache_gib=old.server.kv_cache_gib
            )
            self._go_live(new)
            self._retire(old)
            self.say(f"{new.id} serves '{old.base}' now; {old.id} drained and stopped")
            return new

    def serve_full(self, name: str, path: Path, *, lora: bool = False) -> Endpoint:
        """Serve a full-weight version on its own managed server (started unless one runs)."""
        with self._topology:
            for ep in self.endpoints():
                if ep.base == name and ep.state in ("up", "down"):
                    return ep
            self._make_room()
            try:
                ep = self._launch(
                    name,
                    path,
                    lora=lora or any(a.root == name for a in self._adapters.values()),
                    kv_cache_gib=self.version_kv_cache_gib,
                )
                self._go_live(ep)
            except Exception as exc:
                self._failed_at[name] = time.monotonic()
                self.failed[name] = str(exc).splitlines()[0][:300]
                raise
            self.failed.pop(name, None)
            return ep

    def release(self, name: str) -> None:
        """Stop serving a full-weight model: its managed servers drain and stop."""
        with self._topology:
            for ep in self.endpoints():
                if ep.base == name and ep.server is not None:
                    self._retire(ep)

    def _make_room(self) -> None:
        """Stop the least recently used full-weight server nothing uses, when the limit is reached."""
        managed = [e for e in self.endpoints() if e.server is not None and e.state != "stopped"]
        if len(managed) < self.max_servers:
            return
        in_use = self.in_use()
        idle = [e for e in managed if e.base != self.base and e.base not in in_use]
        if not idle:
            raise BackendError(
                f"{len(managed)} model servers run (--max-servers {self.max_servers}) and each serves a "
                f"version in use ({', '.join(sorted(e.base for e in managed))}): close a campaign, "
                "point the alias elsewhere, or raise --max-servers if the memory allows"
            )
        victim = min(idle, key=lambda e: e.last_used)
        self.say(
            f"stopping the server of '{victim.base}' (least recently used; at most {self.max_servers} "
            "servers run); it starts again when asked for"
        )
        self._retire(victim)

    def ensure_lora(self, root: str) -> None:
        """Make the servers of `root` accept runtime LoRA: start one, or switch by blue/green."""
        with self._topology:
            eps = [e for e in self.endpoints() if e.base == root and e.state in ("up", "down")]
            if not eps:
                folder = self.versions().get(root)
                if folder is None:
                    raise BackendError(
                        f"no model server serves '{root}', so no adapter over it can be loaded"
                    )
                self.serve_full(root, folder, lora=True)
                return
            for ep in eps:
                if not ep.lora and ep.server is not None:
                    self.replace(ep, lora=True)

    # -- adapters ---------------------------------------------------------------------------
    def adapters(self) -> dict[str, Adapter]:
        with self._cond:
            return dict(self._adapters)

    def add_adapter(self, name: str, path: str, root: str) -> None:
        """Load an adapter into every up server of `root`; all of them or none (loads are undone).

        `AdapterLoadError`: a server refused it. `BackendError`: no server of `root` answered."""
        self.ensure_lora(root)
        targets = [e for e in self.endpoints() if e.base == root and e.lora and e.routable]
        loaded: list[Endpoint] = []
        unreachable: list[str] = []
        try:
            for ep in targets:
                try:
                    with ep.sync:
                        ep.client.load_lora(name, path)
                except BackendUnavailable as exc:  # gone meanwhile: the watcher loads it when it is back
                    unreachable.append(f"{ep.id}: {exc}")
                    continue
                loaded.append(ep)
                with self._cond:
                    ep.models = ep.models | {name}
        except BaseException:
            for ep in loaded:
                self._unload(ep, name)
            raise
        if not loaded:
            raise BackendError(
                f"no model server of '{root}' answered, so adapter '{name}' could not be loaded "
                f"({'; '.join(unreachable) or 'none is up'}); try again when /health shows one up"
            )
        with self._cond:
            self._adapters[name] = Adapter(name, path, root)
        self.failed.pop(name, None)

    def adopt_adapter(self, name: str, path: str, root: str) -> bool:
        """A stored adapter at start: load it where its root is served; a refusal is reported and
        the adapter skipped (False), so one bad version never stops the studio."""
        if not any(e.base == root and e.state in ("up", "down") for e in self.endpoints()):
            with self._cond:  # its root starts on demand, and loads it then
                self._adapters[name] = Adapter(name, path, root)
            return True
        try:
            self.add_adapter(name, path, root)
        except BackendError as exc:
            if not isinstance(exc, AdapterLoadError):
                with self._cond:  # no server answered now; the watcher loads it when one does
                    self._adapters[name] = Adapter(name, path, root)
                return True
            self.failed[name] = str(exc)
            self.say(f"version '{name}' is not served: {exc}. The other versions are.")
            return False
        return True

    def remove_adapter(self, name: str) -> None:
        with self._cond:
            self._adapters.pop(name, None)
        for ep in self.endpoints():
            if name in ep.models:
                self._unload(ep, name)

    def _unload(self, ep: Endpoint, name: str) -> None:
        try:
            with ep.sync:
                ep.client.unload_lora(name)
        except BackendError:
            pass  # a server that went away lost it anyway
        with self._cond:
            ep.models = ep.models - {name}

    # -- keeping in step with the servers ---------------------------------------------------
    def _sync(self, ep: Endpoint) -> None:
        """Read what the endpoint serves and load the adapters over its model that it lacks.

        Raises `BackendUnavailable` when it does not answer or does not serve its model."""
        with ep.sync:
            served = set(ep.client.models())
            if ep.base not in served:
                raise BackendUnavailable(
                    f"the server at {ep.url} does not serve '{ep.base}' "
                    f"(it serves {', '.join(sorted(served)) or 'nothing'})"
                )
            if ep.lora:
                for adapter in self.adapters().values():
                    if adapter.root != ep.base or adapter.name in served or adapter.name in ep.refused:
                        continue
                    try:
                        ep.client.load_lora(adapter.name, adapter.path)
                    except AdapterLoadError as exc:
                        ep.refused[adapter.name] = str(exc)
                        ep.last_error = str(exc)
                        self.say(f"{ep.id} refused adapter '{adapter.name}': {exc}")
                        continue
                    served.add(adapter.name)
                    if ep.state != "starting":
                        self.say(f"loaded adapter '{adapter.name}' into {ep.id} again")
            with self._cond:
                ep.models = frozenset(served)

    def _mark(self, ep: Endpoint, state: str, error: str | None = None, quiet: bool = False) -> None:
        with self._cond:
            if ep.state in ("draining", "stopped"):
                return
            before, ep.state = ep.state, state
            if state == "down":
                ep.models = frozenset()
                ep.refused = {}
                ep.last_error = error or ep.last_error
        if before == state or quiet:
            return
        if state == "down":
            self.say(f"model server {ep.id} is down ({error}); requests go to the others meanwhile")
        elif state == "up":
            self.say(f"model server {ep.id} is up again")

    def _check(self, ep: Endpoint) -> None:
        """One look at one endpoint (the watcher's, and after a managed server's restart)."""
        if ep.state in ("starting", "draining", "stopped"):
            return
        if ep.server is not None and ep.server.state != "ready":
            self._mark(ep, "down", ep.server.last_error or f"vLLM is {ep.server.state}")
            return
        try:
            self._sync(ep)
        except BackendError as exc:
            self._mark(ep, "down", str(exc))
            return
        self._mark(ep, "up")

    def check_all(self) -> None:
        for ep in self.endpoints():
            self._check(ep)

    def start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="serving-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(self.watch_interval):
            for ep in self.endpoints():
                if self._stopping.is_set():
                    return
                try:
                    self._check(ep)
                except Exception as exc:  # never let one look end the watcher
                    ep.last_error = f"watcher: {exc}"

    def stop(self) -> None:
        """Stop the watcher and every managed server; close every connection."""
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=10)
        for ep in self.endpoints():
            self._stop_endpoint(ep)

    # -- routing ----------------------------------------------------------------------------
    def _pick(self, model: str, exclude: set[int]) -> Endpoint | None:
        candidates = [e for e in self._endpoints if e.routable and model in e.models and id(e) not in exclude]
        if not candidates:
            return None
        ep = min(candidates, key=lambda e: (e.in_flight, e.last_used))
        ep.in_flight += 1
        ep.last_used = time.monotonic()
        return ep

    def _acquire(self, model: str, exclude: set[int]) -> Endpoint:
        with self._cond:
            ep = self._pick(model, exclude)
        if ep is None:
            self._catch_up(exclude)
            self._make_available(model, exclude)
            with self._cond:
                ep = self._pick(model, exclude)
        if ep is None:
            raise BackendError(self._why_not(model))
        return ep

    def _catch_up(self, exclude: set[int]) -> None:
        """Look again at each managed server that is ready while the pool still has it down.

        A restarted vLLM says ready before its restart hook has read what it serves; a request
        in that gap would be told to try again (CI saw one 503 there). One look costs a
        /v1/models call, and only servers whose process is ready are looked at, so a server
        that is really down costs nothing more per request."""
        for ep in self.endpoints():
            managed_ready = ep.server is not None and ep.server.state == "ready"
            if ep.state == "down" and managed_ready and id(ep) not in exclude:
                self._check(ep)  # marks it up, or leaves it down with the reason

    def _release(self, ep: Endpoint, answered: bool) -> None:
        with self._cond:
            ep.in_flight -= 1
            ep.answered += answered
            self._cond.notify_all()

    def _make_available(self, model: str, exclude: set[int]) -> None:
        """Load a known adapter where it is missing, or start a full-weight version's server."""
        adapter = self.adapters().get(model)
        if adapter is not None:
            for ep in self.endpoints():
                if ep.routable and ep.base == adapter.root and ep.lora and id(ep) not in exclude:
                    try:
                        self._sync(ep)
                    except BackendError:
                        continue
                    if model in ep.models:
                        return
            if not any(e.base == adapter.root and e.state in ("up", "down") for e in self.endpoints()):
                folder = self.versions().get(adapter.root)
                if folder is not None and self._may_start(adapter.root):
                    self.serve_full(adapter.root, folder, lora=True)
            return
        folder = self.versions().get(model)
        if folder is not None and self._may_start(model):
            self.serve_full(model, folder)

    def _may_start(self, name: str) -> bool:
        failed_at = self._failed_at.get(name)
        return failed_at is None or time.monotonic() - failed_at > START_RETRY_S

    def _why_not(self, model: str) -> str:
        if model in self.failed:
            return f"model '{model}' cannot be served: {self.failed[model]}"
        adapter = self.adapters().get(model)
        root = adapter.root if adapter is not None else model
        mine = [e for e in self.endpoints() if e.base == root]
        if mine:
            states = "; ".join(
                f"{e.id} is {d['state']}" + (f" ({d['last_error']})" if d["last_error"] else "")
                for e in mine
                for d in [e.describe()]
            )
            return f"the model server for '{model}' is not ready ({states}); try again shortly"
        served = sorted({m for e in self.endpoints() for m in e.models})
        return f"no model server serves '{model}' (served now: {', '.join(served) or 'nothing'})"

    def _call(self, model: str, fn: Callable[[OpenAIChatBackend], T]) -> T:
        exclude: set[int] = set()
        first: BackendUnavailable | None = None
        while True:
            try:
                ep = self._acquire(model, exclude)
            except BackendError as exc:
                if first is not None:
                    raise exc from first
                raise
            try:
                result = fn(ep.client)
            except BackendUnavailable as exc:
                self._release(ep, False)
                if first is not None:
                    raise
                first = exc
                if isinstance(exc, ModelNotServed):  # lost in a restart: load it again, then retry
                    with self._cond:
                        ep.models = ep.models - {model}
                else:
                    self._suspect(ep, exc)
                    # A server that still answers /health keeps its place for the one retry: a
                    # dropped or reset connection says nothing about its state, and with one server
                    # there is nowhere else to go (a full evaluation once failed on one such error).
                    if ep.state != "up":
                        exclude.add(id(ep))
                continue
            except BaseException:
                self._release(ep, False)
                raise
            self._release(ep, True)
            return result

    def _suspect(self, ep: Endpoint, exc: Exception) -> None:
        ep.last_error = str(exc)[:500]
        if ep.state == "up" and not ep.client.health():
            self._mark(ep, "down", str(exc)[:300])

    # -- OpenAIChatBackend's interface -------------------------------------------------------
    @property
    def base_url(self) -> str:
        return ", ".join(e.url for e in self.endpoints()) or "(no model server)"

    def close(self) -> None:
        self.stop()

    def health(self) -> bool:
        """Whether an up server serves the base."""
        return any(e.routable and self.base in e.models for e in self.endpoints())

    def models(self) -> list[str]:
        """What can be asked for: served now, adapters known, and full-weight versions on demand."""
        served = {m for e in self.endpoints() if e.routable for m in e.models}
        return sorted(served | set(self.adapters()) | set(self.versions()))

    def max_model_len(self, model: str | None = None) -> int | None:
        with self._cond:
            eps = [e for e in self._endpoints if e.routable]
        for ep in sorted(eps, key=lambda e: model not in e.models):
            try:
                return ep.client.max_model_len(model)
            except RuntimeError:  # its client was closed meanwhile: a blue/green swap retired it
                continue
        return None

    def chat(self, model: str, messages: list[dict[str, str]], params: SamplingParams) -> ChatResult:
        return self._call(model, lambda c: c.chat(model, messages, params))

    def tokenize(
        self,
        model: str,
        *,
        messages: list[dict[str, str]] | None = None,
        text: str | None = None,
    ) -> list[int]:
        return self._call(model, lambda c: c.tokenize(model, messages=messages, text=text))

    def token_logprob(self, model: str, prompt_ids: list[int], token_id: int) -> float:
        return self._call(model, lambda c: c.token_logprob(model, prompt_ids, token_id))

    def next_token_logprobs(
        self, model: str, prompt_ids: list[int], token_ids: list[int]
    ) -> dict[int, float]:
        return self._call(model, lambda c: c.next_token_logprobs(model, prompt_ids, token_ids))

    def load_lora(self, name: str, path: str) -> None:
        self.add_adapter(name, path, self.base)

    def status(self) -> dict[str, Any]:
        return {
            "kind": "pool",
            "healthy": self.health(),
            "base": self.base,
            "servers": [e.describe() for e in self.endpoints()],
            "adapters": sorted(self.adapters()),
            "failed": dict(self.failed),
            "max_servers": self.max_servers,
        }
