"""One function per user action: the studio's service layer.

REST (`studio/api.py`), the Gradio UI and the CLI (`studio/client.py`) are doors over these
functions. Each action takes the context it runs in and the acting `User`, and in this order:

1. checks the user's capability (`@requires`, before anything else happens);
2. applies the one set of defaults (the request specs below: REST bodies are these dataclasses,
   CLI flags and UI controls take their defaults from them);
3. validates (mostly in the domain modules it calls) and does the work;
4. wakes the background workers that the change concerns (task sampler, training runner).

A door authenticates (bearer token, Gradio session, or the CLI's local user) and translates
errors; it never checks a role and never restates a default. The errors a door translates:
`AuthError` (refused: REST 403), `StoreError`/`PromptFileError`/`ValueError` (bad input, nothing
stored: REST 422) and `BackendError`, `NeedsStudio` among them (a part that is not running:
REST 503).

The context is either the running `Studio` (runtime.py) or an `OfflineContext`: the database and
the data directory of a studio that is not running, which the CLI uses when it can open the file.
There waking is a no-op, and actions that need the model server or the runner say to start
`studio serve`.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

import yaml
from pydantic import Field

from studio import campaigns as camp
from studio import labeling, quality, training, users
from studio.config import Settings
from studio.export import FORMATS as EXPORT_FORMATS
from studio.export import KINDS, write_export
from studio.importer import ImportedPrompt, normalize_messages, read_prompts, to_prompt
from studio.labeling import Submission
from studio.serving.client import BackendError, OpenAIChatBackend, SamplingParams
from studio.store import Store, StoreError
from studio.textcheck import MAX_EDIT_CHARS, MAX_KEY_CHARS, MAX_RATIONALE_CHARS, check_text
from studio.users import AuthError, User

# `arena` (and `jobs`, which imports it) are imported by the actions that use them: they bring
# scipy, about 0.8 s of every CLI command's start on this machine, for the few that rate battles.
if TYPE_CHECKING:
    from studio.jobs import Runner
    from studio.sampling import Sampler
    from studio.task_sampler import TaskSampler

BASE_VERSION = "base"  # the served base's version name when the studio has not said otherwise
# Whoever can open the DuckDB file owns the data (it holds every password hash and can be
# copied), so the CLI working on the file directly acts as an admin.
CLI_USER = User("cli", "admin")
# A download is one file: a `datasets` folder is written by `studio export` on the machine.
DOWNLOAD_FORMATS = ("parquet", "jsonl")


class NeedsStudio(BackendError):
    """The action needs a part only a running studio has (the model server, the runner)."""


# -- context ------------------------------------------------------------------------------
class Context(Protocol):
    """What an action runs in: the running `Studio`, or an `OfflineContext`."""

    settings: Settings
    store: Store | None
    backend: OpenAIChatBackend | None
    sampler: Sampler | None
    task_sampler: TaskSampler | None
    runner: Runner | None
    base_version: str

    def add_adapter(
        self,
        name: str,
        path: Path,
        source: str,
        meta: dict[str, Any] | None = None,
        parent: str | None = None,
    ) -> dict: ...

    def health(self) -> dict[str, Any]: ...

    def serving_state(self) -> dict[str, Any] | None: ...


class OfflineContext:
    """A studio's database and data directory while no studio runs (for the CLI).

    Opening it takes the database file: it raises `StoreLockedError` while a studio holds it.
    """

    backend = None
    sampler = None
    task_sampler = None
    runner = None

    def __init__(self, data_dir: Path | str):
        self.settings = Settings(data_dir=Path(data_dir))
        self.store: Store | None = Store(self.settings.db_path)
        self.base_version = BASE_VERSION

    def add_adapter(
        self,
        name: str,
        path: Path,
        source: str,
        meta: dict[str, Any] | None = None,
        parent: str | None = None,
    ) -> dict:
        raise _needs_studio("adding an adapter hot-loads it, which needs the model server")

    def health(self) -> dict[str, Any]:
        return {"studio": "offline", "store": {"path": str(self.settings.db_path), "ok": True}}

    def serving_state(self) -> dict[str, Any] | None:
        return None  # no model server here

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> OfflineContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _needs_studio(what: str) -> NeedsStudio:
    return NeedsStudio(
        f"{what}, and only a running studio has one: start one with `studio serve` in another "
        "terminal (or pass --url to reach a studio elsewhere)"
    )


def _db(ctx: Context) -> Store:
    if ctx.store is None:
        raise NeedsStudio("the studio has not started yet (its database is not open); try again shortly")
    return ctx.store


# -- the capability check ---------------------------------------------------------------------
EXPERT_QUALITY = "admin"  # who may read quality per person (names, agreement, biases)
HEALTH_DETAIL = "train"  # who may read where the studio's files, ports and processes are
F = TypeVar("F", bound=Callable[..., Any])
ACTIONS: dict[str, Callable[..., Any]] = {}  # every action by name, for doors and tests that list them


def requires(capability: str) -> Callable[[F], F]:
    """Check `users.CAN[capability]` for the acting user before the action does anything."""
    if capability not in users.CAN:
        raise ValueError(f"unknown capability {capability!r}; see users.CAN")

    def wrap(action: F) -> F:
        @functools.wraps(action)
        def checked(ctx: Context, user: User | None, *args: Any, **kwargs: Any) -> Any:
            if user is None:
                raise AuthError("not logged in")
            user.require(capability)
            return action(ctx, user, *args, **kwargs)

        checked.capability = capability  # type: ignore[attr-defined]
        ACTIONS[action.__name__] = checked
        return checked  # type: ignore[return-value]

    return wrap


# -- request specs: the one place of each default ------------------------------------------------
def doc(text: str) -> Any:
    """Help text of a spec field (shown in the REST API's schema)."""
    return Field(description=text)


@dataclass
class CampaignSpec:
    """A labeling campaign (`POST /campaigns`, `studio campaigns create`, the Admin tab)."""

    name: str
    prompt_set: Annotated[str, doc("an imported prompt set")]
    model: Annotated[str, doc("a model version or alias")] = camp.POLICY
    n: Annotated[int, doc("completions per task (2-8)")] = 4
    overlap: Annotated[int, doc("different annotators per task (1-50)")] = 1
    temperature: float = SamplingParams.temperature
    top_p: float = SamplingParams.top_p
    max_tokens: int = SamplingParams.max_tokens
    seed: Annotated[int | None, doc("sampling seed, for reproducible completions")] = None
    task_timeout_s: Annotated[int, doc("an unsubmitted task goes back to the pool after this")] = 1800
    guidelines: Annotated[str, doc("Markdown shown to annotators")] = ""


@dataclass
class BattleCampaignSpec:
    """A blind battle campaign between versions (`POST /arena/campaigns`, `studio arena create`)."""

    name: str
    prompt_set: Annotated[str, doc("an imported prompt set")]
    versions: Annotated[list[str], doc("two or more model versions or aliases")]
    budget: Annotated[int, doc("votes after which the campaign stops")] = 200
    temperature: float = camp.BATTLE_TEMPERATURE
    top_p: float = SamplingParams.top_p
    max_tokens: int = SamplingParams.max_tokens
    both_bad_as_tie: Annotated[bool, doc("'both bad' votes count as ties (else left out)")] = True
    leak_words: Annotated[
        list[str] | None, doc("identity-revealing words (a built-in list plus the version names if unset)")
    ] = None
    criteria: Annotated[list[str] | None, doc("optional per-criterion scores, 1-5")] = None


@dataclass
class JudgmentSpec(Submission):
    """One judgment (`POST /judgments`, the Label tab): a `labeling.Submission` plus how to answer."""

    shown_at: Annotated[float | None, doc("unix time the task was shown, for timings")] = None
    next: Annotated[bool, doc("also return the next task, taken in the same step")] = True


@dataclass
class VoteSpec:
    """A vote on a blind battle (`POST /arena/votes`, the Side by side tab)."""

    battle_id: str
    winner: Annotated[str, doc("a, b, tie or both_bad")]
    scores: Annotated[dict[str, dict[str, int]] | None, doc("criterion -> {'a': 1-5, 'b': 1-5}")] = None
    rationale: str | None = None
    idempotency_key: Annotated[str | None, doc("retries with the same key store one vote")] = None
    duration_ms: Annotated[float | None, doc("time from showing the battle to the vote")] = None


@dataclass
class SampleSpec:
    """Completions from the served model, stored (`POST /sample`, `studio sample`, Playground).

    Defaults and bounds of the sampling fields are `SamplingParams`'s.
    """

    prompt: Annotated[str | None, doc("a user prompt (or give 'messages')")] = None
    messages: Annotated[list[dict[str, str]] | None, doc("chat messages to answer")] = None
    n: Annotated[int, doc("number of completions")] = SamplingParams.n
    temperature: float = SamplingParams.temperature
    top_p: float = SamplingParams.top_p
    max_tokens: int = SamplingParams.max_tokens
    seed: Annotated[int | None, doc("sampling seed, for reproducible completions")] = None
    model: Annotated[str | None, doc("model version or alias; the served base by default")] = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'messages' (a list)")


@dataclass
class RunSpec:
    """A training run (`POST /runs`, `studio train`, the Train tab). Unset: the recipe's value."""

    stage: Annotated[str, doc("reward, dpo, ppo, sft, or the pipeline ppo_then_dpo")]
    parent: Annotated[str, doc("model version or alias to start from")] = camp.POLICY
    campaigns: Annotated[list[str] | None, doc("labeling campaigns to train on (all if unset)")] = None
    held_out: Annotated[float | None, doc("share of prompts kept out for evaluation")] = None
    recipe: Annotated[str | None, doc("recipe name (data/recipes); the stage's own by default")] = None
    steps: Annotated[int | None, doc("override the recipe's steps (ppo: iterations)")] = None
    overrides: Annotated[dict[str, Any] | None, doc("recipe keys, e.g. {'train.beta': 0.2}")] = None
    reward_model: Annotated[str | None, doc("ppo: a reward version (the newest by default)")] = None
    annotators: Annotated[list[str] | None, doc("only these annotators' judgments (all if unset)")] = None
    min_strength: Annotated[int | None, doc("only judgments stated at least this strong (1-3)")] = None
    eval_prompt_set: Annotated[
        str | None,
        doc("a prompt set marked for evaluation: the re-battle samples it (less any prompt trained on)"),
    ] = None
    launcher: Annotated[
        str | None, doc("local, accelerate or ray (unset: the studio's --launcher; ray needs --ray-address)")
    ] = None
    num_processes: Annotated[
        int | None, doc("processes per stage under accelerate (the studio's --num-processes if unset)")
    ] = None


@dataclass
class ImportSpec:
    """Prompt records sent over REST (`POST /prompt-sets/{name}/prompts`)."""

    records: Annotated[
        list[dict[str, Any]], doc("prompt records as in a JSONL file: 'prompt' or 'messages', optional 'id'")
    ]
    source: Annotated[str, doc("where the prompts came from, kept with the set")] = "rest"
    locations: Annotated[list[str] | None, doc("a name per record for error messages (file and line)")] = None


@dataclass
class UserSpec:
    """A new account (`POST /users`, `studio users add`, the Admin tab)."""

    name: str
    role: Annotated[str, doc("annotator, expert, engineer or admin")]
    password: Annotated[str, doc(f"at least {users.MIN_PASSWORD} characters")]


@dataclass
class PromoteSpec:
    alias: Annotated[str, doc("the alias to point at this version")] = camp.POLICY
    force: Annotated[bool, doc("promote although the gate did not pass (who forced it is recorded)")] = False


@dataclass
class EvalSpec:
    """An evaluation of a version against another (`POST /evals`, `studio eval`, the Models tab)."""

    version: Annotated[str, doc("the version (or alias) to evaluate")]
    against: Annotated[str | None, doc("the version to compare with (its parent by default)")] = None
    suites: Annotated[list[str] | None, doc("suite names in data/evals (all by default)")] = None
    seed: Annotated[int, doc("seeds every request and the bootstrap: same seed, same numbers")] = 0
    limit: Annotated[
        int | None, doc("only the first N items of each suite (a quick look: the gate reads full runs)")
    ] = None
    judge_url: Annotated[
        str | None, doc("an OpenAI-compatible server for the judge (the studio's own by default)")
    ] = None
    judge_model: Annotated[str | None, doc("the judge's model (the served base model by default)")] = None
    temperature: Annotated[
        float | None, doc("the consistency suite's temperature (the suite's own by default)")
    ] = None
    waive_rebattle: Annotated[
        bool, doc("an engineer's waiver: the gate passes without the re-battle's verdict (recorded)")
    ] = False

    def judge(self) -> dict[str, Any] | None:
        if self.judge_url is None and self.judge_model is None:
            return None
        if not self.judge_model:
            raise StoreError("judge_url: give the judge's model too (judge_model / --judge-model)")
        return {"model": self.judge_model, "url": self.judge_url}


@dataclass
class GuidelinesSpec:
    text: str


@dataclass
class AdapterSpec:
    name: str
    path: Annotated[str, doc("a PEFT LoRA adapter folder on the studio's machine")]


@dataclass
class ExportSpec:
    """Which rows to export, and how."""

    kind: Annotated[str, doc("preference, unpaired or sft")] = "preference"
    format: Annotated[
        str | None, doc("datasets, parquet or jsonl (default: from the file name; a download: parquet)")
    ] = None
    campaign: Annotated[str | None, doc("only this campaign (all if unset)")] = None


@dataclass
class LeaderboardSpec:
    """Which ratings to fit (`GET /leaderboard`, `studio leaderboard`, the Leaderboard tab)."""

    campaign: Annotated[str | None, doc("one battle campaign (all if unset)")] = None
    style: Annotated[str | None, doc("'length' rates with answer length held fixed")] = None
    rounds: Annotated[int, doc("bootstrap rounds")] = 100
    min_battles: Annotated[int, doc("versions with fewer battles are marked provisional")] = 0


def spec_defaults(spec: type) -> dict[str, Any]:
    """Field name -> default of a spec (fields without a plain default left out), for doors' controls."""
    return {f.name: f.default for f in fields(spec) if f.default is not MISSING}


def given(**values: Any) -> dict[str, Any]:
    """The values a user actually gave (None: not given), so a spec's defaults apply to the rest."""
    return {k: v for k, v in values.items() if v is not None}


def parse_overrides(lines: Iterable[str], where: str = "--set") -> dict[str, Any]:
    """Recipe overrides written KEY=VALUE (values in YAML: 0.2, true, [1, 2]); blank lines skipped."""
    out: dict[str, Any] = {}
    for line in lines:
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise StoreError(f"{where} {line}: write recipe overrides as KEY=VALUE, e.g. train.beta=0.2")
        out[key.strip()] = yaml.safe_load(value)
    return out


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON carries it: times as ISO 8601 text."""
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def _json(value: Any) -> Any:
    """A nested answer as JSON carries it: times as ISO 8601 text, at any depth."""
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value.isoformat() if hasattr(value, "isoformat") else value


def _fields(spec: Any) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}


def _wake_tasks(ctx: Context, campaign: str | None = None, waiting: User | None = None) -> None:
    """Tell the task sampler a task was used up, or that `waiting` found none ready in the
    campaign. A worker waiting without a task holds nothing and judges nothing, so only this
    tells the sampler they are there: they count in its demand, not just in its wake-up."""
    if ctx.task_sampler is not None:
        who = waiting.name if waiting is not None else None
        ctx.task_sampler.poke(campaign, starved=waiting is not None, who=who)


def _context_of(ctx: Context, store: Store, models: list[str]) -> int | None:
    """The smallest context (tokens, prompt and answer together) of the served models a campaign
    samples from, so that its max_tokens is checked when it is created, not found wrong by the
    sampler later. None without a model server (offline) or while it does not answer (it is
    restarting): the campaign is then checked by the domain's own bounds only."""
    backend = getattr(ctx, "backend", None)
    if backend is None:
        return None
    lengths = []
    for model in models:
        try:
            version = camp.resolve_policy(store, model)
        except (StoreError, TypeError):
            continue  # the domain function names the bad model
        length = backend.max_model_len(version)
        if length is not None:
            lengths.append(length)
    return min(lengths) if lengths else None


def _sampler_error(ctx: Context, campaign: str) -> str | None:
    """Why the task sampler last failed to sample for the campaign (None while it samples, or offline)."""
    return ctx.task_sampler.last_error(campaign) if ctx.task_sampler is not None else None


# -- the studio ----------------------------------------------------------------------------------
# Services anyone may call, logged in or not; every other public function taking a user is an
# action with a capability (ACTIONS).
PUBLIC = ("health",)


def health(ctx: Context, user: User | None = None) -> dict[str, Any]:
    """Whether the studio is up ({"studio": "ok" | "degraded" | "offline"}); public (no login),
    as a load balancer asks for it. Users who may see the detail (HEALTH_DETAIL: engineers and
    admins) also get the store's and the model server's state: the database path, vLLM's URL,
    port, pid and log, which tell an outsider where things are."""
    report = ctx.health()
    if user is not None and user.can(HEALTH_DETAIL):
        return report
    return {"studio": report["studio"]}


@requires("view")
def me(ctx: Context, user: User) -> dict[str, Any]:
    return {"name": user.name, "role": user.role}


# -- prompts -------------------------------------------------------------------------------------
@requires("import")
def import_prompts(
    ctx: Context, user: User, set_name: str, prompts: list[ImportedPrompt], source: str
) -> dict[str, Any]:
    """Add validated prompts to a set in one transaction (a bad set name stores nothing)."""
    result = _db(ctx).import_prompts(set_name, prompts, source=source)
    return {
        "set": result.set_name,
        "added": result.added,
        "duplicates": result.duplicates,
        "summary": result.summary(),
    }


@requires("import")
def import_records(ctx: Context, user: User, set_name: str, spec: ImportSpec) -> dict[str, Any]:
    """`import_prompts` for records sent as JSON: every record is checked before any is stored."""
    locations = spec.locations or [f"record {i}" for i in range(1, len(spec.records) + 1)]
    if len(locations) != len(spec.records):
        raise StoreError("'locations' must have one entry per record")
    prompts = [to_prompt(r, where) for r, where in zip(spec.records, locations, strict=True)]
    return import_prompts(ctx, user, set_name, prompts, spec.source)


@requires("import")
def import_file(
    ctx: Context,
    user: User,
    set_name: str,
    path: Path | str,
    fmt: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """`import_prompts` from a JSONL, CSV or Parquet file or a datasets folder on the studio's machine."""
    path = Path(path)
    return import_prompts(ctx, user, set_name, read_prompts(path, fmt, split), path.name)


@requires("view")
def list_prompt_sets(ctx: Context, user: User) -> list[dict[str, Any]]:
    return [public(s) for s in _db(ctx).prompt_sets()]


# -- models --------------------------------------------------------------------------------------
@requires("view")
def list_models(ctx: Context, user: User) -> dict[str, Any]:
    """Every registered version, and where each alias points."""
    store = _db(ctx)
    return {"models": [public(v) for v in store.model_versions()], "aliases": camp.aliases(store)}


@requires("sample")
def sample(ctx: Context, user: User, spec: SampleSpec) -> dict[str, Any]:
    """Sample `n` completions from a version (the served base by default); every one is stored."""
    store = _db(ctx)
    messages = (
        normalize_messages(spec.prompt, "request", "prompt")
        if spec.prompt is not None
        else normalize_messages(spec.messages, "request", "messages")
    )
    params = SamplingParams(
        n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens, seed=spec.seed
    )
    version = camp.resolve_policy(store, spec.model or ctx.base_version)
    if ctx.sampler is None:
        raise _needs_studio("sampling needs the model server")
    rows = ctx.sampler.sample(messages, params, version=version)
    return {"generations": [public(r) for r in rows]}


@requires("train")
def add_adapter(ctx: Context, user: User, spec: AdapterSpec) -> dict[str, Any]:
    """Hot-load a LoRA adapter folder into the servers of the base, then register it as a version.

    All or nothing: a folder the servers refuse (bad config, bad weights) is never stored (422);
    the answer comes once every server of the base serves it."""
    return public(ctx.add_adapter(spec.name, Path(spec.path), source=f"upload:{user.name}"))


@requires("admin")
def model_servers(ctx: Context, user: User) -> dict[str, Any]:
    """Every model server (managed or external): its state, what it serves, requests in flight
    and last error; and the versions that could not be served, with why."""
    backend = ctx.health().get("backend") or {}
    return {
        "healthy": bool(backend.get("healthy")),
        "servers": backend.get("servers", []),
        "failed": backend.get("failed", {}),
        "max_servers": backend.get("max_servers"),
    }


@requires("train")
def lineage(ctx: Context, user: User, version: str) -> list[dict[str, Any]]:
    """Version <- run <- snapshot <- judgments, back to the base."""
    return [public(step) for step in training.lineage(_db(ctx), version)]


@requires("train")
def promote(ctx: Context, user: User, version: str, spec: PromoteSpec | None = None) -> dict[str, Any]:
    """Point an alias (policy by default) at a version: new labeling samples from it. Refused
    while the version's gate does not pass (every reason named with its numbers) unless
    `spec.force`; recorded with the user, and whether it was forced."""
    from studio import promotion  # the gate brings the evaluation engine: see the imports at the top

    spec = spec or PromoteSpec()
    return promotion.promote(_db(ctx), version, spec.alias, user.name, force=spec.force)


@requires("train")
def rollback(ctx: Context, user: User, alias: str = camp.POLICY) -> dict[str, Any]:
    """Point an alias back at the parent of the version it points at now; recorded."""
    from studio import promotion  # the gate brings the evaluation engine: see the imports at the top

    return promotion.rollback(_db(ctx), alias, user.name)


@requires("train")
def model_card(ctx: Context, user: User, version: str) -> dict[str, Any]:
    """A version's card: its metrics beside its parent's (delta, interval), the re-battle (votes,
    win rate with its interval, verdict), the gate's state and decisions, the promotion history
    and the lineage. Engineers' reading: the card shows a running re-battle's tally."""
    from studio import promotion  # the gate brings the evaluation engine: see the imports at the top

    return _json(promotion.card(_db(ctx), version))


# -- evaluation -------------------------------------------------------------------------------------
@requires("train")
def start_eval(ctx: Context, user: User, spec: EvalSpec) -> dict[str, Any]:
    """Check the request and queue the evaluation on the studio's evaluation worker (one at a time);
    answers at once with its record (status 'queued'). When it succeeds against the version's
    parent, the gate decides on the version. Needs the model server; a bad input is told first."""
    from studio import promotion
    from studio.evals import engine

    store = _db(ctx)
    judge = spec.judge()
    options = {
        "suites": spec.suites,
        "seed": spec.seed,
        "judge": judge,
        "temperature": spec.temperature,
        "limit": spec.limit,
        "waived": spec.waive_rebattle,
    }
    backend = getattr(ctx, "backend", None)
    if backend is None:
        engine.plan_eval(store, None, spec.version, spec.against, **options)  # input errors first
        raise _needs_studio("evaluating runs the suites on the model server")
    return _json(
        promotion.start_evaluation(
            store, backend, spec.version, spec.against, created_by=user.name, **options
        )
    )


@requires("train")
def get_eval(ctx: Context, user: User, eval_id: str) -> dict[str, Any]:
    """One evaluation: request, status, `result` ({version, against, metrics, gate}) and details."""
    from studio.evals import engine

    return _json(engine.get_eval(_db(ctx), eval_id))


@requires("train")
def list_evals(ctx: Context, user: User, version: str | None = None) -> list[dict[str, Any]]:
    """Evaluations, newest first (of one version when given)."""
    from studio.evals import engine

    return [_json(e) for e in engine.list_evals(_db(ctx), version)]


# -- users ---------------------------------------------------------------------------------------
@requires("admin")
def add_user(ctx: Context, user: User, spec: UserSpec) -> dict[str, Any]:
    """Create an account; the answer carries its REST token, shown this once."""
    token = users.add_user(_db(ctx), spec.name, spec.role, spec.password)
    return {"name": spec.name, "role": spec.role, "token": token}


@requires("admin")
def list_users(ctx: Context, user: User) -> list[dict[str, Any]]:
    return [public(u) for u in users.list_users(_db(ctx))]


@requires("admin")
def set_password(ctx: Context, user: User, name: str, password: str) -> dict[str, Any]:
    users.set_password(_db(ctx), name, password)
    return {"name": name}


@requires("admin")
def new_token(ctx: Context, user: User, name: str) -> dict[str, Any]:
    """Replace a user's REST token; the old one stops working at once."""
    return {"name": name, "token": users.new_token(_db(ctx), name)}


# -- labeling campaigns ----------------------------------------------------------------------------
@requires("admin")
def create_campaign(ctx: Context, user: User, spec: CampaignSpec) -> dict[str, Any]:
    """Create a labeling campaign; the task sampler starts filling its buffer."""
    store = _db(ctx)
    fields_ = _fields(spec)
    context = _context_of(ctx, store, [spec.model])
    created = camp.create_campaign(
        store, fields_.pop("name"), created_by=user.name, max_model_len=context, **fields_
    )
    _wake_tasks(ctx)
    return public(created)


@requires("view")
def list_campaigns(
    ctx: Context, user: User, kind: str | None = None, with_progress: bool = False
) -> list[dict[str, Any]]:
    """Campaigns (of one kind: label or battle), oldest first, with their counts if asked."""
    store = _db(ctx)
    rows = [public(c) for c in camp.list_campaigns(store, kind=kind)]
    for row in rows:
        row["sampler_error"] = _sampler_error(ctx, row["name"])
    if with_progress:
        for row in rows:
            row["progress"] = labeling.progress(store, row["name"])
    return rows


@requires("view")
def get_campaign(ctx: Context, user: User, name: str) -> dict[str, Any]:
    """A campaign and where it stands, for the whole campaign and for this user."""
    store = _db(ctx)
    out = public(camp.get_campaign(store, name))
    out["progress"] = labeling.progress(store, name, user.name)
    out["sampler_error"] = _sampler_error(ctx, name)
    return out


@requires("admin")
def sampler_overview(ctx: Context, user: User) -> dict[str, Any]:
    """What the background sampler does: sequences in flight (and the measured curve they come
    from) and, per active campaign, its buffer (ready, target), the demand (active workers,
    their pace), the supply in tasks per minute and the expected wait per task."""
    if ctx.task_sampler is None:
        raise NeedsStudio("the task sampler runs only in a running studio; start it with `studio serve`")
    return ctx.task_sampler.overview()


@requires("admin")
def measure_serving(ctx: Context, user: User) -> dict[str, Any]:
    """Measure the model server's throughput against sequences in flight now (about 30 s, the
    sampler sends nothing new meanwhile) and sample at the curve's knee from then on."""
    probe = getattr(ctx, "serving_probe", None)
    if ctx.task_sampler is None or ctx.sampler is None or probe is None:
        raise NeedsStudio("measuring the model server needs a running studio; start it with `studio serve`")
    ctx.task_sampler.measure(probe(fresh=True))
    return ctx.task_sampler.overview()


@requires("admin")
def set_guidelines(ctx: Context, user: User, name: str, text: str) -> dict[str, Any]:
    camp.set_guidelines(_db(ctx), name, text)
    return {"campaign": name, "guidelines": text}


@requires("admin")
def campaign_quality(ctx: Context, user: User, name: str) -> dict[str, Any]:
    """Agreement (pairwise, Krippendorff's alpha) and per-annotator quality of a campaign."""
    store = _db(ctx)
    camp.get_campaign(store, name)
    return {
        "campaign": name,
        "agreement": quality.campaign_agreement(store, name),
        "annotators": quality.annotator_quality(store, name),
        "progress": labeling.progress(store, name),
    }


# -- labeling ------------------------------------------------------------------------------------
def _with_progress(ctx: Context, campaign: str, user: User, task: dict[str, Any] | None) -> dict[str, Any]:
    """The next-task answer: the task, the progress, and a `status` with a `note` saying why there
    is no task when there is none (a task: "task"; none: "done", "preparing", "restarting",
    "server_down", "no_server", "sampler_failing"), so that a client never sees a quiet
    `task: null`."""
    status = labeling.progress(_db(ctx), campaign, user.name)
    if task is None and status["remaining"]:
        _wake_tasks(ctx, campaign, waiting=user)  # the buffer ran dry for this annotator
    status["sampler_error"] = _sampler_error(ctx, campaign)  # why no task is ready, if sampling fails
    state, note = _why_no_task(ctx, status) if task is None else ("task", None)
    return {"task": task, "progress": status, "status": state, "note": note}


def _why_no_task(ctx: Context, progress: dict[str, Any]) -> tuple[str, str]:
    if not progress.get("remaining"):
        return "done", "no tasks left for you in this campaign"
    serving = ctx.serving_state() if hasattr(ctx, "serving_state") else None
    state = serving.get("state") if serving else None
    if serving and state in ("starting", "restarting"):
        restart = f" (restart {serving['restarts']})" if serving.get("restarts") else ""
        return "restarting", f"the model server is restarting{restart}; tasks resume when it is back"
    if serving and state in ("failed", "stopped"):
        why = f": {serving['last_error']}" if serving.get("last_error") else ""
        return "server_down", f"the model server is down{why}; tell an admin (the studio's log says more)"
    if progress.get("sampler_error"):
        return "sampler_failing", (
            f"sampling answers for this campaign is failing ({progress['sampler_error']}); "
            "it is retried by itself: tell an admin if this stays"
        )
    if serving is None:
        return "no_server", (
            "no model server runs here: tasks are sampled only while a studio serves (`studio serve`)"
        )
    return "preparing", f"the model is sampling answers ({progress.get('ready', 0)} ready); try again shortly"


@requires("label")
def next_task(ctx: Context, user: User, campaign: str) -> dict[str, Any]:
    """The user's open task in the campaign, or a new one (None when none is ready), and progress."""
    store = _db(ctx)
    camp.require_kind(store, campaign, "label")  # a battle campaign's sampling is never the annotators'
    return _with_progress(ctx, campaign, user, labeling.next_task(store, campaign, user.name))


def _judged(
    ctx: Context, user: User, spec: JudgmentSpec, judgment: dict[str, Any], task: dict[str, Any] | None
) -> dict[str, Any]:
    _wake_tasks(ctx)  # a place was used up: top the buffer back up
    out: dict[str, Any] = {"judgment": judgment}
    if spec.next:
        out["next"] = _with_progress(ctx, judgment["campaign"], user, task)
    return out


def _check_judgment_text(spec: JudgmentSpec) -> None:
    """The free text of a judgment is storable text within its limit (a lone surrogate such as a
    JSON "\\ud800" escape cannot be stored): checked before the pool takes the judgment."""
    check_text(spec.assignment_id, "assignment_id", max_chars=MAX_KEY_CHARS)
    check_text(spec.idempotency_key, "idempotency_key", max_chars=MAX_KEY_CHARS, optional=True)
    check_text(spec.rationale, "rationale", max_chars=MAX_RATIONALE_CHARS, optional=True)
    check_text(spec.edited_text, "edited_text", max_chars=MAX_EDIT_CHARS, optional=True)


@requires("label")
def begin_judgment(
    ctx: Context, user: User, spec: JudgmentSpec
) -> tuple[Future[None], Callable[[], dict[str, Any]]]:
    """`submit_judgment` in two steps, for a caller on an event loop (the REST route): await the
    future (the group commit, off the loop), then call the second part for the answer; it
    raises what the commit raised, after taking the change back. With `spec.next` the next task
    is taken in the same step. The capability check reads the in-memory user: no query."""
    _check_judgment_text(spec)
    committed, finish = labeling.begin_submit(
        _db(ctx), user.name, spec, shown_at=spec.shown_at, then_next=spec.next
    )

    def answer() -> dict[str, Any]:
        judgment, task = finish()
        return _judged(ctx, user, spec, judgment, task)

    return committed, answer


@requires("label")
def submit_judgment(ctx: Context, user: User, spec: JudgmentSpec) -> dict[str, Any]:
    """Store one judgment and answer once it is committed (retries with the same idempotency key
    store it once); with `spec.next` the answer also carries the user's next task."""
    store = _db(ctx)
    _check_judgment_text(spec)
    judgment = labeling.submit(store, user.name, spec, shown_at=spec.shown_at)
    task = labeling.next_task(store, judgment["campaign"], user.name) if spec.next else None
    return _judged(ctx, user, spec, judgment, task)


@requires("label")
def skip(ctx: Context, user: User, assignment_id: str) -> dict[str, Any]:
    """Give a task back; the user is never offered it again."""
    check_text(assignment_id, "assignment_id", max_chars=MAX_KEY_CHARS)
    labeling.skip(_db(ctx), user.name, assignment_id)
    return {"skipped": assignment_id}


# -- battles -------------------------------------------------------------------------------------
@requires("admin")
def create_battle_campaign(ctx: Context, user: User, spec: BattleCampaignSpec) -> dict[str, Any]:
    """Create a blind battle campaign; the task sampler starts sampling its battles."""
    from studio import arena  # scipy: see the imports at the top

    store = _db(ctx)
    fields_ = _fields(spec)
    context = _context_of(ctx, store, spec.versions if isinstance(spec.versions, list) else [])
    created = arena.create_battle_campaign(
        store, fields_.pop("name"), created_by=user.name, max_model_len=context, **fields_
    )
    _wake_tasks(ctx)
    return public(created)


@requires("battle")
def next_battle(ctx: Context, user: User, campaign: str) -> dict[str, Any]:
    """The expert's battle: an opaque id, the prompt and two answers; nothing names a version."""
    from studio import arena  # scipy: see the imports at the top

    battle = arena.next_battle(_db(ctx), campaign, user.name)
    if battle is None:
        _wake_tasks(ctx, campaign, waiting=user)
    return {"battle": battle}


@requires("battle")
def vote(ctx: Context, user: User, spec: VoteSpec) -> dict[str, Any]:
    """Record the vote and reveal the versions (a retry gets the same reveal)."""
    from studio import arena  # scipy: see the imports at the top

    reveal = arena.vote(
        _db(ctx),
        user.name,
        spec.battle_id,
        spec.winner,
        scores=spec.scores,
        rationale=spec.rationale,
        idempotency_key=spec.idempotency_key,
        duration_ms=spec.duration_ms,
    )
    _wake_tasks(ctx)
    return {"reveal": reveal}


@requires("battle")
def regenerate(ctx: Context, user: User, battle_id: str) -> dict[str, Any]:
    """Drop the battle on screen (both answers together) so that a new one is sampled."""
    from studio import arena  # scipy: see the imports at the top

    store = _db(ctx)
    arena.regenerate(store, user.name, battle_id)
    campaign = store.query("SELECT campaign FROM battles WHERE id = ?", [battle_id])[0]["campaign"]
    _wake_tasks(ctx, campaign, waiting=user)  # the expert waits for the new one
    return {"discarded": battle_id}


@requires("view")
def battle_stats(ctx: Context, user: User, name: str) -> dict[str, Any]:
    """A battle campaign with its ratings, matrices and two-version interval; with expert quality
    (`experts`) for those who may see it (admins), else `experts` is None."""
    from studio import arena  # scipy: see the imports at the top

    store = _db(ctx)
    campaign = arena.battle_campaign(store, name)
    interval = arena.two_version_interval(store, name) if len(campaign["versions"]) == 2 else None
    return {
        "campaign": public(campaign),
        **arena.campaign_leaderboard(store, name),
        "two_version_interval": interval,
        # quality per person (names, agreement, position bias) is for admins only
        "experts": arena.expert_quality(store, name) if user.can(EXPERT_QUALITY) else None,
    }


@requires("view")
def leaderboard(ctx: Context, user: User, spec: LeaderboardSpec | None = None) -> dict[str, Any]:
    """Ratings over one battle campaign or all of them. `rows` is the leaderboard to show: the
    length-controlled one when `spec.style == 'length'`; the rest is arena.campaign_leaderboard's."""
    from studio import arena  # scipy: see the imports at the top

    spec = spec or LeaderboardSpec()
    if spec.style not in (None, "length"):
        raise StoreError(f"style={spec.style}: the only style control is 'length'")
    store = _db(ctx)
    board = arena.campaign_leaderboard(
        store,
        spec.campaign,
        rounds=spec.rounds,
        min_battles=spec.min_battles,
        style_control=spec.style == "length",
    )
    styled = board.get("style_controlled")  # absent while there are no votes
    board["rows"] = styled["leaderboard"] if spec.style and styled else board["leaderboard"]
    board["verdict"] = arena.battle_campaign(store, spec.campaign).get("verdict") if spec.campaign else None
    return board


def rate_battle_log(
    rows: list[dict[str, Any]], where: str, both_bad_as_tie: bool = True, spec: LeaderboardSpec | None = None
) -> list[dict[str, Any]]:
    """The leaderboard of a FastChat-style battle log (no studio, no database, no user needed)."""
    from studio.ratings import battles_from_log
    from studio.ratings import leaderboard as rate

    spec = spec or LeaderboardSpec()
    battles = battles_from_log(rows, both_bad_as_tie, where=where)
    return rate(battles, rounds=spec.rounds, min_battles=spec.min_battles)


@requires(EXPERT_QUALITY)
def expert_quality(ctx: Context, user: User, campaign: str | None = None) -> list[dict[str, Any]]:
    """Per expert: agreement with the majority of the others, and position bias (admins only:
    it names people and grades them)."""
    from studio import arena  # scipy: see the imports at the top

    return arena.expert_quality(_db(ctx), campaign)


@requires("admin")
def battle_log(ctx: Context, user: User, campaign: str | None = None) -> list[dict[str, Any]]:
    """Votes in FastChat's battle-log columns (answers and experts included: admins only)."""
    from studio import arena  # scipy: see the imports at the top

    return arena.battle_log(_db(ctx), campaign)


# -- training ------------------------------------------------------------------------------------
@requires("train")
def recipes(ctx: Context, user: User) -> dict[str, str]:
    """Recipe name -> file: the shipped ones and the studio's own (DATA_DIR/recipes)."""
    return {k: str(v) for k, v in training.recipes(ctx.settings.data_dir / "recipes").items()}


@requires("train")
def advice(ctx: Context, user: User) -> dict[str, Any]:
    """Which stage to run next, why, and the signals it read."""
    return training.advise(_db(ctx))


@requires("train")
def start_run(ctx: Context, user: User, spec: RunSpec) -> dict[str, Any]:
    """Validate, snapshot the data, queue the run and wake the runner (nothing stored on a bad input).
    The run fixes the prompts of its blind re-battle (`rebattle_prompts`: held out of the snapshot,
    or the spec's `eval_prompt_set`, never trained on); its `notes` say when there are none."""
    from studio import launchers

    run = training.submit_run(
        _db(ctx),
        ctx.settings.data_dir,
        created_by=user.name,
        # a running studio knows its launchers; offline, a ray choice is checked when the run starts
        launch_defaults=launchers.LaunchSettings.from_settings(ctx.settings) if ctx.runner else None,
        shared_dir=launchers.shared_root(ctx.settings),
        **_fields(spec),
    )
    if ctx.runner is not None:
        ctx.runner.poke()
    return public(run)  # `notes` says when the re-battle has no held-out prompts


@requires("train")
def list_runs(ctx: Context, user: User) -> list[dict[str, Any]]:
    """Runs, newest first."""
    return [public(r) for r in training.list_runs(_db(ctx))]


@requires("train")
def get_run(ctx: Context, user: User, run_id: str) -> dict[str, Any]:
    """A run with its progress (stage, step, ETA), curves and the tail of its log."""
    from studio import jobs  # it imports arena (scipy): see the imports at the top

    run = training.get_run(_db(ctx), run_id)
    out = Path(run["output_dir"])
    curves = jobs.read_metrics(out)  # read once: progress and curves both come from it
    return {
        **public(run),
        "progress": jobs.progress(run, curves),
        "curves": curves,
        "log": jobs.tail(out / "run.log"),
    }


@requires("train")
def cancel_run(ctx: Context, user: User, run_id: str) -> dict[str, Any]:
    """Stop a queued or running run (its process group); the run is marked cancelled by the user."""
    if ctx.runner is None:
        raise _needs_studio("cancelling a run stops its process, which needs the training runner")
    return public(ctx.runner.cancel(run_id, f"cancelled by {user.name}"))


# -- backup --------------------------------------------------------------------------------------
@requires("admin")
def backup(ctx: Context, user: User, out: Path | str) -> dict[str, Any]:
    """A consistent copy of the whole database (every table, the users' hashes too) written to the
    new file `out` on the studio's machine, while the studio runs (studio/backup.py)."""
    from studio.backup import backup_database

    return backup_database(_db(ctx), out)


@requires("admin")
def backup_download(ctx: Context, user: User) -> dict[str, Any]:
    """`backup` into a new temporary folder, as one file to download. The caller removes the
    folder (the parent of the returned `path`) once it is served."""
    folder = Path(tempfile.mkdtemp(prefix="studio-backup-"))
    try:
        return backup(ctx, user, folder / "studio.duckdb")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


# -- export --------------------------------------------------------------------------------------
def _check_export(spec: ExportSpec) -> None:
    if spec.kind not in KINDS:
        raise StoreError(f"kind={spec.kind}: use one of {', '.join(KINDS)}")
    if spec.format is not None and spec.format not in EXPORT_FORMATS:
        raise StoreError(f"format={spec.format}: use one of {', '.join(EXPORT_FORMATS)}")


@requires("admin")
def export(ctx: Context, user: User, out: Path | str, spec: ExportSpec | None = None) -> dict[str, Any]:
    """Write TRL-ready rows and their data card to `out` (format from its suffix unless given)."""
    spec = spec or ExportSpec()
    _check_export(spec)
    return write_export(_db(ctx), Path(out), spec.kind, spec.format, spec.campaign)


@requires("admin")
def export_download(ctx: Context, user: User, spec: ExportSpec | None = None) -> dict[str, Any]:
    """`export` into a new temporary folder, as one file to download (parquet unless jsonl is asked).
    The caller removes the folder (the parent of the returned `path`) once it is served."""
    spec = spec or ExportSpec()
    fmt = spec.format or DOWNLOAD_FORMATS[0]
    if fmt not in DOWNLOAD_FORMATS:
        raise StoreError(
            f"format={fmt}: a download is a parquet or jsonl file "
            "(a datasets folder comes from `studio export`)"
        )
    _check_export(spec)
    folder = Path(tempfile.mkdtemp(prefix="studio-export-"))
    try:
        return write_export(
            _db(ctx), folder / f"{spec.campaign or 'all'}-{spec.kind}.{fmt}", spec.kind, fmt, spec.campaign
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
