"""Shared fixtures. The real model and the real vLLM server are started once per session."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from studio import labeling
from studio.campaigns import ensure_policy_alias
from studio.labeling import Submission
from studio.store import Store
from tests.helpers import StoreFile, make_users, seed_campaign, seed_easy_judgments

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every vLLM the suite starts (a dozen) skips the compile warm-up: 11-18 s sooner each
# on the 2-core CPU. The tests check behaviour, not speed; the benchmarks run vLLM's default.
os.environ.setdefault("STUDIO_VLLM_ARGS", "-O0")

# The suite runs on two pytest-xdist workers (scripts/setup.sh test: -n 2 --dist loadgroup). A
# vLLM start is mostly one core importing, and light tests fill the other core meanwhile; the
# tests that serve with vLLM (they use `live_studio`, or are marked `vllm`) stay together on one
# worker, in file order, sharing the session's studio, and each other test module is one unit
# for the other worker, so a module's fixtures (a Ray head, a tiny model) are made once.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
VLLM_GROUP = "vllm"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("vllm") or "live_studio" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(VLLM_GROUP))
        else:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def store_file(tmp_path: Path) -> Iterator[StoreFile]:
    """A fresh studio database (a real DuckDB file) under the test's tmp_path, closed after it."""
    db = StoreFile(tmp_path / "db" / "studio.duckdb")
    yield db
    db.close()


@pytest.fixture()
def store(store_file: StoreFile) -> Store:
    """The open store of `store_file` (closed after the test). Modules add their users by
    overriding it: `def store(store): make_users(store, ...); return store`."""
    assert store_file.store is not None
    return store_file.store


@pytest.fixture()
def judged(store: Store) -> Store:
    """Campaign c1: two prompts judged by two annotators: a full ranking with a tie, quick
    mode, all-bad, an edit."""
    make_users(store, ("ann1", "annotator"), ("ann2", "annotator"))
    seed_campaign(store, prompts=2, n=3, overlap=2)
    t = labeling.next_task(store, "c1", "ann1")
    labeling.submit(
        store,
        "ann1",
        Submission(t["assignment_id"], ranks=[1, 2, 2], strength=3, edited_text="The ideal answer."),
    )
    t = labeling.next_task(store, "c1", "ann1")
    labeling.submit(store, "ann1", Submission(t["assignment_id"], all_bad=True))
    t = labeling.next_task(store, "c1", "ann2")
    labeling.submit(
        store, "ann2", Submission(t["assignment_id"], best=0, worst=2, flags={1: ["hallucination"]})
    )
    return store


@pytest.fixture()
def base_model_path() -> str:
    """Where version `base` of `easy_judged` points; a module that trains it overrides this."""
    return "/models/base"


@pytest.fixture()
def easy_judged(store: Store, base_model_path: str) -> Store:
    """Campaign `easy`: 10 tasks judged by ann1 with an easy preference (see seed_easy_judgments)."""
    store.register_model_version("base", path=base_model_path, content_hash="t" * 64, source="test")
    ensure_policy_alias(store, "base")
    seed_easy_judgments(store, n=10)
    return store


def _make_model_cache(factory: pytest.TempPathFactory) -> Path:
    from studio.model_prep import prepare_default_model

    if XDIST_WORKER is None:
        root = factory.mktemp("model-cache")
        prepare_default_model(root)
        return root / "models"
    # Under pytest-xdist both workers need the converted model: one converts it into the run's
    # common temporary folder while the other waits on the lock (xdist's documented recipe for
    # a session fixture shared between workers).
    from filelock import FileLock

    root = factory.getbasetemp().parent / "model-cache"
    with FileLock(f"{root}.lock"):
        prepare_default_model(root)
    return root / "models"


class EarlyStudio:
    """The session's live studio, started on a thread of its own as the session begins, so that
    its minute of vLLM loading (mostly one core) overlaps the light tests that come first
    instead of adding to the suite. `model_cache` and `live_studio` wait for it."""

    def __init__(self, factory: pytest.TempPathFactory):
        self.factory = factory
        self.cache: Path | None = None
        self.studio: LiveStudio | None = None
        self.error: BaseException | None = None
        self.cached = threading.Event()
        self.done = threading.Event()
        threading.Thread(target=self._run, name="early-studio", daemon=True).start()

    def _run(self) -> None:
        try:
            self.cache = _make_model_cache(self.factory)
            self.cached.set()
            self.studio = new_session_studio(self.cache, self.factory)
            self.studio.start()
        except BaseException as exc:  # handed to the fixture that waits for it
            self.error = exc
        finally:
            self.cached.set()
            self.done.set()

    def wait(self, event: threading.Event) -> None:
        if not event.wait(1200):
            raise RuntimeError("the session's studio did not start in 1200 s")
        if self.error is not None:
            raise RuntimeError("the session's studio failed to start") from self.error


