"""The login rate limit: pure logic with an injectable clock (the web layer is studio/ui/__init__.py's
`gradio_auth`, the client address comes from studio/app.py's `ClientAddress` middleware).

The policy. A failed login is a wrong password or a name that does not exist: both count the
same, so the limit does not tell which names exist. Three counters, each with some free
failures, then a wait after the last failure that starts at 1 s and doubles with each further
failure, up to a cap:

| counter                      | free | cap    | forgotten after     | stops                      |
|------------------------------|------|--------|---------------------|----------------------------|
| user name and client address | 5    | 5 min  | 1 h without failure | guessing one account       |
| client address, all names    | 20   | 1 h    | a day               | one guess at many accounts |
| user name, all addresses     | 10   | 5 min  | 1 h without failure | guessing from many places  |

- One address guessing one account gets 5 tries, then at most about 12 an hour.
- The per-name counter over all addresses counts only each address's first 5 failures at that
  name: it measures how many places are guessing, so one attacker address never locks the
  account for anyone else. Only several addresses together can hold a new address back, for
  at most 5 minutes after their last failure.
- An address the user logged in from during the last 30 days is not held back by that
  per-name counter at all (only by its own two), so the only admin is never locked out of
  their usual machine by others' failures. A successful login resets the name's counters (not
  the address's: an attacker with an account of their own could otherwise reset their
  address between guesses).
- State lives in memory: restarting the studio clears it, and the admin on the studio's
  machine can always `studio users passwd admin`.
- An attempt over a limit is refused before its password is checked (each check costs about
  280 ms of argon2 CPU): at most 8 checks run or wait at once, and beyond its free failures a
  counter lets one attempt at a time be checked.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

# The client address of the request being served, set by studio/app.py's ClientAddress
# middleware: Gradio hands its auth callable only the name and the password.
client_address: ContextVar[str] = ContextVar("client_address", default="unknown")


@dataclass(frozen=True)
class Limit:
    free: int  # failures before any wait
    cap_s: float  # the longest wait
    forget_s: float  # a counter without a failure for this long starts again


@dataclass(frozen=True)
class LoginPolicy:
    pair: Limit = Limit(free=5, cap_s=300.0, forget_s=3600.0)  # a user name from one address
    address: Limit = Limit(free=20, cap_s=3600.0, forget_s=24 * 3600.0)  # one address, all names
    user: Limit = Limit(free=10, cap_s=300.0, forget_s=3600.0)  # one name, all addresses
    base_s: float = 1.0  # the first wait; each further failure doubles it
    known_address_s: float = 30 * 24 * 3600.0  # a user's login address is spared others' failures
    max_in_flight: int = 8  # checks at once: 2 cores at ~280 ms a check, a queue of about a second
    max_keys: int = 100_000  # counters kept before the idle ones are dropped


class TooManyAttempts(Exception):
    """The attempt was refused before its password was checked; `retry_after` in whole seconds.

    `first`: the first refusal since the last failure (only those are worth a row in the log)."""

    def __init__(self, retry_after: float, why: str, first: bool = False):
        self.retry_after = max(1, math.ceil(retry_after))
        self.why = why
        self.first = first
        super().__init__(f"{why}; try again in {self.retry_after} s")


@dataclass
class _Counter:
    failures: int = 0
    last: float = 0.0  # clock time of the last failure
    pending: int = 0  # attempts being checked now
    reported: bool = False  # a refusal of the current lock was reported already

    def remaining(self, limit: Limit, base_s: float, now: float) -> float:
        if self.failures < limit.free:
            return 0.0
        return self.last + min(base_s * 2.0 ** (self.failures - limit.free), limit.cap_s) - now


@dataclass(frozen=True)
class Attempt:
    user: str
    address: str
    known: bool  # the user logged in from this address lately


class LoginLimiter:
    """`begin` before checking a password (raises TooManyAttempts), `finish` after it."""

    def __init__(self, policy: LoginPolicy | None = None, clock: Callable[[], float] = time.monotonic):
        self.policy = policy or LoginPolicy()
        self.clock = clock
        self._pairs: dict[tuple[str, str], _Counter] = {}
        self._addresses: dict[str, _Counter] = {}
        self._users: dict[str, _Counter] = {}
        self._known: dict[tuple[str, str], float] = {}  # (user, address) -> last success
        self._in_flight = 0
        self._lock = threading.Lock()

    def begin(self, user: str, address: str) -> Attempt:
        p = self.policy
        user = user[:128]
        with self._lock:
            now = self.clock()
            if len(self._pairs) + len(self._addresses) + len(self._users) > p.max_keys:
                self._prune(now)
            if self._in_flight >= p.max_in_flight:
                raise TooManyAttempts(1, "too many logins are being checked at once")
            counters = [
                (self._counter(self._addresses, address, p.address, now), p.address, "from your address"),
                (self._counter(self._pairs, (user, address), p.pair, now), p.pair, "for this user name"),
            ]
            known = now - self._known.get((user, address), -math.inf) < p.known_address_s
            by_user = self._counter(self._users, user, p.user, now)
            if not known:
                counters.append((by_user, p.user, "for this user name"))
            for counter, limit, scope in counters:
                self._check(counter, limit, now, scope)
            for counter in (counters[0][0], counters[1][0], by_user):
                counter.pending += 1
            self._in_flight += 1
            return Attempt(user, address, known)

    def finish(self, attempt: Attempt, ok: bool | None) -> None:
        """`ok`: the password was right (True) or wrong (False); None: no verdict (an error)."""
        with self._lock:
            now = self.clock()
            self._in_flight -= 1
            pair = self._pairs.setdefault((attempt.user, attempt.address), _Counter())
            by_address = self._addresses.setdefault(attempt.address, _Counter())
            by_user = self._users.setdefault(attempt.user, _Counter())
            for counter in (pair, by_address, by_user):
                counter.pending -= 1
            if ok:
                for counter in (pair, by_user):
                    counter.failures, counter.reported = 0, False
                self._known[(attempt.user, attempt.address)] = now
            elif ok is False:
                # the name's count over all addresses takes each address's free failures only:
                # it counts the places guessing, so one address cannot lock the name for others
                counted = [pair, by_address] + ([by_user] if pair.failures < self.policy.pair.free else [])
                for counter in counted:
                    counter.failures, counter.last, counter.reported = counter.failures + 1, now, False

    # ---------------------------------------------------------------- internals
    def _counter(self, table: dict, key: object, limit: Limit, now: float) -> _Counter:
        c = table.get(key)
        if c is None or (c.pending == 0 and c.failures and now - c.last >= limit.forget_s):
            c = table[key] = _Counter()
        return c

    def _check(self, c: _Counter, limit: Limit, now: float, scope: str) -> None:
        remaining = c.remaining(limit, self.policy.base_s, now)
        if remaining > 0:
            retry, why = remaining, f"too many failed logins {scope}"
        elif c.pending and c.failures + c.pending >= limit.free:
            # beyond the free tries, one check at a time: a burst must not pass all at once
            retry, why = 1, f"another login {scope} is being checked"
        else:
            return
        first, c.reported = not c.reported, True
        raise TooManyAttempts(retry, why, first)

    def _prune(self, now: float) -> None:
        p = self.policy
        for table, limit in ((self._pairs, p.pair), (self._addresses, p.address), (self._users, p.user)):
            for key, c in list(table.items()):
                idle = c.pending == 0 and c.remaining(limit, p.base_s, now) <= 0
                if idle and (c.failures < limit.free or now - c.last >= limit.forget_s):
                    del table[key]  # neither holding anyone back nor remembered for later
        for key, at in list(self._known.items()):
            if now - at >= p.known_address_s:
                del self._known[key]
