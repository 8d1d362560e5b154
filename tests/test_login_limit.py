"""The login rate limit: the policy on a fake clock, then the real app's /login over HTTP and in a browser."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from studio import users
from studio.app import create_app
from studio.config import Settings
from studio.ratelimit import LoginLimiter, LoginPolicy, TooManyAttempts
from studio.runtime import Studio
from studio.store import Store
from tests.conftest import free_port
from tests.helpers import PASSWORD


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def fail(limiter: LoginLimiter, user: str, address: str) -> None:
    limiter.finish(limiter.begin(user, address), ok=False)


def refused(limiter: LoginLimiter, user: str, address: str) -> TooManyAttempts | None:
    try:
        attempt = limiter.begin(user, address)
    except TooManyAttempts as exc:
        return exc
    limiter.finish(attempt, ok=None)
    return None


# ---------------------------------------------------------------- the policy, on a fake clock


def waits_until_cap(limiter: LoginLimiter, clock: Clock, user: str, address: Any, tries: int) -> list[int]:
    """Fail `tries` times as soon as allowed; the waits asked for on the way."""
    waits = []
    for i in range(tries):
        where = address(i) if callable(address) else address
        exc = refused(limiter, user, where)
        if exc is not None:
            assert "too many failed logins for this user name" in str(exc), exc
            waits.append(exc.retry_after)
            clock.now += exc.retry_after
        fail(limiter, user, where)
    return waits


def test_one_address_guessing_one_name_waits_1_2_4_s_and_at_most_5_minutes() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    assert waits_until_cap(limiter, clock, "admin", "6.6.6.6", 15) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    again = refused(limiter, "admin", "6.6.6.6")
    assert again is not None and str(again) == "too many failed logins for this user name; try again in 300 s"
    assert refused(limiter, "admin", "10.0.0.1") is None  # one address never locks the name for others
    clock.now += 300
    assert refused(limiter, "admin", "6.6.6.6") is None


def test_many_addresses_guessing_one_name_are_held_back_together() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    waits = waits_until_cap(limiter, clock, "admin", lambda i: f"7.7.{i}.1", 20)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]  # after 10 free failures over all addresses
    assert refused(limiter, "admin", "10.9.9.9") is not None  # a new address waits too


def test_a_success_resets_the_name_and_an_hour_of_quiet_forgets_it() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    for _ in range(5):
        fail(limiter, "ann", "10.0.0.1")
    assert refused(limiter, "ann", "10.0.0.1") is not None
    clock.now += 1
    limiter.finish(limiter.begin("ann", "10.0.0.1"), ok=True)
    for _ in range(4):
        fail(limiter, "ann", "10.0.0.1")
    assert refused(limiter, "ann", "10.0.0.1") is None  # 4 failures since the success: still free
    fail(limiter, "ann", "10.0.0.1")
    assert refused(limiter, "ann", "10.0.0.1") is not None
    clock.now += 3600
    assert refused(limiter, "ann", "10.0.0.1") is None


def test_per_address_limit_spans_names_and_a_success_there_does_not_reset_it() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    for i in range(20):
        fail(limiter, f"user{i}", "6.6.6.6")  # spraying one guess at many names
    exc = refused(limiter, "user99", "6.6.6.6")
    assert exc is not None and str(exc) == "too many failed logins from your address; try again in 1 s"
    assert refused(limiter, "user99", "10.0.0.1") is None
    clock.now += 1
    limiter.finish(limiter.begin("mallory", "6.6.6.6"), ok=True)  # the attacker's own account
    fail(limiter, "user99", "6.6.6.6")
    assert refused(limiter, "user98", "6.6.6.6").retry_after == 2  # the wait doubled all the same


def test_an_address_the_user_logged_in_from_is_spared_others_failures() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    limiter.finish(limiter.begin("admin", "192.168.1.5"), ok=True)  # the admin's usual machine
    for i in range(10):  # a guesser with a new address per try, up to the name's lock
        fail(limiter, "admin", f"7.7.{i}.1")
    assert refused(limiter, "admin", "10.9.9.9") is not None  # a new address waits...
    assert refused(limiter, "admin", "192.168.1.5") is None  # ...the admin's own does not
    clock.now += 31 * 24 * 3600
    for i in range(10):
        fail(limiter, "admin", f"7.8.{i}.1")
    assert refused(limiter, "admin", "192.168.1.5") is not None  # spared for 30 days, not for ever


def test_one_attacker_address_never_locks_the_admin_out_and_slows_to_about_one_guess_an_hour() -> None:
    """For a day the attacker at 6.6.6.6 tries the admin's name whenever it may; meanwhile the
    admin tries once a minute from an address never used before. The admin is never refused."""
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    start, next_minute = clock.now, clock.now
    guesses, admin_refused, late_guesses = 0, 0, 0
    while clock.now < start + 24 * 3600:
        if refused(limiter, "admin", "6.6.6.6") is None:
            fail(limiter, "admin", "6.6.6.6")
            guesses += 1
            late_guesses += clock.now >= start + 12 * 3600
        if clock.now >= next_minute:
            minute = int((clock.now - start) // 60)
            admin_refused += refused(limiter, "admin", f"10.1.{minute % 250}.{minute // 250}") is not None
            next_minute += 60
        clock.now += 1
    assert admin_refused == 0
    assert guesses < 60 and late_guesses <= 12  # held to one an hour by its address's limit


def test_bursts_beyond_the_free_tries_are_checked_one_at_a_time_and_the_cpu_is_capped() -> None:
    clock = Clock()
    limiter = LoginLimiter(LoginPolicy(max_in_flight=3), clock=clock)
    for _ in range(4):
        fail(limiter, "ann", "10.0.0.1")
    first = limiter.begin("ann", "10.0.0.1")  # the fifth try: the last free one
    exc = refused(limiter, "ann", "10.0.0.1")
    assert exc is not None and "another login for this user name is being checked" in str(exc)
    others = [limiter.begin(f"u{i}", f"10.0.1.{i}") for i in range(2)]
    cpu = refused(limiter, "u9", "10.0.2.1")
    assert cpu is not None and "too many logins are being checked at once" in str(cpu)
    for attempt in [first, *others]:
        limiter.finish(attempt, ok=None)  # no verdict (an error): nothing counted
    assert refused(limiter, "u9", "10.0.2.1") is None and refused(limiter, "ann", "10.0.0.1") is None


def test_only_the_first_refusal_of_a_lock_is_worth_recording_and_idle_counters_are_dropped() -> None:
    clock = Clock()
    limiter = LoginLimiter(LoginPolicy(max_keys=10), clock=clock)
    for _ in range(5):
        fail(limiter, "ann", "10.0.0.1")
    firsts = [refused(limiter, "ann", "10.0.0.1").first for _ in range(3)]
    assert firsts == [True, False, False]
    for i in range(20):
        fail(limiter, f"name{i}", f"10.3.0.{i}")
    assert len(limiter._pairs) + len(limiter._addresses) + len(limiter._users) < 80
    assert refused(limiter, "ann", "10.0.0.1") is not None  # a lock in force is never dropped


# ---------------------------------------------------------------- the real app's /login


@pytest.fixture()
def app_with_admin(tmp_path: Path) -> Iterator[tuple[Any, Store]]:
    settings = Settings(data_dir=tmp_path, ui=True)
    studio = Studio(settings)  # no model server: logins need only the store
    studio.store = Store(settings.db_path)
    users.add_user(studio.store, "admin", "admin", PASSWORD)
    yield create_app(settings, studio), studio.store
    studio.store.close()


def run_async(coro: Any) -> Any:
    # a thread of its own: the session's Playwright browser may hold a loop on the main thread
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def test_login_over_http_is_limited_before_the_hash_is_checked_and_failures_are_recorded(
    app_with_admin: tuple[Any, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, store = app_with_admin
    checks: list[str] = []
    verify = users.verify_login

    def counted(*args: Any) -> Any:
        checks.append(args[1])
        return verify(*args)

    monkeypatch.setattr(users, "verify_login", counted)

    async def scenario() -> list[httpx.Response]:
        attacker = httpx.ASGITransport(app=app, client=("203.0.113.7", 5000))
        admin = httpx.ASGITransport(app=app, client=("192.0.2.10", 5001))
        out = []
        async with httpx.AsyncClient(transport=attacker, base_url="http://studio") as client:
            for i in range(6):
                out.append(await client.post("/login", data={"username": "admin", "password": f"guess{i}"}))
            out.append(await client.post("/login", data={"username": "admin", "password": PASSWORD}))
        async with httpx.AsyncClient(transport=admin, base_url="http://studio") as client:
            out.append(await client.post("/login", data={"username": "admin", "password": PASSWORD}))
        return out

    responses = run_async(scenario())
    assert [r.status_code for r in responses] == [400] * 5 + [429, 429, 200]  # the admin elsewhere: let in
    limited = responses[5]
    assert limited.json()["detail"] == "too many failed logins for this user name; try again in 1 s"
    assert limited.headers["retry-after"] == "1"
    assert responses[-1].json() == {"success": True}
    assert len(checks) == 6  # five wrong guesses and the admin's try: no hash for a refused one
    rows = users.failed_logins(store)
    assert [(r["user_name"], r["address"], r["reason"]) for r in reversed(rows)] == [
        *[("admin", "203.0.113.7", "wrong password")] * 5,
        ("admin", "203.0.113.7", "rate limited: too many failed logins for this user name"),
    ]


def test_an_unknown_name_counts_and_is_recorded_like_a_wrong_password(
    app_with_admin: tuple[Any, Store],
) -> None:
    app, store = app_with_admin

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app, client=("198.51.100.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://studio") as client:
            return [
                (await client.post("/login", data={"username": "ghost", "password": "x" * 8})).status_code
                for _ in range(6)
            ]

    assert run_async(scenario()) == [400] * 5 + [429]
    assert {r["reason"] for r in users.failed_logins(store)} == {
        "unknown or disabled user",
        "rate limited: too many failed logins for this user name",
    }


def test_the_login_page_shows_try_again_in_n_seconds(app_with_admin: tuple[Any, Store], browser: Any) -> None:
    import uvicorn

    app, _ = app_with_admin
    port = free_port()
    # lifespan off: the studio is not started (no model server), only its store is open
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.1)
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        for i in range(6):
            page.fill("input[type=text]", "admin")
            page.fill("input[type=password]", f"wrong-{i}")
            with page.expect_response(lambda r: r.url.rstrip("/").endswith("/login")) as answer:
                page.get_by_role("button", name="Login").click()
            assert answer.value.status == (400 if i < 5 else 429)
        notice = page.locator("#login-notice")
        notice.wait_for(timeout=10_000)
        page.wait_for_function("document.getElementById('login-notice').textContent.length > 0")
        assert notice.text_content() == "too many failed logins for this user name; try again in 1 s"
    finally:
        page.close()
        server.should_exit = True
        thread.join(30)
