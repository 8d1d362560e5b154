"""The service layer, called directly: each action checks the acting user's capability before it
does anything, applies the specs' defaults, and wakes the background workers it concerns. And
the doors (REST, CLI) neither check roles nor restate defaults."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from studio import arena, training, users
from studio import campaigns as camp
from studio import services as svc
from studio.evals import engine
from studio.importer import messages_hash
from studio.jobs import Runner
from studio.serving.client import SamplingParams
from studio.store import ImportedPrompt, Store, StoreError
from studio.task_sampler import TaskSampler
from studio.users import AuthError, User
from tests.helpers import make_users, seed_battles, seed_campaign, seed_easy_judgments

ROOT = Path(__file__).resolve().parents[1]


def seeded(data_dir: Path) -> svc.OfflineContext:
    """A studio's data with a labeling campaign c1, a battle campaign 'duel' (base vs other, one
    battle assigned to the expert 'exp'), policy -> other (a LoRA child of base), four users."""
    context = svc.OfflineContext(data_dir)
    store = context.store
    seed_campaign(store, prompts=3, n=2, overlap=1)
    seed_battles(store, "duel", [("base", "other", "one", "two")] * 2)
    store.write("UPDATE model_versions SET kind = 'lora', parent = 'base' WHERE name = 'other'")
    camp.set_alias(store, camp.POLICY, "other")
    make_users(store, ("ann", "annotator"), ("exp", "expert"), ("eng", "engineer"), ("adm", "admin"))
    arena.next_battle(store, "duel", "exp")
    return context


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[svc.OfflineContext]:
    context = seeded(tmp_path / "data")
    yield context
    context.close()


@pytest.fixture(scope="module")
def shared_ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[svc.OfflineContext]:
    """One seeded studio for the many role cases: a refused call changes nothing (each test
    checks), so they can share it; an admin's calls may change it, which those tests allow."""
    context = seeded(tmp_path_factory.mktemp("shared"))
    yield context
    context.close()


def battle_id(store: Store) -> str:
    return store.query("SELECT id FROM battles WHERE expert = 'exp'")[0]["id"]


# Realistic arguments for every action: if the capability check were missing, each of these
# would store or change something. A new action needs a line here (the test below says so).
ARGS: dict[str, Callable[[svc.OfflineContext, Path], tuple[Any, ...]]] = {
    "me": lambda c, t: (),
    "import_prompts": lambda c, t: (
        "evil-set",
        [ImportedPrompt("row 1", [{"role": "user", "content": "x"}], messages_hash([]))],
        "test",
    ),
    "import_records": lambda c, t: ("evil-set", svc.ImportSpec(records=[{"prompt": "x"}])),
    "import_file": lambda c, t: ("evil-set", ROOT / "data/prompts/starter.jsonl"),
    "list_prompt_sets": lambda c, t: (),
    "list_models": lambda c, t: (),
    "sample": lambda c, t: (svc.SampleSpec(prompt="hi"),),
    "add_adapter": lambda c, t: (svc.AdapterSpec("evil-adapter", str(t)),),
    "model_servers": lambda c, t: (),
    "lineage": lambda c, t: ("other",),
    "promote": lambda c, t: ("base", svc.PromoteSpec()),
    "rollback": lambda c, t: (camp.POLICY,),
    "model_card": lambda c, t: ("other",),
    "start_eval": lambda c, t: (svc.EvalSpec("other"),),
    "get_eval": lambda c, t: ("eval-x",),
    "list_evals": lambda c, t: (),
    "add_user": lambda c, t: (svc.UserSpec("mallory", "admin", "password123"),),
    "list_users": lambda c, t: (),
    "set_password": lambda c, t: ("ann", "another-password"),
    "new_token": lambda c, t: ("ann",),
    "create_campaign": lambda c, t: (svc.CampaignSpec("evil", "c1-set"),),
    "list_campaigns": lambda c, t: (),
    "get_campaign": lambda c, t: ("c1",),
    "set_guidelines": lambda c, t: ("c1", "be evil"),
    "sampler_overview": lambda c, t: (),
    "measure_serving": lambda c, t: (),
    "campaign_quality": lambda c, t: ("c1",),
    "next_task": lambda c, t: ("c1",),
    "begin_judgment": lambda c, t: (svc.JudgmentSpec("nope", ranks=[1, 2]),),
    "submit_judgment": lambda c, t: (svc.JudgmentSpec("nope", ranks=[1, 2]),),
    "skip": lambda c, t: ("nope",),
    "create_battle_campaign": lambda c, t: (
        svc.BattleCampaignSpec("evil-duel", "c1-set", ["base", "other"]),
    ),
    "next_battle": lambda c, t: ("duel",),
    "vote": lambda c, t: (svc.VoteSpec(battle_id(c.store), "a"),),
    "regenerate": lambda c, t: (battle_id(c.store),),
    "battle_stats": lambda c, t: ("duel",),
    "leaderboard": lambda c, t: (svc.LeaderboardSpec(),),
    "expert_quality": lambda c, t: (),
    "battle_log": lambda c, t: (),
    "recipes": lambda c, t: (),
    "advice": lambda c, t: (),
    "start_run": lambda c, t: (svc.RunSpec("dpo"),),
    "list_runs": lambda c, t: (),
    "get_run": lambda c, t: ("run-x",),
    "cancel_run": lambda c, t: ("run-x",),
    "export": lambda c, t: (t / "out.jsonl",),
    "export_download": lambda c, t: (),
    "backup": lambda c, t: (t / "backup.duckdb",),
    "backup_download": lambda c, t: (),
}

