"""What the CLI talks to: one client interface, two implementations.

- `LocalClient`: no studio holds the database, so the command opens it (an `OfflineContext`) and
  calls the service functions in this process, as the local user `services.CLI_USER` (an admin:
  whoever can open the DuckDB file owns the data anyway).
- `RestClient`: a studio runs and holds the database (DuckDB lets one process open the file), so
  the command goes through its REST API: the URL from --url, else the `server.json` the studio
  wrote in its data directory; the token from --token, $STUDIO_TOKEN, or the first admin's
  credentials file.

Both answer what the REST API answers (JSON-shaped values), so a command renders one shape.
`connect` picks the implementation.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from studio import services as svc
from studio.config import DEFAULT_PORT
from studio.export import format_for
from studio.importer import ImportedPrompt
from studio.store import StoreLockedError
from studio.users import local_token

SERVER_FILE = "server.json"  # written by a running studio (runtime.Studio): where to reach it


class CLIError(Exception):
    """A message for the user; the command exits with status 1."""


def studio_url(data_dir: Path, url: str | None = None) -> str:
    if url:
        return url.rstrip("/")
    info = Path(data_dir) / SERVER_FILE
    if info.is_file():
        return json.loads(info.read_text())["url"].rstrip("/")
    return f"http://127.0.0.1:{DEFAULT_PORT}"


def api_token(data_dir: Path, token: str | None = None) -> str | None:
    """--token, else $STUDIO_TOKEN, else the first admin's token the studio wrote for its owner."""
    return token or os.environ.get("STUDIO_TOKEN") or local_token(Path(data_dir))


