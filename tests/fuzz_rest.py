"""Fuzzers for the bodies of the main REST routes, shared by tests/test_fuzz_rest.py and
benchmarks/reliability.py (which counts the 5xx answers they get).

Each fuzzer sends hypothesis-made bodies (text with lone surrogates and every code point, wrong
types, huge and non-finite numbers, nested JSON) to one route of a real studio over HTTP and
records, through a `Recorder`, what must hold:

- bad input gets a 4xx whose detail names what is wrong (pydantic's names the field; ours the
  input), never a 5xx (a 503 only where the action needs the model server this studio lacks)
  and never a traceback;
- nothing is stored half-way: a refused request leaves the tables the route writes unchanged
  (and a judgment's assignment open);
- what is accepted is stored as sent, and comes back out of an export unchanged.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studio import arena, labeling
from studio import campaigns as camp
from studio.store import Store, new_id
from studio.textcheck import unencodable
from tests.helpers import make_users, seed_battles, seed_campaign

# text as an attacker sends it: any code point, lone surrogates included, and nasty shapes
any_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=30),
    st.text(
        alphabet=st.sampled_from(["a", " ", "\ud800", "\udfff", "\U0001f600", "\x00", "<", "'"]), max_size=10
    ),
    st.sampled_from(
        ["../../evil", "<script>x</script>", "a'; DROP TABLE t; --", "\ud800", "x" * 5000, " ", ""]
    ),
)
numbers = st.one_of(
    st.integers(-5, 100),
    st.integers(),
    st.sampled_from([2**31, 2**63, 2**70, -(2**70)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_leaf = st.one_of(st.none(), st.booleans(), numbers, any_text)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def or_fuzz(valid: Any) -> Any:
    """Sometimes a valid value (so that bodies also get accepted), sometimes anything."""
    return st.one_of(valid, numbers, json_leaf)


valid_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    str.strip
)
word = st.text(alphabet="abcdefghij -", min_size=1, max_size=12).filter(str.strip)
names = st.one_of(st.uuids().map(lambda u: f"fz-{u.hex[:12]}"), any_text)
FLAG_NAMES = (*labeling.FLAGS, "evil")
STAGES = ("dpo", "reward", "ppo", "sft", "ppo_then_dpo")
WINNERS = ("a", "b", "tie", "both_bad")

ANNOTATORS = ("fz-ann1", "fz-ann2", "fz-ann3")
EXPERT, ENGINEER, ADMIN = "fz-exp", "fz-eng", "fz-adm"
LABEL, DUEL = "fz-label", "fz-arena"


def prepare(store: Store) -> dict[str, str]:
    """A labeling campaign with many tasks, a three-version battle campaign (no stopping rule)
    with many battles, and the users the fuzzers act as. Returns their tokens."""
    tokens = make_users(
        store,
        *((a, "annotator") for a in ANNOTATORS),
        (EXPERT, "expert"),
        (ENGINEER, "engineer"),
        (ADMIN, "admin"),
    )
    seed_campaign(store, LABEL, prompts=120, n=3, overlap=len(ANNOTATORS))
    seed_battles(
        store,
        DUEL,
        [("base", "other", f"one {i}", f"two {i}") for i in range(300)],
        ("base", "other", "third"),
    )
    return tokens


@dataclass
class Recorder:
    """What the fuzzers saw: every status, and every broken promise (with the body that broke it).
    `strict`: raise at once (in tests, so that hypothesis shrinks the example)."""

    strict: bool = True
    statuses: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    server_errors: int = 0  # 5xx answers, but for the 503 of an action needing the model server

    def problem(self, text: str) -> None:
        self.problems.append(text)
        if self.strict:
            raise AssertionError(text)

    def check(
        self, route: str, body: Any, resp: httpx.Response, changed: bool, down_ok: bool = False
    ) -> bool:
        """Record one answer; True when it accepted the body."""
        self.statuses[resp.status_code] += 1
        shown = json.dumps(body)[:300] if not isinstance(body, str) else body[:300]
        if "Traceback" in resp.text:
            self.problem(f"{route}: a traceback in the answer to {shown}")
        status = resp.status_code
        if status >= 500 and not (down_ok and status == 503 and "model server" in resp.text):
            self.server_errors += 1
            self.problem(f"{route}: {status} {resp.text[:200]} for {shown}")
            return False
        if 400 <= status < 500:
            detail = (
                resp.json().get("detail")
                if resp.headers.get("content-type", "").startswith("application/json")
                else None
            )
            if not detail or "codec can't" in str(detail):
                self.problem(f"{route}: {status} without a detail naming the input ({detail}), for {shown}")
            if changed:
                self.problem(f"{route}: refused ({status}) but something was stored, for {shown}")
            return False
        return status == 200


@dataclass
class Env:
    """A running studio (its URL and store) and the fuzzers' tokens."""

    url: str
    store: Store
    tokens: dict[str, str]
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=120))

    def call(self, who: str, method: str, route: str, body: Any = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        if body is not None:
            # ensure_ascii: a lone surrogate travels as its '\ud800' escape, as an attacker sends it;
            # NaN and Infinity as Python writes them (Starlette's JSON reader takes them)
            kw["content"] = json.dumps(body)
            headers["Content-Type"] = "application/json"
        return self.client.request(method, f"{self.url}/api/v1{route}", headers=headers, **kw)

    def counts(self, *tables: str) -> tuple[int, ...]:
        return tuple(self.store.count(t) for t in tables)


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


def body_of(valid: dict[str, Any], fuzz: dict[str, Any], required: tuple[str, ...] = ()) -> Any:
    """A body: the route's shape with valid values (some fields left out), the shape with any
    values, or any JSON at all. `valid` and `fuzz` map each field to its strategy; `required`
    fields are always sent."""

    def shape(fields: dict[str, Any]) -> Any:
        return st.fixed_dictionaries(
            {k: v for k, v in fields.items() if k in required},
            optional={k: v for k, v in fields.items() if k not in required},
        )

    return st.one_of(
        shape(valid), shape({k: st.one_of(valid[k], fuzz.get(k, json_value)) for k in valid}), json_value
    )


# -- the fuzzers: each runs `examples` bodies against one route --------------------------------
def fuzz_campaigns(env: Env, rec: Recorder, examples: int) -> None:
    body = body_of(
        {
            "name": st.uuids().map(lambda u: f"fz-{u.hex[:12]}"),
            "prompt_set": st.just(f"{LABEL}-set"),
            "model": st.sampled_from(["policy", "base", "other"]),
            "n": st.integers(2, 8),
            "overlap": st.integers(1, 50),
            "temperature": st.floats(0, 5),
            "top_p": st.floats(0.01, 1),
            "max_tokens": st.integers(1, 512),
            "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
            "task_timeout_s": st.integers(30, 7 * 24 * 3600),
            "guidelines": valid_text,
        },
        {"name": names, "prompt_set": any_text, "model": any_text, "guidelines": any_text},
        required=("name", "prompt_set"),
    )

    @fuzz_settings(examples)
    @given(body=body)
    def run(body: Any) -> None:
        before = env.counts("campaigns")
        resp = env.call(ADMIN, "POST", "/campaigns", body)
        if rec.check("POST /campaigns", body, resp, env.counts("campaigns") != before):
            assert env.counts("campaigns") == (before[0] + 1,)
            stored = camp.get_campaign(env.store, body["name"])
            assert stored["guidelines"] == body.get("guidelines", "") and stored["kind"] == "label"

    run()


def fuzz_battle_campaigns(env: Env, rec: Recorder, examples: int) -> None:
    body = body_of(
        {
            "name": st.uuids().map(lambda u: f"fz-{u.hex[:12]}"),
            "prompt_set": st.just(f"{LABEL}-set"),
            "versions": st.lists(
                st.sampled_from(["base", "other", "third", "policy"]), min_size=2, max_size=4
            ),
            "budget": st.integers(1, 500),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.01, 1),
            "max_tokens": st.integers(1, 512),
            "both_bad_as_tie": st.booleans(),
            "leak_words": st.one_of(st.none(), st.lists(word, max_size=4)),
            "criteria": st.one_of(st.none(), st.lists(word, max_size=4, unique_by=str.strip)),
        },
        {
            "name": names,
            "prompt_set": any_text,
            "versions": st.one_of(st.lists(any_text, max_size=3), json_value),
            "leak_words": st.one_of(st.lists(any_text, max_size=4), json_value),
            "criteria": st.one_of(st.lists(any_text, max_size=4), json_value),
        },
        required=("name", "prompt_set", "versions"),
    )

    @fuzz_settings(examples)
    @given(body=body)
    def run(body: Any) -> None:
        tables = ("campaigns", "battle_campaigns")
        before = env.counts(*tables)
        resp = env.call(ADMIN, "POST", "/arena/campaigns", body)
        after = env.counts(*tables)
        if rec.check("POST /arena/campaigns", body, resp, after != before):
            assert after == (before[0] + 1, before[1] + 1)  # both rows, or neither
            made = arena.battle_campaign(env.store, body["name"])
            assert made["criteria"] == [c.strip() for c in body.get("criteria") or []]

    run()