REFUSED = [
    (name, role)
    for name, action in sorted(svc.ACTIONS.items())
    for role in users.ROLES
    if role not in users.CAN[action.capability]
]


def state(store: Store) -> dict[str, list[str]]:
    """Every row of every table, as text: any change an action makes shows here."""
    tables = [r["name"] for r in store.query("SELECT table_name AS name FROM duckdb_tables()")]
    return {t: sorted(map(str, store.query(f"SELECT * FROM {t}"))) for t in tables}


def test_every_action_has_a_capability_and_a_case_here() -> None:
    assert set(svc.ACTIONS) == set(ARGS), "add the new action to ARGS (and check its capability)"
    for name, action in svc.ACTIONS.items():
        assert action.capability in users.CAN, name
    # every public function that takes the acting user is an action (checked), none slips through
    for name, fn in vars(svc).items():
        if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == svc.__name__:
            params = list(inspect.signature(fn).parameters)
            if params[:2] == ["ctx", "user"] and name not in svc.PUBLIC:
                assert name in svc.ACTIONS, f"{name} takes a user but checks no capability"


@pytest.mark.parametrize(("name", "role"), REFUSED, ids=[f"{n}-{r}" for n, r in REFUSED])
def test_an_action_refuses_a_role_without_its_capability_before_doing_anything(
    shared_ctx: svc.OfflineContext, tmp_path: Path, name: str, role: str
) -> None:
    ctx = shared_ctx
    args = ARGS[name](ctx, tmp_path)
    before = state(ctx.store)
    with pytest.raises(AuthError, match=f"user 'someone' \\({role}\\) may not"):
        svc.ACTIONS[name](ctx, User("someone", role), *args)
    assert state(ctx.store) == before
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "backup.duckdb").exists()


@pytest.mark.parametrize("name", sorted(ARGS))
def test_an_admin_gets_past_the_check_with_the_same_arguments(
    shared_ctx: svc.OfflineContext, tmp_path: Path, name: str
) -> None:
    ctx = shared_ctx
    # proof that the arguments above reach the work: an admin is refused by nothing but the input
    try:
        svc.ACTIONS[name](ctx, User("adm", "admin"), *ARGS[name](ctx, tmp_path))
    except AuthError:
        pytest.fail(f"{name} refused an admin")
    except (StoreError, svc.NeedsStudio, ValueError):
        pass  # this studio is offline, some inputs are wrong on purpose: past the check is enough


def test_no_user_is_refused(shared_ctx: svc.OfflineContext) -> None:
    with pytest.raises(AuthError, match="not logged in"):
        svc.list_campaigns(shared_ctx, None)