_early: EarlyStudio | None = None


@pytest.fixture(scope="session", autouse=True)
def _start_the_session_studio_early(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Only when a collected test uses the live studio (a `-k` run of light tests starts none).
    Stopped here, at the session's end: a test that would have used it may have been skipped."""
    global _early
    # Under pytest-xdist every worker collects every test, and the one that runs the `vllm` group
    # starts the studio when its first test asks: the other worker's light tests are the overlap.
    if XDIST_WORKER is None and any(
        "live_studio" in getattr(item, "fixturenames", ()) for item in request.session.items
    ):
        _early = EarlyStudio(tmp_path_factory)
    yield
    if _early is not None:
        _early.done.wait(1200)
        if _early.studio is not None:
            _early.studio.stop()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the converted packaged model; copied into each studio's data dir."""
    if _early is not None:
        _early.wait(_early.cached)
        assert _early.cache is not None
        return _early.cache
    return _make_model_cache(tmp_path_factory)


def data_dir_with_model(model_cache: Path, target: Path) -> Path:
    """A fresh data dir that already has the converted model (hard links: no 0.5 GB copy)."""
    shutil.copytree(model_cache, target / "models", copy_function=os.link)
    return target


class LiveStudio:
    """The real app (store + managed vLLM + REST + UI) served by uvicorn in this process."""

    def __init__(self, data_dir: Path, **settings: Any):
        import uvicorn

        from studio.app import create_app
        from studio.config import Settings

        self.port = free_port()
        # no automatic evaluation of trained versions unless asked: minutes of every suite on the
        # shared vLLM behind each later test (tests/test_promotion*.py evaluate on purpose)
        # nor the throughput probe at start: half a minute of the shared vLLM per studio
        quiet = {"auto_eval": False, "probe": False}
        self.settings = Settings(data_dir=data_dir, port=self.port, **{**quiet, **settings})
        self.app = create_app(self.settings)
        self.studio = self.app.state.studio
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.server.started:
                self.studio.announce()
                return

            if not self.thread.is_alive():
                raise RuntimeError("the studio failed to start; see the output above")
            time.sleep(0.5)
        raise RuntimeError("the studio did not start in 900 s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


class NoModelStudio:
    """The real app on a real store, without a model server: REST and the services for every
    action that does not sample. Its training runner and task sampler are built, not started
    (a poke only marks them; a queued run is cancelled at once). Served by uvicorn in a thread,
    with the `server.json` a studio writes, so a CLI process finds it."""

    def __init__(self, data_dir: Path, ui: bool = False):
        import uvicorn

        from studio.app import create_app
        from studio.config import Settings
        from studio.jobs import Runner
        from studio.runtime import Studio
        from studio.store import Store
        from studio.task_sampler import TaskSampler

        self.port = free_port()
        self.settings = Settings(data_dir=data_dir, port=self.port, ui=ui)
        studio = self.studio = Studio(self.settings)
        studio.store = Store(self.settings.db_path)
        studio.task_sampler = TaskSampler(studio.store, None)  # type: ignore[arg-type]
        studio.runner = Runner(studio.store, data_dir, register=lambda *a: "")
        studio.sampler = None
        # The app's lifespan would start a model server; Gradio's mount needs the lifespan to run
        # its own start-up (the event queue), so with the UI the studio's start is skipped instead.
        studio.start = lambda: None  # type: ignore[method-assign]
        self.app = create_app(self.settings, studio)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on" if ui else "off",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> NoModelStudio:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the REST-only studio did not start")
            time.sleep(0.05)
        self.studio.announce()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.studio.stop()


def new_session_studio(model_cache: Path, factory: pytest.TempPathFactory) -> LiveStudio:
    # runtime LoRA from the start: the live tests hot-load adapters, and a studio serving without
    # it would switch servers at the first one (a second vLLM start; tests/test_pool_live.py
    # covers that switch)
    return LiveStudio(data_dir_with_model(model_cache, factory.mktemp("studio")), lora="on")


@pytest.fixture(scope="session")
def live_studio(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStudio]:
    if _early is not None:  # stopped by the fixture that started it
        _early.wait(_early.done)
        assert _early.studio is not None
        yield _early.studio
        return
    studio = new_session_studio(model_cache, tmp_path_factory)
    studio.start()
    yield studio
    studio.stop()


@pytest.fixture()
def api(live_studio: LiveStudio) -> Iterator[httpx.Client]:
    """REST client authenticated as the first admin (created on the studio's first start)."""
    from studio.users import local_token

    token = local_token(live_studio.settings.data_dir)
    assert token, "the first start should have created the admin credentials file"
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"{live_studio.url}/api/v1", timeout=300, headers=headers) as client:
        yield client


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed; scripts/setup.sh test installs it")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