def fuzz_sample(env: Env, rec: Recorder, examples: int) -> None:
    message = st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), any_text), "content": json_leaf}
    )
    valid = {
        "prompt": valid_text,
        "n": st.integers(1, 8),
        "temperature": st.floats(0, 5),
        "top_p": st.floats(0.01, 1),
        "max_tokens": st.integers(1, 512),
        "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
        "model": st.one_of(st.none(), st.sampled_from(["base", "policy"])),
    }
    body = st.one_of(
        body_of(valid, {"prompt": st.one_of(any_text, json_value), "model": any_text}, required=("prompt",)),
        st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), json_value)}),
    )

    @fuzz_settings(examples)
    @given(body=body)
    def run(body: Any) -> None:
        before = env.counts("generations")
        resp = env.call(ENGINEER, "POST", "/sample", body)
        # this studio has no model server: a valid request reaches that (503), a bad one is a 4xx
        rec.check("POST /sample", body, resp, env.counts("generations") != before, down_ok=True)

    run()


def fuzz_runs(env: Env, rec: Recorder, examples: int) -> None:
    body = body_of(
        {
            "stage": st.sampled_from(STAGES),
            "parent": st.sampled_from(["policy", "base"]),
            "campaigns": st.one_of(st.none(), st.just([LABEL])),
            "held_out": st.one_of(st.none(), st.floats(0, 0.5)),
            "recipe": st.none(),
            "steps": st.one_of(st.none(), st.integers(1, 10)),
            "overrides": st.one_of(st.none(), st.just({"train.beta": 0.2})),
            "reward_model": st.none(),
            "annotators": st.one_of(st.none(), st.just(list(ANNOTATORS))),
            "min_strength": st.one_of(st.none(), st.integers(1, 3)),
        },
        {
            "stage": any_text,
            "parent": any_text,
            "recipe": st.one_of(st.sampled_from(STAGES), any_text),
            "overrides": st.one_of(
                st.dictionaries(
                    st.one_of(st.sampled_from(["train.beta", "lora.r", "held_out"]), any_text),
                    json_leaf,
                    max_size=3,
                ),
                json_value,
            ),
            "reward_model": any_text,
        },
        required=("stage",),
    )

    @fuzz_settings(examples)
    @given(body=body)
    def run(body: Any) -> None:
        tables = ("runs", "snapshots", "snapshot_judgments")
        before = env.counts(*tables)
        resp = env.call(ENGINEER, "POST", "/runs", body)
        after = env.counts(*tables)
        if rec.check("POST /runs", body, resp, after[0] != before[0]):
            assert after[0] == before[0] + 1

    run()