def test_label_and_battle_actions_for_the_roles_that_have_them(ctx: svc.OfflineContext) -> None:
    ann = User("ann", "annotator")
    got = svc.next_task(ctx, ann, "c1")
    assert got["task"]["campaign"] == "c1" and got["progress"]["done"] == 0
    answer = svc.submit_judgment(ctx, ann, svc.JudgmentSpec(got["task"]["assignment_id"], ranks=[1, 2]))
    assert answer["judgment"]["annotator"] == "ann"
    assert answer["next"]["task"]["assignment_id"] != got["task"]["assignment_id"]
    assert answer["next"]["progress"]["done"] == 1
    quiet = svc.submit_judgment(
        ctx, ann, svc.JudgmentSpec(answer["next"]["task"]["assignment_id"], ranks=[2, 1], next=False)
    )
    assert "next" not in quiet
    # the loop-friendly form checks the in-memory user first, too
    with pytest.raises(AuthError):
        svc.begin_judgment(ctx, User("ann", "nobody-role-" + "x"), svc.JudgmentSpec("a"))

    exp = User("exp", "expert")
    reveal = svc.vote(ctx, exp, svc.VoteSpec(battle_id(ctx.store), "b", rationale="clearer"))["reveal"]
    assert {reveal["a"], reveal["b"]} == {"base", "other"}


def test_actions_wake_the_workers_they_concern(tmp_path: Path) -> None:
    with svc.OfflineContext(tmp_path) as ctx:
        store = ctx.store
        seed_easy_judgments(store, n=4)
        ctx.task_sampler = TaskSampler(store, None)  # built, not started: a poke only marks it
        ctx.runner = Runner(store, tmp_path, register=lambda *a: "")
        adm = User("adm", "admin")
        svc.create_campaign(ctx, adm, svc.CampaignSpec("fresh", "easy-set"))
        assert ctx.task_sampler._wake.is_set()
        got = svc.next_task(ctx, adm, "fresh")  # nothing sampled yet: the sampler hears it is starved
        assert got["task"] is None and "fresh" in ctx.task_sampler._starved
        run = svc.start_run(ctx, User("eng", "engineer"), svc.RunSpec("dpo", campaigns=["easy"]))
        assert run["status"] == "queued" and ctx.runner._wake.is_set()
        cancelled = svc.cancel_run(ctx, User("eng", "engineer"), run["id"])
        assert cancelled["status"] == "cancelled" and cancelled["reason"] == "cancelled by eng"
        ctx.task_sampler.stop()


def test_offline_actions_that_need_the_running_studio_say_how_to_start_it(ctx: svc.OfflineContext) -> None:
    adm = User("adm", "admin")
    for call in (
        lambda: svc.sample(ctx, adm, svc.SampleSpec(prompt="hi")),
        lambda: svc.cancel_run(ctx, adm, "run-x"),
        lambda: svc.add_adapter(ctx, adm, svc.AdapterSpec("a", "/nowhere")),
    ):
        with pytest.raises(svc.NeedsStudio, match="start one with `studio serve`"):
            call()
    # an input error is still told first: nothing to start a studio for
    with pytest.raises(StoreError, match="model version 'ghost' is not registered"):
        svc.sample(ctx, adm, svc.SampleSpec(prompt="hi", model="ghost"))


def test_rollback_moves_the_alias_to_the_parent_and_says_when_there_is_none(ctx: svc.OfflineContext) -> None:
    eng = User("eng", "engineer")
    done = svc.rollback(ctx, eng)
    assert {k: done[k] for k in ("alias", "version", "previous")} == {
        "alias": "policy",
        "version": "base",
        "previous": "other",
    }
    assert camp.aliases(ctx.store)["policy"] == "base"
    # recorded like a promotion: who, from where, to where
    (row,) = ctx.store.query("SELECT * FROM promotions WHERE id = ?", [done["record"]])
    assert (row["action"], row["alias"], row["version"], row["from_version"], row["decided_by"]) == (
        "rollback",
        "policy",
        "base",
        "other",
        "eng",
    )
    with pytest.raises(StoreError, match="policy is at 'base', which has no parent to roll back to"):
        svc.rollback(ctx, eng)
    with pytest.raises(StoreError, match="alias 'ghost' does not exist"):
        svc.rollback(ctx, eng, "ghost")