class Client(ABC):
    """The studio's actions as the CLI uses them; each method is one service function."""

    #: True when the command works on the database itself: no studio runs, so nothing samples
    #: or trains until `studio serve` starts one
    offline: bool = False

    @abstractmethod
    def import_prompts(self, set_name: str, prompts: list[ImportedPrompt], source: str) -> dict[str, Any]:
        """services.import_prompts: {set, added, duplicates, summary}."""

    @abstractmethod
    def list_models(self) -> dict[str, Any]:
        """services.list_models: {models, aliases}."""

    @abstractmethod
    def lineage(self, version: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def promote(self, version: str, spec: svc.PromoteSpec) -> dict[str, Any]: ...

    @abstractmethod
    def rollback(self, alias: str) -> dict[str, Any]: ...

    @abstractmethod
    def model_card(self, version: str) -> dict[str, Any]: ...

    @abstractmethod
    def start_eval(self, spec: svc.EvalSpec) -> dict[str, Any]:
        """services.start_eval: the queued record (`id`, `status`)."""

    @abstractmethod
    def get_eval(self, eval_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def sample(self, spec: svc.SampleSpec) -> dict[str, Any]: ...

    @abstractmethod
    def add_user(self, spec: svc.UserSpec) -> dict[str, Any]: ...

    @abstractmethod
    def list_users(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def set_password(self, name: str, password: str) -> dict[str, Any]: ...

    @abstractmethod
    def new_token(self, name: str) -> dict[str, Any]: ...

    @abstractmethod
    def create_campaign(self, spec: svc.CampaignSpec) -> dict[str, Any]: ...

    @abstractmethod
    def list_campaigns(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def create_battle_campaign(self, spec: svc.BattleCampaignSpec) -> dict[str, Any]: ...

    @abstractmethod
    def battle_log(self, campaign: str | None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def leaderboard(self, spec: svc.LeaderboardSpec) -> list[dict[str, Any]]:
        """The rows of services.leaderboard (what GET /leaderboard answers)."""

    @abstractmethod
    def start_run(self, spec: svc.RunSpec) -> dict[str, Any]: ...

    @abstractmethod
    def list_runs(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def get_run(self, run_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def cancel_run(self, run_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def export(self, out: Path, spec: svc.ExportSpec) -> dict[str, Any]:
        """Write the export to `out` (on this machine): {path, format, kind, counts, ...}."""

    @abstractmethod
    def backup(self, out: Path) -> dict[str, Any]:
        """Write a consistent copy of the database to the new file `out` (on this machine)."""

    def close(self) -> None:  # noqa: B027 (nothing to close for most clients)
        pass


class LocalClient(Client):
    """The services, called in this process on the studio's database."""

    offline = True

    def __init__(self, ctx: svc.OfflineContext, user: svc.User = svc.CLI_USER):
        self.ctx, self.user = ctx, user

    def close(self) -> None:
        self.ctx.close()

    def import_prompts(self, set_name: str, prompts: list[ImportedPrompt], source: str) -> dict[str, Any]:
        return svc.import_prompts(self.ctx, self.user, set_name, prompts, source)

    def list_models(self) -> dict[str, Any]:
        return svc.list_models(self.ctx, self.user)

    def lineage(self, version: str) -> list[dict[str, Any]]:
        return svc.lineage(self.ctx, self.user, version)

    def promote(self, version: str, spec: svc.PromoteSpec) -> dict[str, Any]:
        return svc.promote(self.ctx, self.user, version, spec)

    def rollback(self, alias: str) -> dict[str, Any]:
        return svc.rollback(self.ctx, self.user, alias)

    def model_card(self, version: str) -> dict[str, Any]:
        return svc.model_card(self.ctx, self.user, version)

    def start_eval(self, spec: svc.EvalSpec) -> dict[str, Any]:
        return svc.start_eval(self.ctx, self.user, spec)

    def get_eval(self, eval_id: str) -> dict[str, Any]:
        return svc.get_eval(self.ctx, self.user, eval_id)

    def sample(self, spec: svc.SampleSpec) -> dict[str, Any]:
        return svc.sample(self.ctx, self.user, spec)

    def add_user(self, spec: svc.UserSpec) -> dict[str, Any]:
        return svc.add_user(self.ctx, self.user, spec)

    def list_users(self) -> list[dict[str, Any]]:
        return svc.list_users(self.ctx, self.user)

    def set_password(self, name: str, password: str) -> dict[str, Any]:
        return svc.set_password(self.ctx, self.user, name, password)

    def new_token(self, name: str) -> dict[str, Any]:
        return svc.new_token(self.ctx, self.user, name)

    def create_campaign(self, spec: svc.CampaignSpec) -> dict[str, Any]:
        return svc.create_campaign(self.ctx, self.user, spec)

    def list_campaigns(self) -> list[dict[str, Any]]:
        return svc.list_campaigns(self.ctx, self.user)

    def create_battle_campaign(self, spec: svc.BattleCampaignSpec) -> dict[str, Any]:
        return svc.create_battle_campaign(self.ctx, self.user, spec)

    def battle_log(self, campaign: str | None) -> list[dict[str, Any]]:
        return svc.battle_log(self.ctx, self.user, campaign)

    def leaderboard(self, spec: svc.LeaderboardSpec) -> list[dict[str, Any]]:
        return svc.leaderboard(self.ctx, self.user, spec)["rows"]

    def start_run(self, spec: svc.RunSpec) -> dict[str, Any]:
        return svc.start_run(self.ctx, self.user, spec)

    def list_runs(self) -> list[dict[str, Any]]:
        return svc.list_runs(self.ctx, self.user)

    def get_run(self, run_id: str) -> dict[str, Any]:
        return svc.get_run(self.ctx, self.user, run_id)

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        return svc.cancel_run(self.ctx, self.user, run_id)

    def export(self, out: Path, spec: svc.ExportSpec) -> dict[str, Any]:
        return svc.export(self.ctx, self.user, out, spec)

    def backup(self, out: Path) -> dict[str, Any]:
        return svc.backup(self.ctx, self.user, out)


class RestClient(Client):
    """The same actions through a running studio's REST API."""

    def __init__(self, url: str, token: str | None, note: str | None = None):
        # `note`: why the command came here (the database is held), told with any failure
        self.url, self.token, self.note = url, token, note

    def _call(self, method: str, route: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            try:
                resp = httpx.request(
                    method, f"{self.url}/api/v1{route}", timeout=600.0, headers=headers, **kwargs
                )
            except httpx.HTTPError:
                raise CLIError(
                    f"no studio answers at {self.url}. Start one with `studio serve` in another "
                    "terminal, or pass --url to reach a studio elsewhere."
                ) from None
            if resp.status_code >= 400:
                try:
                    detail = resp.json().get("detail", resp.text)
                except ValueError:
                    detail = resp.text
                raise CLIError(f"the studio at {self.url} refused it (HTTP {resp.status_code}): {detail}")
        except CLIError as exc:
            if self.note:
                raise CLIError(f"{self.note}\n({exc})") from None
            raise
        return resp

    def _json(self, method: str, route: str, **kwargs: Any) -> Any:
        return self._call(method, route, **kwargs).json()

    def import_prompts(self, set_name: str, prompts: list[ImportedPrompt], source: str) -> dict[str, Any]:
        body = {
            "source": source,
            "records": [_record(p) for p in prompts],
            "locations": [p.location for p in prompts],
        }
        return self._json("POST", f"/prompt-sets/{set_name}/prompts", json=body)

    def list_models(self) -> dict[str, Any]:
        return self._json("GET", "/models")

    def lineage(self, version: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/models/{version}/lineage")

    def promote(self, version: str, spec: svc.PromoteSpec) -> dict[str, Any]:
        return self._json("POST", f"/models/{version}/promote", json=asdict(spec))

    def rollback(self, alias: str) -> dict[str, Any]:
        return self._json("POST", f"/models/{alias}/rollback")

    def model_card(self, version: str) -> dict[str, Any]:
        return self._json("GET", f"/models/{version}/card")

    def start_eval(self, spec: svc.EvalSpec) -> dict[str, Any]:
        return self._json("POST", "/evals", json=asdict(spec))

    def get_eval(self, eval_id: str) -> dict[str, Any]:
        return self._json("GET", f"/evals/{eval_id}")

    def sample(self, spec: svc.SampleSpec) -> dict[str, Any]:
        return self._json("POST", "/sample", json=asdict(spec))

    def add_user(self, spec: svc.UserSpec) -> dict[str, Any]:
        return self._json("POST", "/users", json=asdict(spec))

    def list_users(self) -> list[dict[str, Any]]:
        return self._json("GET", "/users")["users"]

    def set_password(self, name: str, password: str) -> dict[str, Any]:
        raise CLIError("changing credentials is not offered over REST; it needs the studio stopped")

    def new_token(self, name: str) -> dict[str, Any]:
        raise CLIError("changing credentials is not offered over REST; it needs the studio stopped")

    def create_campaign(self, spec: svc.CampaignSpec) -> dict[str, Any]:
        return self._json("POST", "/campaigns", json=asdict(spec))

    def list_campaigns(self) -> list[dict[str, Any]]:
        return self._json("GET", "/campaigns")["campaigns"]

    def create_battle_campaign(self, spec: svc.BattleCampaignSpec) -> dict[str, Any]:
        return self._json("POST", "/arena/campaigns", json=asdict(spec))

    def battle_log(self, campaign: str | None) -> list[dict[str, Any]]:
        return self._json("GET", "/arena/battles/log", params=svc.given(campaign=campaign))

    def leaderboard(self, spec: svc.LeaderboardSpec) -> list[dict[str, Any]]:
        return self._json("GET", "/leaderboard", params=svc.given(**asdict(spec)))

    def start_run(self, spec: svc.RunSpec) -> dict[str, Any]:
        return self._json("POST", "/runs", json=asdict(spec))

    def list_runs(self) -> list[dict[str, Any]]:
        return self._json("GET", "/runs")

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._json("GET", f"/runs/{run_id}")

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        return self._json("POST", f"/runs/{run_id}/cancel")

    def export(self, out: Path, spec: svc.ExportSpec) -> dict[str, Any]:
        fmt = spec.format or format_for(out)  # as services.export reads it
        if fmt == "datasets":
            raise CLIError(
                "the studio holds the database and serves exports as parquet or jsonl files; "
                "pass --format parquet or jsonl, or stop the studio for a datasets folder"
            )
        resp = self._call("GET", "/export", params=svc.given(**asdict(spec) | {"format": fmt}))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(resp.content)
        return {"path": str(out), "format": fmt, "kind": spec.kind, "counts": {}}

    def backup(self, out: Path) -> dict[str, Any]:
        if out.exists():
            raise CLIError(f"{out}: already exists; a backup never overwrites a file, pick a new name")
        resp = self._call("GET", "/backup")
        partial = out.with_name(f".{out.name}.partial")
        partial.write_bytes(resp.content)
        partial.replace(out)
        return {"path": str(out), "bytes": out.stat().st_size}


def _record(p: ImportedPrompt) -> dict[str, Any]:
    """A validated prompt as a JSONL record again, for the REST route to check and store."""
    record = {"messages": p.messages, **p.metadata}
    if p.external_id is not None:
        record["id"] = p.external_id
    return record


@contextmanager
def connect(
    data_dir: Path, url: str | None = None, token: str | None = None, local_only: str | None = None
) -> Iterator[Client]:
    """The client for a command: REST with --url; else the database itself when it is free;
    else the studio that holds it, over REST. `local_only` (a reason) refuses the REST way."""
    client: Client
    if url and not local_only:
        client = RestClient(studio_url(data_dir, url), api_token(data_dir, token))
    else:
        try:
            client = LocalClient(svc.OfflineContext(data_dir))
        except StoreLockedError as exc:
            if local_only:
                raise CLIError(f"{exc}\n{local_only}") from None
            client = RestClient(studio_url(data_dir), api_token(data_dir, token), note=str(exc))
    try:
        yield client
    finally:
        client.close()