def fuzz_judgments(
    env: Env, rec: Recorder, examples: int, accepted: list[dict[str, Any]] | None = None
) -> None:
    """Judgments on real assignments (and on made-up ids): rankings, quick mode, flags, edits."""
    positions = st.integers(0, 2)
    body = body_of(
        {
            "assignment_id": st.just("ASSIGNMENT"),
            "ranks": st.one_of(
                st.permutations([1, 2, 3]), st.lists(st.integers(1, 3), min_size=3, max_size=3)
            ),
            "best": positions,
            "worst": positions,
            "all_bad": st.booleans(),
            "strength": st.integers(1, 3),
            "flags": st.dictionaries(
                positions, st.lists(st.sampled_from(labeling.FLAGS), max_size=2), max_size=3
            ),
            "rationale": st.one_of(st.none(), valid_text),
            "edited_text": st.one_of(st.none(), valid_text),
            "idempotency_key": st.one_of(st.none(), st.uuids().map(lambda u: u.hex)),
            "shown_at": st.one_of(st.none(), st.floats(1.6e9, 1.9e9)),
            "next": st.booleans(),
        },
        {
            "assignment_id": any_text,
            "ranks": st.one_of(st.lists(st.one_of(st.integers(-2, 5), json_leaf), max_size=5), json_value),
            "flags": st.one_of(
                st.dictionaries(
                    st.one_of(st.integers(-1, 4), any_text),
                    st.lists(st.one_of(st.sampled_from(FLAG_NAMES), any_text), max_size=3),
                    max_size=3,
                ),
                json_value,
            ),
            "rationale": any_text,
            "edited_text": any_text,
            "idempotency_key": any_text,
        },
        required=("assignment_id",),
    )

    @fuzz_settings(examples)
    @given(who=st.sampled_from(ANNOTATORS), body=body)
    def run(who: str, body: Any) -> None:
        task = env.call(who, "POST", f"/campaigns/{LABEL}/next").json()["task"]
        if task is None:
            return  # this annotator has judged every task
        if isinstance(body, dict) and body.get("assignment_id") == "ASSIGNMENT":
            body = {**body, "assignment_id": task["assignment_id"]}
        before = env.counts("judgments")
        resp = env.call(who, "POST", "/judgments", body)
        changed = env.counts("judgments") != before
        if rec.check("POST /judgments", body, resp, changed):
            row = env.store.query("SELECT * FROM judgments WHERE id = ?", [resp.json()["judgment"]["id"]])[0]
            assert row["rationale"] == ((body.get("rationale") or "").strip() or None)
            if accepted is not None:
                accepted.append({"who": who, "task_id": row["task_id"], "body": body})
        else:  # refused: the task is still this annotator's, open
            again = env.call(who, "POST", f"/campaigns/{LABEL}/next").json()["task"]
            if again is None or again["assignment_id"] != task["assignment_id"]:
                rec.problem(
                    f"POST /judgments: a refused judgment closed its assignment: {json.dumps(body)[:300]}"
                )

    run()