def test_leaderboard_style_is_chosen_once_and_works_without_votes(ctx: svc.OfflineContext) -> None:
    ann = User("ann", "annotator")
    board = svc.leaderboard(ctx, ann, svc.LeaderboardSpec(campaign="duel", style="length"))
    assert board["rows"] == [] and board["votes"] == 0 and board["verdict"] is None
    with pytest.raises(StoreError, match="style=width: the only style control is 'length'"):
        svc.leaderboard(ctx, ann, svc.LeaderboardSpec(style="width"))


def test_parse_overrides() -> None:
    assert svc.parse_overrides(["train.beta=0.2", "", " lora = true ", "x=[1, 2]"]) == {
        "train.beta": 0.2,
        "lora": True,
        "x": [1, 2],
    }
    with pytest.raises(StoreError, match="--set beta: write recipe overrides as KEY=VALUE"):
        svc.parse_overrides(["beta"])
    with pytest.raises(StoreError, match="override =1: write recipe overrides"):
        svc.parse_overrides(["=1"], where="override")


def defaults_of(fn: Callable[..., Any]) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize(
    ("spec", "domain"),
    [
        (svc.CampaignSpec, camp.create_campaign),
        (svc.BattleCampaignSpec, arena.create_battle_campaign),
        (svc.RunSpec, training.submit_run),
        (svc.EvalSpec, engine.start_eval),
    ],
    ids=["campaign", "battle", "run", "eval"],
)
def test_spec_defaults_are_the_domain_functions_defaults(spec: type, domain: Callable[..., Any]) -> None:
    # the domain functions keep defaults for internal callers (tests, the re-battle after a
    # run); they must never say something else than the spec the doors use
    ours, theirs = svc.spec_defaults(spec), defaults_of(domain)
    shared = set(ours) & set(theirs)
    assert shared and {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


def test_sampling_defaults_come_from_sampling_params() -> None:
    base = SamplingParams()
    for spec in (svc.SampleSpec, svc.CampaignSpec, svc.BattleCampaignSpec):
        d = svc.spec_defaults(spec)
        assert d["top_p"] == base.top_p and d["max_tokens"] == base.max_tokens
    assert svc.spec_defaults(svc.SampleSpec)["temperature"] == base.temperature
    assert svc.CampaignSpec.overlap == 1  # the Admin tab's 2 became 1 with the spec (issue 10)


# -- the doors -------------------------------------------------------------------------------
DOORS = ["studio/api.py", "studio/cli.py", "studio/client.py"]
# The UI joins this list once its handlers call the services (issue 10, item 3).
SPEC_FIELDS = {
    f
    for spec in (svc.CampaignSpec, svc.BattleCampaignSpec, svc.SampleSpec, svc.RunSpec, svc.EvalSpec)
    for f in svc.spec_defaults(spec)
} | {"task_timeout", "rounds", "min_battles"}


@pytest.mark.parametrize("door", DOORS)
def test_no_door_checks_a_role(door: str) -> None:
    text = (ROOT / door).read_text()
    for needle in (".require(", ".can(", "CAN[", "users.CAN", "@requires"):
        assert needle not in text, f"{door} checks a role ({needle}): the service does"


@pytest.mark.parametrize("door", DOORS)
def test_no_door_restates_a_default(door: str) -> None:
    tree = ast.parse((ROOT / door).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            assert "BaseModel" not in bases, f"{door}: {node.name} restates a spec as a pydantic model"
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        assert called not in ("Field", "pydantic.Field"), f"{door}: line {node.lineno} declares a field"
        for kw in node.keywords:
            literal = isinstance(kw.value, ast.Constant) and type(kw.value.value) in (int, float)
            if called.endswith("add_argument") and kw.arg == "default":
                assert not literal, f"{door} line {node.lineno}: a number as a flag's default"
            assert not (kw.arg in SPEC_FIELDS and literal), f"{door} line {node.lineno}: {kw.arg}="
