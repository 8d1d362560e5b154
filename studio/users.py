"""Users, roles, passwords and REST tokens.

Passwords are hashed with argon2id (argon2-cffi's defaults, the OWASP
recommendation); REST tokens are random and only their sha256 is stored, so
the database never holds a usable credential.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from studio.names import check_name
from studio.ratelimit import LoginLimiter, TooManyAttempts
from studio.store import Store, StoreError
from studio.textcheck import shorten

ROLES = ("annotator", "expert", "engineer", "admin")
# What each capability needs. Checked on the server for every route and event.
CAN = {
    "label": {"annotator", "expert", "engineer", "admin"},
    "battle": {"expert", "admin"},
    "view": {"annotator", "expert", "engineer", "admin"},
    "sample": {"engineer", "admin"},
    "import": {"engineer", "admin"},
    "train": {"engineer", "admin"},
    "admin": {"admin"},
}
MIN_PASSWORD = 8
BOOTSTRAP_FILE = "admin-credentials.json"

_hasher = PasswordHasher()
log = logging.getLogger(__name__)


class AuthError(PermissionError):
    """Not logged in, or not allowed."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def can(self, capability: str) -> bool:
        return self.role in CAN[capability]

    def require(self, capability: str) -> User:
        if not self.can(capability):
            allowed = ", ".join(sorted(CAN[capability]))
            raise AuthError(f"user '{self.name}' ({self.role}) may not {capability}; needs {allowed}")
        return self


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(store: Store, name: str, role: str, password: str) -> str:
    """Create a user; returns their REST token (shown once, stored only as a hash)."""
    check_name("user", name)
    if role not in ROLES:
        raise StoreError(f"--role {shorten(role)}: unknown role; use one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise StoreError(f"password for '{name}': at least {MIN_PASSWORD} characters, please")
    token = secrets.token_urlsafe(32)
    with store.transaction() as cur:
        if cur.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
            raise StoreError(f"user '{name}' already exists; pick another name")
        cur.execute(
            "INSERT INTO users (name, role, password_hash, token_hash) VALUES (?, ?, ?, ?)",
            [name, role, _hasher.hash(password), hash_token(token)],
        )
    return token


def set_password(store: Store, name: str, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise StoreError(f"password for '{shorten(name)}': at least {MIN_PASSWORD} characters, please")
    with store.transaction() as cur:
        if not cur.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
            raise StoreError(f"user '{shorten(name)}' does not exist")
        cur.execute("UPDATE users SET password_hash = ? WHERE name = ?", [_hasher.hash(password), name])


def new_token(store: Store, name: str) -> str:
    """Replace a user's REST token (the old one stops working at once)."""
    token = secrets.token_urlsafe(32)
    with store.transaction() as cur:
        if not cur.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
            raise StoreError(f"user '{shorten(name)}' does not exist")
        cur.execute("UPDATE users SET token_hash = ? WHERE name = ?", [hash_token(token), name])
    for key, user in list(store.memo.items()):
        if key[0] == "token" and user.name == name:
            del store.memo[key]
    return token


def check_password(store: Store, name: str, password: str) -> User | None:
    return verify_login(store, name, password)[0]


def verify_login(store: Store, name: str, password: str) -> tuple[User | None, str]:
    """The user if the password is theirs, else None and why (for the failed-login log only)."""
    rows = store.query("SELECT name, role, password_hash FROM users WHERE name = ? AND NOT disabled", [name])
    if not rows:
        # spend the same time as a real check, so timing does not tell which names exist
        _hasher.hash(password)
        return None, "unknown or disabled user"
    try:
        _hasher.verify(rows[0]["password_hash"], password)
    except (VerificationError, InvalidHashError):
        return None, "wrong password"
    return User(rows[0]["name"], rows[0]["role"]), "ok"


async def login(store: Store, limiter: LoginLimiter, name: str, password: str, address: str) -> User | None:
    """One login attempt under the rate limit (studio/ratelimit.py has the policy).

    Raises TooManyAttempts, before the password is checked, when the name or the address is
    over its limit. The argon2 check (~280 ms of CPU) and the failed-login row are done on a
    worker thread: the event loop serves everyone else meanwhile."""
    try:
        attempt = limiter.begin(name, address)
    except TooManyAttempts as exc:
        if exc.first:
            await asyncio.to_thread(record_failed_login, store, name, address, f"rate limited: {exc.why}")
        raise
    ok: bool | None = None
    try:
        user, reason = await asyncio.to_thread(verify_login, store, name, password)
        ok = user is not None
        if user is None:
            await asyncio.to_thread(record_failed_login, store, name, address, reason)
        return user
    finally:
        limiter.finish(attempt, ok)


def record_failed_login(store: Store, name: str, address: str, reason: str) -> None:
    try:
        store.write(
            "INSERT INTO failed_logins (user_name, address, reason) VALUES (?, ?, ?)",
            [shorten(name, 128), shorten(address, 128), reason],
        )
    except Exception:  # the log must not turn a refused login into a server error
        log.exception("could not record a failed login of %r from %s", shorten(name), address)


def failed_logins(store: Store, limit: int = 100) -> list[dict[str, object]]:
    """The latest failed logins, newest first (for admins)."""
    return store.query(
        "SELECT attempted_at, user_name, address, reason FROM failed_logins"
        " ORDER BY attempted_at DESC LIMIT ?",
        [limit],
    )


def known_token(store: Store, token: str) -> User | None:
    """The user of a token seen before, without touching the database (None if not seen)."""
    return store.memo.get(("token", hash_token(token)))


def user_for_token(store: Store, token: str) -> User | None:
    # Asked on every REST call. Only known tokens are remembered (unknown ones would let
    # anyone grow the cache), and new_token forgets the old one: the studio is the only writer.
    digest = hash_token(token)
    user = store.memo.get(("token", digest))
    if user is None:
        rows = store.query("SELECT name, role FROM users WHERE token_hash = ? AND NOT disabled", [digest])
        if not rows:
            return None
        user = store.memo[("token", digest)] = User(rows[0]["name"], rows[0]["role"])
    return user


def get_user(store: Store, name: str) -> User | None:
    rows = store.query("SELECT name, role FROM users WHERE name = ? AND NOT disabled", [name])
    return User(rows[0]["name"], rows[0]["role"]) if rows else None


def list_users(store: Store) -> list[dict[str, object]]:
    return store.query("SELECT name, role, disabled, created_at FROM users ORDER BY created_at, name")


def user_count(store: Store) -> int:
    return store.query("SELECT count(*) AS n FROM users")[0]["n"]


def bootstrap_admin(store: Store, data_dir: Path) -> dict[str, str] | None:
    """On a first start with no users, create `admin` with a random password.

    The credentials go to a file only the owner can read (like Jupyter's
    token), so the person who started the studio can log in and the local CLI
    can authenticate; nobody else on the machine can.
    """
    if user_count(store):
        return None
    password = secrets.token_urlsafe(12)
    token = add_user(store, "admin", "admin", password)
    creds = {"user": "admin", "password": password, "token": token}
    path = data_dir / BOOTSTRAP_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh)
    return creds


def local_token(data_dir: Path) -> str | None:
    path = data_dir / BOOTSTRAP_FILE
    try:
        return json.loads(path.read_text())["token"]
    except (OSError, ValueError, KeyError):
        return None