def fuzz_votes(env: Env, rec: Recorder, examples: int) -> None:
    score = st.fixed_dictionaries({"a": st.integers(1, 5), "b": st.integers(1, 5)})
    body = body_of(
        {
            "battle_id": st.just("BATTLE"),
            "winner": st.sampled_from(WINNERS),
            "scores": st.one_of(st.none(), st.fixed_dictionaries({"helpful": score})),
            "rationale": st.one_of(st.none(), valid_text),
            "idempotency_key": st.one_of(st.none(), st.uuids().map(lambda u: u.hex)),
            "duration_ms": st.one_of(st.none(), st.floats(0, 1e6)),
        },
        {
            "battle_id": any_text,
            "winner": any_text,
            "scores": st.one_of(
                st.dictionaries(
                    st.one_of(st.just("helpful"), any_text),
                    st.one_of(st.fixed_dictionaries({"a": numbers, "b": json_leaf}), json_value),
                    max_size=2,
                ),
                json_value,
            ),
            "rationale": any_text,
            "idempotency_key": any_text,
        },
        required=("battle_id", "winner"),
    )

    @fuzz_settings(examples)
    @given(body=body)
    def run(body: Any) -> None:
        battle = env.call(EXPERT, "POST", f"/arena/{DUEL}/next").json()["battle"]
        if battle is None:
            return
        if isinstance(body, dict) and body.get("battle_id") == "BATTLE":
            body = {**body, "battle_id": battle["battle_id"]}
        before = env.counts("votes")
        resp = env.call(EXPERT, "POST", "/arena/votes", body)
        if rec.check("POST /arena/votes", body, resp, env.counts("votes") != before):
            assert set(resp.json()["reveal"]) >= {"a", "b", "winner"}

    run()


FUZZERS = {
    "campaigns": fuzz_campaigns,
    "battle_campaigns": fuzz_battle_campaigns,
    "sample": fuzz_sample,
    "runs": fuzz_runs,
    "judgments": fuzz_judgments,
    "votes": fuzz_votes,
}


# -- round trips ------------------------------------------------------------------------------------
def tasks_for(store: Store, campaign: str, set_name: str, texts: list[str]) -> None:
    """A paused labeling campaign over an imported set, with one task of two made-up answers per
    prompt (as the sampler would store them), then opened."""
    camp.create_campaign(store, campaign, prompt_set=set_name, n=2, overlap=1, status="paused")
    for p in store.prompts(set_name):
        request_id = new_id()
        rows = [
            {
                "id": new_id(),
                "request_id": request_id,
                "choice_index": c,
                "prompt_id": p["id"],
                "messages": p["messages"],
                "model_version": "base",
                "text": texts[c],
                "finish_reason": "stop",
                "prompt_tokens": 3,
                "completion_tokens": 3,
                "latency_ms": 1.0,
                "temperature": 0.8,
                "top_p": 0.95,
                "max_tokens": 16,
                "seed": None,
                "sampling": {"n": 2},
            }
            for c in range(2)
        ]
        store.add_generations(rows)
        labeling.add_task(store, campaign, p["id"], "base", [r["id"] for r in rows])
    camp.set_status(store, campaign, "active")


valid_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    str.strip
)


def round_trip(env: Env, rec: Recorder, examples: int) -> None:
    """Import prompts over REST, judge their tasks over REST, export the judgments: the prompts,
    answers, rationales and edits come back as they went in."""

    @fuzz_settings(examples)
    @given(
        prompts=st.lists(valid_text, min_size=1, max_size=3, unique_by=str.strip),
        answers=st.lists(valid_text, min_size=2, max_size=2),
        rationale=st.one_of(st.none(), valid_text),
        edit=st.one_of(st.none(), valid_text),
    )
    def run(prompts: list[str], answers: list[str], rationale: str | None, edit: str | None) -> None:
        tag = uuid.uuid4().hex[:10]
        imported = env.call(
            ADMIN, "POST", f"/prompt-sets/rt-{tag}/prompts", {"records": [{"prompt": p} for p in prompts]}
        )
        if not rec.check("POST /prompt-sets/{name}/prompts", prompts, imported, False):
            return
        tasks_for(env.store, f"rt-{tag}", f"rt-{tag}", answers)
        sent = {}
        while (task := env.call(ADMIN, "POST", f"/campaigns/rt-{tag}/next").json()["task"]) is not None:
            body = {
                "assignment_id": task["assignment_id"],
                "ranks": [2, 1],
                "rationale": rationale,
                "edited_text": edit,
                "next": False,
            }
            resp = env.call(ADMIN, "POST", "/judgments", body)
            assert rec.check("POST /judgments", body, resp, False), resp.text
            sent[resp.json()["judgment"]["id"]] = task
        exported = env.call(
            ADMIN, "GET", "/export", params={"kind": "judgments", "format": "jsonl", "campaign": f"rt-{tag}"}
        )
        rows = {r["judgment_id"]: r for r in map(json.loads, filter(None, exported.text.split("\n")))}
        assert set(rows) == set(sent)
        for judgment_id, task in sent.items():
            row = rows[judgment_id]
            assert row["prompt"] == task["prompt"] and row["prompt"][-1]["content"] in prompts
            assert sorted(row["completions"]) == sorted(answers)
            assert row["rationale"] == (rationale.strip() if rationale else None)
            assert row["edited_text"] == (edit.strip() if edit else None)
        assert sorted(p["messages"][-1]["content"] for p in env.store.prompts(f"rt-{tag}")) == sorted(prompts)

    run()


def imported_records(env: Env, rec: Recorder, examples: int) -> None:
    """REST import of any records: all stored or none."""
    record = st.one_of(
        st.fixed_dictionaries({"prompt": valid_text}, optional={"id": st.uuids().map(str), "meta": word}),
        st.fixed_dictionaries(
            {"prompt": st.one_of(any_text, json_leaf)}, optional={"id": json_leaf, "meta": json_value}
        ),
        st.dictionaries(st.text(max_size=8), json_value, max_size=3),
        json_leaf,
    )
    body = st.one_of(
        st.fixed_dictionaries(
            {"records": st.lists(record, min_size=1, max_size=4)}, optional={"source": any_text}
        ),
        json_value,
    )

    path_name = any_text.filter(lambda t: unencodable(t) is None and t not in ("", ".", ".."))

    @fuzz_settings(examples)
    @given(body=body, name=st.one_of(st.uuids().map(lambda u: f"imp-{u.hex[:10]}"), path_name))
    def run(body: Any, name: str) -> None:
        before = env.counts("prompts", "prompt_sets")
        resp = env.call(ADMIN, "POST", f"/prompt-sets/{quote(name, safe='')}/prompts", body)
        rec.check(
            "POST /prompt-sets/{name}/prompts", body, resp, env.counts("prompts", "prompt_sets") != before
        )

    run()


FUZZERS["import"] = imported_records
