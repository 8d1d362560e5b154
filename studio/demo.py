"""`studio demo`: the whole loop, from a fresh data directory, driven by scripted people.

One command runs what a team would do over days, through the same service functions the REST
API, the UI and the CLI call (studio/services.py):

1. import: an engineer imports the demo prompt set (data/prompts/demo.jsonl) as two sets, the
   training prompts and the held-out prompts (its `split` column says which);
2. sample on policy: an admin opens a labeling campaign (n answers per prompt, overlap k = 2)
   and the studio's background task sampler fills it from the served base model;
3. label: scripted annotators rank each task by the preference (ties where it cannot tell the
   answers apart), flag the odd refusal or identity leak, and now and then swap two answers
   (label noise, so agreement is not perfect);
4. train: an engineer trains a reward model, then the `ppo_then_dpo` pipeline (PPO against that
   reward model, DPO on the same judgments over the PPO version);
5. hot-load: the runner serves each new version from the running vLLM; the demo asks each one;
6. evaluate each version against its parent (`services.start_eval` on the gate's four guard
   suites, the door behind `studio eval`; complete suites in the full run, so the gate reads
   them, `DemoConfig.eval_limit` items each in the quick one);
7. blind re-battle on the held-out prompts: each run fixes its re-battle when it is submitted
   (`eval_prompt_set`: the held-out set) and opens it against the parent as the version lands;
   a scripted expert votes by the same preference (with a little noise) until the
   always-valid stopping rule decides. The DPO version also meets base, in a campaign the demo
   opens, for the table's win rate against base;
8. gate, then promotion: studio/promotion.py decides by itself once a version's evaluation and
   re-battle verdict are in (data/gate.yaml); a version that passes becomes `policy`. The demo
   only reads the version cards (`services.model_card`).

The table at the end has one row for base and one per version.

The preferences (`PREFERENCES`) are programmatic, so the whole run is reproducible and its
result can be checked: each says what it rewards and how its property is measured.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict, dataclass, field
from itertools import combinations, pairwise
from pathlib import Path
from typing import IO, Any

from studio import services as svc
from studio.training import FEW_PAIRS
from studio.users import User

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_FILE = ROOT / "data" / "prompts" / "demo.jsonl"
RECIPES_DIR = ROOT / "data" / "recipes" / "demo"
TRAIN_SET, HELDOUT_SET = "demo", "demo-heldout"
LABEL_CAMPAIGN = "demo-label"
# The gate's guards (data/gate.yaml) read these four suites; the others are informational.
GATE_SUITES = ["refusal", "capability", "factual", "consistency"]
ANNOTATORS = ("annotator-1", "annotator-2", "annotator-3")
ENGINEER, EXPERT = "engineer", "expert"


# ------------------------------------------------------------------ preferences


@dataclass(frozen=True)
class Preference:
    """A scripted preference: what the annotators and the expert reward.

    `score(text)`: higher is preferred; equal scores are a tie. `has(text)`: the property whose
    rate on held-out prompts the demo reports (the share of sampled answers that have it).
    """

    name: str
    rewards: str
    measure: str
    score: Callable[[str], float]
    has: Callable[[str], bool]


_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022+]|\d{1,2}[.)])\s+\S", re.MULTILINE)
_TRAILING = " \t\n\"'\u201d\u2019)]*_"
CONCISE_WORDS = 30


def words(text: str) -> int:
    return len(text.split())


def ends_with_question(text: str) -> bool:
    """The answer's last sentence is a question (closing quotes, brackets and markup ignored)."""
    return text.rstrip(_TRAILING).endswith("?")


_YOU = re.compile(r"\b(?:you|your|yours|yourself|yourselves)\b", re.IGNORECASE)


def speaks_to_reader(text: str) -> bool:
    """The answer addresses the reader: "you", "your", "yours", "yourself" as whole words."""
    return _YOU.search(text) is not None


def reader_words(text: str) -> int:
    """How often the answer addresses the reader (you, your, ... as whole words)."""
    return len(_YOU.findall(text))


def has_list(text: str) -> bool:
    """Any line that starts a bullet (-, *, +, •) or a numbered item (1. or 1))."""
    return _LIST_LINE.search(text) is not None


PREFERENCES: dict[str, Preference] = {
    p.name: p
    for p in (
        Preference(
            "concise",
            "shorter answers: of two answers the one with fewer words wins, counted in 4-word "
            "buckets (0-3, 4-7, ...; the same bucket: a tie)",
            f"share of answers of at most {CONCISE_WORDS} words",
            lambda t: -(words(t) // 4),
            lambda t: words(t) <= CONCISE_WORDS,
        ),
        Preference(
            "question",
            "answers that end by asking the user a question (the last sentence ends with '?'); "
            "two answers that both do, or both do not, are a tie",
            "share of answers whose last sentence is a question",
            lambda t: float(ends_with_question(t)),
            ends_with_question,
        ),
        # Graded, not present-or-absent: whether an answer says "you" at all depends mostly on
        # the prompt, so the packaged model's four answers to a prompt agree on it in 56 of 96
        # labeling tasks, and 9 blind pairs in 10 of full run 5's 128-token battle answers. Counting
        # doubles the decisive labeling pairs (136 -> 308 of 576 pairs of base answers) and makes
        # most battles decisive (docs/demo.md). No cap: one at 3 tied the 128-token battle
        # answers, where half of those with "you" say it 5 times or more.
        Preference(
            "second_person",
            "answers that speak to the user: the one that addresses the reader as 'you' (you, "
            "your, yourself) more often wins; two answers with the same count are a tie",
            "share of answers that address the reader as 'you'",
            lambda t: float(reader_words(t)),
            speaks_to_reader,
        ),
        Preference(
            "no_lists",
            "answers in prose: an answer with no bullet or numbered list beats one with a list; "
            "two answers alike in that are a tie",
            "share of answers without a bullet or numbered list",
            lambda t: float(not has_list(t)),
            lambda t: not has_list(t),
        ),
    )
}
# The packaged model's answers have it about half the time (45% of quick run 3's base answers,
# against 87% for no_lists and 2% for question), so half the pairs it judges are decisive: the
# most signal per prompt and per blind vote of the non-length preferences (docs/demo.md).
DEFAULT_PREFERENCE = "second_person"


def preference(name: str) -> Preference:
    if name not in PREFERENCES:
        raise ValueError(f"--preference {name}: unknown; use one of {', '.join(PREFERENCES)}")
    return PREFERENCES[name]


# ------------------------------------------------------------------ the scripted people


def ranks_by(scores: list[float]) -> list[int]:
    """Dense ranks, 1 = best; equal scores share a rank (a tie)."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) + 1 for s in scores]


def annotate(
    pref: Preference, completions: list[dict[str, Any]], rng: random.Random, noise: float
) -> svc.JudgmentSpec | None:
    """One scripted judgment of a task's completions (in the order shown; the caller sets the
    assignment id), or None for a skip. With probability `noise` two answers of different rank swap
    places (a slip). Flags: an unhelpful refusal or an identity leak where the text shows one.
    Strength: 2 (clear) for a ranking that separates the answers, 1 for a slip. A full tie is
    sent as 'all bad' when no answer has the property, and skipped (None) when every one has it:
    a person calls such answers neither better nor bad, and the studio takes no ranking that ties
    every answer.
    """
    from studio.arena import DEFAULT_LEAK_WORDS, find_leak
    from studio.evals.scorers import is_refusal

    texts = [c["text"] for c in completions]
    ranks = ranks_by([pref.score(t) for t in texts])
    slipped = False
    if rng.random() < noise:
        pairs = [(i, j) for i, j in combinations(range(len(ranks)), 2) if ranks[i] != ranks[j]]
        if pairs:
            i, j = rng.choice(pairs)
            ranks[i], ranks[j] = ranks[j], ranks[i]
            slipped = True
    flags: dict[int, list[str]] = {}
    for pos, text in enumerate(texts):
        found = []
        if is_refusal(text):
            found.append("unhelpful_refusal")
        if find_leak([text], list(DEFAULT_LEAK_WORDS), []):
            found.append("identity_leak")
        if found:
            flags[pos] = found
    decisive = len(set(ranks)) > 1
    if not decisive and all(pref.has(t) for t in texts):
        return None  # skipped: 'all bad' would label good answers bad in the unpaired export
    return svc.JudgmentSpec(
        assignment_id="",
        # the studio takes no ranking that ties every answer: none has what the person wants, so
        # they press 'all bad' (stored as a tie among all, which no training pair comes from)
        ranks=ranks if decisive else None,
        all_bad=not decisive,
        strength=(1 if slipped else 2) if decisive else None,
        flags=flags,
        next=False,
    )


def expert_vote(pref: Preference, a: str, b: str, rng: random.Random, noise: float) -> str:
    """The scripted expert's blind vote: the answer the preference scores higher, a tie when
    equal; with probability `noise` a random one of a, b and tie instead."""
    if rng.random() < noise:
        return rng.choice(["a", "b", "tie"])
    sa, sb = pref.score(a), pref.score(b)
    return "a" if sa > sb else "b" if sb > sa else "tie"


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class DemoConfig:
    """How big the run is. `FULL` is `studio demo`; `QUICK` (`--quick`, the whole-loop test) is smaller."""

    train_prompts: int  # labeled prompts (from the file's train split)
    heldout_prompts: int  # held-out prompts (property rate, re-battles)
    n: int = 4  # answers per labeling task
    overlap: int = 2  # annotators per task
    # labeling, PPO rollouts and the property rate; battles keep the arena's 128 (the runs'
    # re-battles are opened by the studio, jobs.register_stage, as for any run)
    max_tokens: int = 64
    label_temperature: float = 0.8
    temperature: float = 0.7  # battles and the property rate (the studio's battle temperature)
    label_noise: float = 0.1
    expert_noise: float = 0.1
    samples_per_prompt: int = 2  # answers per held-out prompt and version for the property rate
    # items per guard suite; None: the whole suites, the only evaluation the gate reads (a cut
    # one is a quick look: the gate then holds the version and says so)
    eval_limit: int | None = None
    # the DPO version's duel against base (the runs' re-battles: 100). Where base mostly has the
    # property already, most votes tie: no_lists' duel in full run 15 had 24 decisive votes in
    # 100 (18-6), and at that rate and a 75% win rate the always-valid verdict comes within 100
    # votes in 34% of simulated duels, within 200 in 80%, within 300 in 95% (docs/demo.md). A
    # duel with a verdict stops there, so 300 costs time only where 100 would decide nothing.
    battle_budget: int = 300
    max_votes: int | None = None  # the expert stops after this many votes per campaign (None: verdicts)
    # recipe overrides per run (the demo recipes in data/recipes/demo/ are the full run's)
    reward_overrides: dict[str, Any] = field(default_factory=dict)
    ppo_overrides: dict[str, Any] = field(default_factory=dict)
    dpo_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


# The full run votes until each duel's verdict or its budget of 100 votes: at a cap of 60 (runs
# 2-6) a third to a half of the votes were ties, and 24-9 (73%) is short of the always-valid
# verdict, which needs about 45 decisive votes at that rate (docs/demo.md, full run 7).
# 192 labeled prompts since full run 9: the reward model ordered 95% of the held-out pairs there
# against 86-89% on 96 in runs 6-8, for about 4 more minutes (docs/demo.md).
FULL = DemoConfig(train_prompts=192, heldout_prompts=48)
# The quick run checks that the loop runs and moves the property; its evaluations are quick looks
# and its battles a few votes, so the gate holds its versions (docs/demo.md). Its DPO makes one
# pass over the pairs at full run 2's learning rate: at 12 steps and 2e-4 it left the property
# where base had it (50% and 50%, 2026-12-02), and the gate holds the quick run's versions on
# their quick-look evaluations whatever the stronger step costs; it keeps the DPO loss alone
# (sft_weight 0, as in the runs that passed the whole-loop test), since the chosen answers'
# likelihood term holds the model nearer its parent and was measured only in the full run.
# 4 answers per held-out prompt: at 2, one answer is 2 points of the rate.
QUICK = DemoConfig(
    train_prompts=48,
    heldout_prompts=24,
    eval_limit=4,
    battle_budget=12,
    max_votes=12,
    samples_per_prompt=4,
    reward_overrides={"train.max_steps": 12},
    ppo_overrides={"ppo.iterations": 2},
    dpo_overrides={
        "train.max_steps": 32,
        "train.learning_rate": 5e-4,
        "train.sft_weight": 0.0,
        "train.margin_budget": None,  # as measured in the runs above
    },
)
SIZES = {"full": FULL, "quick": QUICK}


# The passes over the ranked pairs that the demo's DPO recipe (64 steps of 8) made over
# `second_person`'s 1,234 in full run 11, where every guard held. 64 fixed steps over `no_lists`'
# 368 pairs were 1.4 passes, 3.4x as many: the held-out margin rose 13 nats and factual
# accuracy fell 6.2 points against base, past its 3-point tolerance (full run 14, docs/demo.md);
# 20 steps on the same data kept the property (99%) and lost 3.2 points, half as many. Within
# these steps the recipe's margin budget (train.margin_budget) stops DPO where the preference is
# learned fast: no_lists' held-out margin rose 20x as fast per step as second_person's.
DPO_PASSES = 0.42
DPO_MIN_STEPS = 8


def dpo_steps(ranked_pairs: int) -> dict[str, int]:
    """The demo DPO run's steps: DPO_PASSES over the labeling's ranked pairs, at most the recipe's
    steps, at least DPO_MIN_STEPS. Empty (the recipe's own) where the pairs fill them."""
    import yaml

    train = yaml.safe_load((RECIPES_DIR / "dpo.yaml").read_text())["train"]
    batch = train["per_device_train_batch_size"] * train["gradient_accumulation_steps"]
    steps = max(DPO_MIN_STEPS, math.ceil(DPO_PASSES * ranked_pairs / batch))
    return {"train.max_steps": steps} if steps < train["max_steps"] else {}


def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(?:avx512_bf16|amx_bf16)\b", flags) is not None


# On a CPU with bfloat16 units, mixed precision trains the demo's reward model about 1.45x faster
# per step (3.9-4.4 against 5.6-6.2 s on a Zen 4, same accuracy; docs/demo.md). Without them it is 30-70x
# slower, so the recipes stay float32 and the demo asks for it only where it pays.
BF16_TRAIN = {"train.bf16": True}


# ------------------------------------------------------------------ output


class Console:
    """One line per stage: a bar redrawn in place on a terminal while the stage waits on work,
    then the stage's result with its time. Off a terminal only the result lines are written."""

    def __init__(self, out: IO[str], stages: int = 8):
        self.out, self.stages = out, stages
        self.tty = out.isatty()
        self.times: dict[str, float] = {}
        self._last = 0.0

    @contextmanager
    def stage(self, index: int | str, title: str) -> Iterator[Stage]:
        stage = Stage(self, index, title)
        try:
            yield stage
        except BaseException:
            self._clear()
            self.write(f"{stage.prefix} failed after {time.monotonic() - stage.t0:.0f} s")
            raise
        self.times[title] = time.monotonic() - stage.t0
        self._clear()
        self.write(f"{stage.prefix} {stage.summary} ({self.times[title]:.0f} s)")

    def write(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def draw(self, text: str) -> None:
        if self.tty and time.monotonic() - self._last > 0.2:
            self._last = time.monotonic()
            self.out.write("\r\x1b[2K" + text[:160])
            self.out.flush()

    def _clear(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K")


class Stage:
    def __init__(self, console: Console, index: int | str, title: str):
        self.console, self.title, self.t0 = console, title, time.monotonic()
        self.prefix = (
            f"[{index}/{console.stages}] {title:<10}" if isinstance(index, int) else f"[{index}] {title:<10}"
        )
        self.summary = "done"

    def bar(self, done: float, total: float, note: str = "") -> None:
        width = 28
        share = min(max(done / total, 0.0), 1.0) if total else 0.0
        filled = int(share * width)
        elapsed = time.monotonic() - self.t0
        self.console.draw(
            f"{self.prefix} [{'#' * filled}{'.' * (width - filled)}] {done:.0f}/{total:.0f} {note}"
            f" {elapsed:.0f} s"
        )


# ------------------------------------------------------------------ the run


class DemoError(RuntimeError):
    """The demo could not go on (a run failed, the model server stopped answering, ...)."""


@dataclass
class VersionRow:
    version: str
    stage: str
    parent: str | None
    property_rate: float | None = None
    property_n: int = 0
    win_rate: float | None = None  # against base, decisive votes
    win_ci: tuple[float, float] | None = None
    votes: dict[str, int] | None = None
    gate: dict[str, Any] | None = None
    promoted: bool = False
    deltas: dict[str, dict[str, Any]] | None = None  # the evaluation against the parent
    base_deltas: dict[str, dict[str, Any]] | None = None  # against base, where the parent is not base
    rebattle_verdict: str | None = None
    guard_reasons: list[str] | None = None  # the gate's guards on the evaluation alone


@dataclass
class DemoReport:
    preference: str
    config: dict[str, Any]
    data_dir: str
    rows: list[VersionRow]
    reward_model: dict[str, Any]
    labeling: dict[str, Any]
    stage_seconds: dict[str, float]
    total_seconds: float
    checks: dict[str, bool]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _wait(
    stage: Stage, poll: Callable[[], tuple[float, float, str, bool]], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done, total, note, finished = poll()
        stage.bar(done, total, note)
        if finished:
            return
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not finish in {timeout:.0f} s")
        time.sleep(0.5)


def free_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


class Demo:
    """One demo run on one data directory (see the module docstring for the stages)."""

    def __init__(
        self,
        pref: Preference,
        data_dir: Path,
        config: DemoConfig = FULL,
        out: IO[str] | None = None,
        port: int = 8000,
    ):
        self.pref, self.data_dir, self.config = pref, data_dir, config
        self.console = Console(out or sys.stdout)
        self.port = port
        self.rng = random.Random(config.seed)
        self.studio: Any = None
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.log: IO[str] | None = None
        self._quiet: redirect_stderr[IO[str]] | None = None  # stderr to the log while the studio runs
        self.heldout: list[list[dict[str, str]]] = []
        self.rates: dict[str, list[bool]] = {}
        self.texts: dict[str, list[tuple[int, str]]] = {}
        self.ranked_pairs = 0  # the labeling's, counted once it ends (DPO's steps follow it)

    # -------------------------------------------------------------- studio
    def start_studio(self) -> None:
        import uvicorn

        from studio.app import create_app
        from studio.config import Settings
        from studio.runtime import Studio

        # the demo starts each evaluation itself, on the gate's four suites only: the automatic
        # one runs every suite, twice as long on the CPU (docs/demo.md)
        settings = Settings(data_dir=self.data_dir, port=free_port(self.port), auto_eval=False)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        self.studio = Studio(settings)
        # the studio's own messages go to its log; the demo prints one line per stage. The file
        # stays open until the studio stops: log handlers made meanwhile keep writing to it. The
        # redirect lasts as long too: the studio's threads print later (a full run once showed
        # the switch to a runtime-LoRA server, its waits and its probe among the stage lines).
        self.log = open(self.data_dir / "logs" / "demo-studio.log", "a")  # noqa: SIM115
        self._quiet = redirect_stderr(self.log)
        self._quiet.__enter__()
        self.studio.start()
        app = create_app(settings, self.studio)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, name="demo-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise DemoError("the studio's HTTP server did not start; see logs/demo-studio.log")
            time.sleep(0.1)
        self.studio.announce()  # server.json: CLI commands on this data directory find the studio

    def stop_studio(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.server.should_exit = True  # the app's lifespan stops the studio
            self.thread.join(timeout=120)
        if self.studio is not None and self.studio.started:
            self.studio.stop()
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None
        if self.log is not None:
            self.log.close()

    @property
    def url(self) -> str:
        return self.studio.url

    def user(self, name: str) -> User:
        from studio.users import get_user

        found = get_user(self.studio.store, name)
        assert found is not None, name
        return found

    # -------------------------------------------------------------- people
    def create_people(self) -> None:
        import secrets

        admin = self.user("admin")
        people = {ENGINEER: "engineer", EXPERT: "expert", **{a: "annotator" for a in ANNOTATORS}}
        creds = {}
        for name, role in people.items():
            password = secrets.token_urlsafe(12)
            svc.add_user(self.studio, admin, svc.UserSpec(name, role, password))
            creds[name] = {"role": role, "password": password}
        # created owner-only: it holds the people's passwords (the engineer's can train and promote)
        fd = os.open(self.data_dir / "demo-users.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(creds, indent=2))
        self.admin, self.engineer, self.expert = admin, self.user(ENGINEER), self.user(EXPERT)
        self.annotators = [self.user(a) for a in ANNOTATORS]
        recipes = self.data_dir / "recipes"  # the studio's own recipes (training.recipes)
        recipes.mkdir(exist_ok=True)
        for path in sorted(RECIPES_DIR.glob("*.yaml")):
            shutil.copy(path, recipes / f"demo-{path.name}")

    # -------------------------------------------------------------- 1 import
    def import_prompts(self, stage: Stage) -> None:
        from studio.importer import read_prompts

        prompts = read_prompts(PROMPTS_FILE)
        train = [p for p in prompts if p.metadata.get("split") == "train"][: self.config.train_prompts]
        held = [p for p in prompts if p.metadata.get("split") == "heldout"][: self.config.heldout_prompts]
        for name, part in ((TRAIN_SET, train), (HELDOUT_SET, held)):
            svc.import_prompts(self.studio, self.engineer, name, part, PROMPTS_FILE.name)
        self.heldout = [p.messages for p in held]
        stage.summary = (
            f"{len(train)} training prompts into '{TRAIN_SET}', {len(held)} held-out prompts into "
            f"'{HELDOUT_SET}' (from {PROMPTS_FILE.relative_to(ROOT)})"
        )

    # -------------------------------------------------------------- 2 sample, 3 label
    def open_campaign(self) -> None:
        c = self.config
        svc.create_campaign(
            self.studio,
            self.admin,
            svc.CampaignSpec(
                name=LABEL_CAMPAIGN,
                prompt_set=TRAIN_SET,
                n=c.n,
                overlap=c.overlap,
                temperature=c.label_temperature,
                max_tokens=c.max_tokens,
                seed=c.seed,
                guidelines=f"Prefer {self.pref.rewards}.",
            ),
        )

    def label_until_done(self, stop: threading.Event) -> None:
        """The annotators work as long as tasks come (a task is judged by `overlap` of them).

        Done when every place is judged, or, once every prompt is sampled, when none of them is
        offered a task: the places left are of tasks each of them skipped."""
        rngs = {a.name: random.Random(f"{self.config.seed}-{a.name}") for a in self.annotators}
        while not stop.is_set():
            # read before the round: a task sampled during it is offered in the next one
            progress = svc.get_campaign(self.studio, self.admin, LABEL_CAMPAIGN)["progress"]
            if progress["judgments"] >= progress["judgments_needed"]:
                return
            all_sampled = progress["tasks_sampled"] >= progress["prompts"]
            worked = False
            for person in self.annotators:
                task = svc.next_task(self.studio, person, LABEL_CAMPAIGN)["task"]
                if task is None:
                    continue
                worked = True
                spec = annotate(self.pref, task["completions"], rngs[person.name], self.config.label_noise)
                if spec is None:
                    svc.skip(self.studio, person, task["assignment_id"])
                    continue
                spec.assignment_id = task["assignment_id"]
                spec.duration_ms = None
                svc.submit_judgment(self.studio, person, spec)
            if not worked and all_sampled:
                return
            if not worked:
                stop.wait(0.2)

    def sample_rates(self, version: str, stage: Stage | None = None) -> None:
        """k answers per held-out prompt from `version` (stored like any sample), their property."""
        c = self.config

        def one(messages: list[dict[str, str]]) -> list[str]:
            spec = svc.SampleSpec(
                messages=messages,
                n=c.samples_per_prompt,
                temperature=c.temperature,
                max_tokens=c.max_tokens,
                model=version,
            )
            return [g["text"] for g in svc.sample(self.studio, self.engineer, spec)["generations"]]

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, self.heldout))
        self.texts[version] = [(i, t) for i, texts in enumerate(answers) for t in texts]
        self.rates[version] = [self.pref.has(t) for _, t in self.texts[version]]

    # -------------------------------------------------------------- 4 train
    def train(self, stage: Stage) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Reward model, then PPO against it (parent: base), then DPO over the PPO version on the
        same judgments (the order of the studio's `ppo_then_dpo` pipeline), each run on its demo
        recipe (data/recipes/demo/)."""
        c = self.config

        def run(label: str, **spec: Any) -> dict[str, Any]:
            started = svc.start_run(
                self.studio, self.engineer, svc.RunSpec(campaigns=[LABEL_CAMPAIGN], **spec)
            )
            return self.wait_run(stage, started["id"], label)

        mixed = BF16_TRAIN if native_bf16() else {}
        rm_overrides = {**mixed, **c.reward_overrides}
        rm_run = run("reward", stage="reward", recipe="demo-reward", overrides=rm_overrides or None)
        rm = rm_run["versions"][0]
        ppo_run = run(
            "ppo",
            stage="ppo",
            recipe="demo-ppo",
            parent="base",
            reward_model=rm,
            overrides=c.ppo_overrides or None,
            eval_prompt_set=HELDOUT_SET,
        )
        ppo = ppo_run["versions"][0]
        dpo_run = run(
            "dpo",
            stage="dpo",
            recipe="demo-dpo",
            parent=ppo,
            overrides={**mixed, **dpo_steps(self.ranked_pairs), **c.dpo_overrides} or None,
            eval_prompt_set=HELDOUT_SET,
        )
        metrics = rm_run["metrics"]["reward"]
        dpo_m = dpo_run["metrics"].get("dpo") or {}
        budget = (
            f", stopped by its margin budget: held-out margin +{dpo_m['margin_budget_gain']:.2f} nats"
            if "margin_budget_step" in dpo_m
            else ""
        )
        stage.summary = (
            f"reward model {rm} ({metrics.get('train_pairs')} pairs, "
            f"{metrics.get('heldout_accuracy', 0):.0%} on its held-out split), PPO {ppo} against it, "
            f"DPO {dpo_run['versions'][0]} over {ppo} ({dpo_m.get('steps', '?')} steps{budget})"
        )
        return rm_run, ppo_run, dpo_run

    def wait_run(self, stage: Stage, run_id: str, label: str, timeout: float = 3600) -> dict[str, Any]:
        state: dict[str, Any] = {}

        def poll() -> tuple[float, float, str, bool]:
            run = svc.get_run(self.studio, self.engineer, run_id)
            state["run"] = run
            p = run["progress"]
            note = f"{label}: {p.get('stage', 'starting')}"
            if p.get("eta_s") is not None:
                note += f", ETA {p['eta_s']:.0f} s"
            return p.get("step", 0), p.get("max_steps") or 1, note, run["status"] in svc_terminal()

        _wait(stage, poll, timeout, f"run {run_id}")
        run = state["run"]
        if run["status"] != "succeeded":
            raise DemoError(f"run {run_id} {run['status']}: {run['reason']}\n{run['log'][-2000:]}")
        return run

    # -------------------------------------------------------------- RM accuracy on held-out pairs
    def reward_accuracy(self, rm: str) -> dict[str, Any]:
        """The reward model on pairs of answers to the held-out prompts (never trained on) that
        the preference ranks apart: the share it orders the same way. The answers are every
        version's (base, PPO, DPO): whether an answer says "you" depends mostly on the prompt, so
        base's two answers per prompt differed in 6 of 48 prompts in full run 2, too few pairs to
        tell 90% from 80%; and the policies' answers test the reward model where PPO took them."""
        from trainers.reward import load_reward_model, score

        by_prompt: dict[int, list[str]] = {}
        for texts in self.texts.values():
            for i, text in texts:
                by_prompt.setdefault(i, []).append(text)
        pairs = []
        for i, texts in by_prompt.items():
            for a, b in combinations(texts, 2):
                if self.pref.score(a) != self.pref.score(b):
                    better, worse = (a, b) if self.pref.score(a) > self.pref.score(b) else (b, a)
                    pairs.append((i, better, worse))
        if not pairs:
            return {"pairs": 0, "accuracy": None}
        with redirect_stderr(self.log or sys.stderr):  # transformers' load report goes to the log
            model, tokenizer = load_reward_model(Path(self.studio.store.model_version(rm)["path"]))
        # each answer scored once: an answer sits in up to 11 pairs (4 answers x 3 versions in the
        # quick run), and scoring per pair took about 5 of the quick run's 21 minutes
        answers = sorted({(i, text) for i, better, worse in pairs for text in (better, worse)})
        convs = [[*self.heldout[i], {"role": "assistant", "content": text}] for i, text in answers]
        reward = dict(zip(answers, score(model, tokenizer, convs), strict=True))
        right = sum(reward[i, better] > reward[i, worse] for i, better, worse in pairs)
        return {"pairs": len(pairs), "accuracy": right / len(pairs)}

    # -------------------------------------------------------------- 6 evaluate, 7 re-battle, 8 gate
    def evaluate(
        self, stage: Stage, version: str, parent: str, index: int = 0, total: int = 2
    ) -> dict[str, Any]:
        """`version` against `parent` on the gate's four suites through the door `studio eval`
        uses; when it is complete and the re-battle has decided, the gate decides on its own.
        Returns the comparison ({version, against, metrics, gate})."""
        c = self.config
        spec = svc.EvalSpec(
            version=version, against=parent, suites=GATE_SUITES, seed=c.seed, limit=c.eval_limit
        )
        eval_id = svc.start_eval(self.studio, self.engineer, spec)["id"]
        state: dict[str, Any] = {}

        def poll() -> tuple[float, float, str, bool]:
            e = svc.get_eval(self.studio, self.engineer, eval_id)
            state["eval"] = e
            return (
                index,
                total,
                f"{version} vs {parent}: {e['status']}",
                e["status"] in ("succeeded", "failed"),
            )

        _wait(stage, poll, 3600, f"evaluation {eval_id}")
        e = state["eval"]
        if e["status"] != "succeeded":
            raise DemoError(f"evaluation {eval_id} of {version} against {parent} failed: {e.get('error')}")
        return e["result"]

    def rebattle_of(self, run: dict[str, Any]) -> str:
        """The blind re-battle the run opened against its parent on the held-out prompts."""
        fresh = svc.get_run(self.studio, self.engineer, run["id"])
        if not fresh.get("rebattle"):
            raise DemoError(f"run {run['id']} opened no re-battle: {'; '.join(fresh['notes']) or 'no notes'}")
        return fresh["rebattle"]

    def open_duel(self, name: str, version: str, against: str) -> str:
        """A blind two-version campaign on the held-out prompts, sampled as the runs' re-battles are."""
        svc.create_battle_campaign(
            self.studio,
            self.admin,
            svc.BattleCampaignSpec(
                name=name,
                prompt_set=HELDOUT_SET,
                versions=[version, against],
                budget=self.config.battle_budget,
            ),
        )
        return name

    def gate(self, stage: Stage, version: str, timeout: float = 120) -> dict[str, Any]:
        """What the gate made of `version` (studio/promotion.py decides on its own once the
        evaluation and the verdict are in; this waits for that record). Where the gate passed but
        held the version only because `policy` had not yet reached its parent (the parent's
        verdict came later), the engineer promotes it by hand, as the gate's reason says to."""
        deadline = time.monotonic() + timeout
        while True:
            card = svc.model_card(self.studio, self.engineer, version)
            gate = card["gate"]
            mine = [p for p in card["promotions"] if p["version"] == version]
            decided = [p for p in mine if p["decided_by"] == "gate"]
            if decided or not gate["ready"] or time.monotonic() > deadline:
                break
            stage.bar(0, 1, f"waiting for the gate on {version}")
            time.sleep(0.5)
        policy = svc.list_models(self.studio, self.engineer)["aliases"].get("policy")
        promoted_by = next((p["decided_by"] for p in mine if p["action"] == "promote"), None)
        if promoted_by is None and decided and decided[0]["passed"] and policy == gate["parent"]:
            svc.promote(self.studio, self.engineer, version)
            promoted_by = self.engineer.name
        if promoted_by == "gate":
            decision = "passed, promoted by the gate"
        elif promoted_by:
            decision = f"passed, promoted by {promoted_by}"
        elif gate["passed"]:
            decision = "passed, held: " + "; ".join(decided[0]["reasons"] if decided else ["no decision"])
        else:
            decision = "held: " + "; ".join(gate["reasons"])
        return {
            "gate": {"passed": gate["passed"], "reasons": gate["reasons"]},
            "promoted": promoted_by is not None,
            "verdict": gate["verdict"],
            "decision": decision,
        }

    # -------------------------------------------------------------- 7 the expert
    def vote_until_closed(self, campaigns: list[str], stop: threading.Event) -> None:
        """The expert takes the battles of every open campaign until each has a verdict (or, with
        `DemoConfig.max_votes`, has that many votes: the quick run's cap on its waiting)."""
        from studio.arena import battle_campaign
        from studio.store import StoreError

        rng = random.Random(f"{self.config.seed}-expert")
        open_ = list(campaigns)
        while open_ and not stop.is_set():
            worked = False
            for name in list(open_):
                if self.config.max_votes is not None and self.votes(name) >= self.config.max_votes:
                    open_.remove(name)
                    continue
                try:
                    battle = svc.next_battle(self.studio, self.expert, name)["battle"]
                except StoreError:  # the campaign closed: its stopping rule decided
                    if battle_campaign(self.studio.store, name)["status"] != "active":
                        open_.remove(name)
                        continue
                    raise
                if battle is None:
                    continue
                winner = expert_vote(self.pref, battle["a"], battle["b"], rng, self.config.expert_noise)
                svc.vote(self.studio, self.expert, svc.VoteSpec(battle_id=battle["battle_id"], winner=winner))
                worked = True
            if not worked:
                stop.wait(0.2)

    def votes(self, campaign: str) -> int:
        return self.studio.store.query("SELECT count(*) AS n FROM votes WHERE campaign = ?", [campaign])[0][
            "n"
        ]

    # -------------------------------------------------------------- the whole run
    def run(self) -> DemoReport:
        from studio.arena import battle_campaign

        c, con = self.config, self.console
        t_start = time.monotonic()
        con.write(
            f"Preference Studio demo: preference '{self.pref.name}' rewards {self.pref.rewards}.\n"
            f"Data directory: {self.data_dir}"
        )
        with con.stage("0", "start") as st:
            self.start_studio()
            self.create_people()
            st.summary = (
                f"studio at {self.url} with vLLM serving base; users admin, {ENGINEER}, {EXPERT}, "
                f"{', '.join(ANNOTATORS)}"
            )
        with con.stage(1, "import") as st:
            self.import_prompts(st)

        stop = threading.Event()
        workers = ThreadPoolExecutor(4, thread_name_prefix="demo")
        try:
            with con.stage(2, "sample") as st:
                self.open_campaign()
                labeling = workers.submit(self.label_until_done, stop)
                base_rates = workers.submit(self.sample_rates, "base")

                def sampled() -> tuple[float, float, str, bool]:
                    p = svc.get_campaign(self.studio, self.admin, LABEL_CAMPAIGN)["progress"]
                    if labeling.done() and labeling.exception():
                        raise labeling.exception()  # type: ignore[misc]
                    return p["tasks_sampled"], p["prompts"], "tasks", p["tasks_sampled"] >= p["prompts"]

                _wait(st, sampled, 3600, "sampling the labeling campaign")
                st.summary = (
                    f"the task sampler drew {c.n} answers from base for each of {c.train_prompts} "
                    f"prompts (temperature {c.label_temperature}, at most {c.max_tokens} tokens)"
                )
            with con.stage(3, "label") as st:

                def judged() -> tuple[float, float, str, bool]:
                    p = svc.get_campaign(self.studio, self.admin, LABEL_CAMPAIGN)["progress"]
                    if labeling.done():
                        labeling.result()
                    return p["judgments"], p["judgments_needed"], "judgments", labeling.done()

                _wait(st, judged, 3600, "labeling")
                base_rates.result()
                quality = svc.campaign_quality(self.studio, self.admin, LABEL_CAMPAIGN)
                pairs = self._pair_count()
                self.ranked_pairs = pairs["pairs"]
                alpha = quality["agreement"].get("krippendorff_alpha")
                st.summary = (
                    f"{quality['progress']['judgments']} judgments by {len(ANNOTATORS)} annotators at "
                    f"k = {c.overlap}: {pairs['pairs']} ranked pairs, {pairs['tied']} tied, "
                    f"{pairs['flagged']} flags; Krippendorff's alpha {alpha:.2f}"
                    if alpha is not None
                    else f"{quality['progress']['judgments']} judgments"
                )
                if pairs["pairs"] < FEW_PAIRS:  # said now, not an hour later under the table
                    st.summary += (
                        f"; under the {FEW_PAIRS} ranked pairs the Train tab's advisor asks for, so "
                        "expect the reward model and DPO to learn little (docs/demo.md)"
                    )
            with con.stage(4, "train") as st:
                rm_run, ppo_run, dpo_run = self.train(st)
            rm = rm_run["versions"][0]
            ppo, dpo = ppo_run["versions"][0], dpo_run["versions"][0]
            with con.stage(5, "hot-load") as st:
                served = self.studio.backend.models()
                missing = [v for v in (ppo, dpo) if v not in served]
                if missing:
                    raise DemoError(f"{', '.join(missing)} not served after the run (serving: {served})")
                first = {}
                for v in (ppo, dpo):
                    t0 = time.monotonic()
                    spec = svc.SampleSpec(
                        messages=self.heldout[0], n=1, max_tokens=16, temperature=0.0, model=v
                    )
                    svc.sample(self.studio, self.engineer, spec)
                    first[v] = time.monotonic() - t0
                st.summary = (
                    f"{ppo} and {dpo} hot-loaded into the running vLLM as their runs ended; first answers in "
                    + ", ".join(f"{t:.1f} s" for t in first.values())
                )
            # 6 and 7 share the model server: the evaluations, the battles and the held-out samples
            # of the new versions are sampled side by side (vLLM batches them together)
            duels = {ppo: self.rebattle_of(ppo_run), dpo: self.rebattle_of(dpo_run)}
            vs_base = {ppo: duels[ppo], dpo: self.open_duel(f"vsbase-{dpo}", dpo, "base")}
            battles = list(dict.fromkeys([*duels.values(), *vs_base.values()]))
            voting = workers.submit(self.vote_until_closed, battles, stop)
            rates = [workers.submit(self.sample_rates, v) for v in (ppo, dpo)]
            # each version against its parent, and DPO against base too: while PPO is held, base is
            # what DPO would replace, and the gate then judges it on that evaluation and its duel
            # with base (studio/promotion.py). Its suite runs are cached from the first two.
            pairs = ((ppo, "base"), (dpo, ppo), (dpo, "base"))
            evaluations: dict[tuple[str, str], dict[str, Any]] = {}
            with con.stage(6, "evaluate") as st:
                for index, (version, parent) in enumerate(pairs):
                    evaluations[version, parent] = self.evaluate(st, version, parent, index, len(pairs))
                st.summary = "; ".join(
                    f"{v} vs {a}: " + format_deltas(e["metrics"]) for (v, a), e in evaluations.items()
                )
            with con.stage(7, "re-battle") as st:

                def voted() -> tuple[float, float, str, bool]:
                    if voting.done():
                        voting.result()
                    votes = sum(self.votes(b) for b in battles)
                    closed = sum(battle_campaign(self.studio.store, b)["status"] == "closed" for b in battles)
                    done = voting.done() and all(r.done() for r in rates)
                    return closed, len(battles), f"decided, {votes} votes", done

                _wait(st, voted, 3600, "the re-battles")
                for r in rates:
                    r.result()
                rm_check = workers.submit(self.reward_accuracy, rm)  # on all versions' answers
                st.summary = "; ".join(self._verdict_line(b) for b in battles)
            results: dict[str, dict[str, Any]] = {}
            with con.stage(8, "gate") as st:
                for version in (ppo, dpo):
                    results[version] = self.gate(st, version)
                policy = svc.list_models(self.studio, self.engineer)["aliases"].get("policy")
                st.summary = (
                    "; ".join(f"{v}: {r['decision'].split(':')[0]}" for v, r in results.items())
                    + f"; policy -> {policy}"
                )
            accuracy = rm_check.result()
        except BaseException:
            # an error or Ctrl-C/SIGTERM: the workers' samples and scoring do not watch `stop`, so
            # stop the studio (and vLLM) first rather than wait minutes for them to finish
            stop.set()
            workers.shutdown(wait=False, cancel_futures=True)
            self.stop_studio()
            raise
        finally:
            stop.set()
            workers.shutdown(wait=True)

        rows = [VersionRow("base", "base", None)]
        rows += [
            VersionRow(ppo, "ppo", "base"),
            VersionRow(dpo, "dpo", ppo),
        ]
        for row in rows:
            hits = self.rates.get(row.version, [])
            row.property_rate = sum(hits) / len(hits) if hits else None
            row.property_n = len(hits)
            if row.version in vs_base:
                duel = self._duel(vs_base[row.version], row.version)
                row.win_rate, row.win_ci, row.votes = duel
            if row.version in results:
                r = results[row.version]
                row.gate, row.promoted, row.rebattle_verdict = r["gate"], r["promoted"], r["verdict"]
                row.deltas = evaluations[row.version, row.parent]["metrics"]
                row.guard_reasons = guard_reasons(row.deltas)
                if row.parent != "base":
                    row.base_deltas = evaluations[row.version, "base"]["metrics"]
                    row.guard_reasons += [f"against base: {r}" for r in guard_reasons(row.base_deltas)]
        reward = {
            "version": rm,
            "heldout_split_accuracy": rm_run["metrics"]["reward"].get("heldout_accuracy"),
            "heldout_split_pairs": rm_run["metrics"]["reward"].get("heldout_pairs"),
            "heldout_prompts_accuracy": accuracy["accuracy"],
            "heldout_prompts_pairs": accuracy["pairs"],
        }
        report = DemoReport(
            preference=self.pref.name,
            config=asdict(c),
            data_dir=str(self.data_dir),
            rows=rows,
            reward_model=reward,
            labeling={
                **self._pair_count(),
                "quality": svc.campaign_quality(self.studio, self.admin, LABEL_CAMPAIGN)["agreement"],
            },
            stage_seconds={k: round(v, 1) for k, v in con.times.items()},
            total_seconds=round(time.monotonic() - t_start, 1),
            checks={},
        )
        report.checks = checks(report, policy)
        (self.data_dir / "demo.json").write_text(json.dumps(report.as_dict(), indent=2, default=str))
        con.write("")
        for line in format_table(self.pref, report):
            con.write(line)
        return report

    def _pair_count(self) -> dict[str, int]:
        from studio.export import build_rows

        rows, card = build_rows(self.studio.store, "preference", LABEL_CAMPAIGN)
        judgments = self.studio.store.query(
            "SELECT flags FROM judgments WHERE campaign = ?", [LABEL_CAMPAIGN]
        )
        flagged = sum(
            len(v)
            for j in judgments
            for v in (json.loads(j["flags"]) if isinstance(j["flags"], str) else j["flags"]).values()
        )
        return {"pairs": len(rows), "tied": int(card.get("tied_pairs_left_out", 0)), "flagged": flagged}

    def _duel(
        self, campaign: str, version: str
    ) -> tuple[float | None, tuple[float, float] | None, dict[str, int]]:
        from studio.arena import two_version_duel

        d = two_version_duel(self.studio.store, campaign)
        if d is None:
            return None, None, {"wins": 0, "losses": 0, "ties": 0}
        if d["x"] == version:
            p, ci, w, lost = d["p"], (d["lower"], d["upper"]), d["wins"], d["losses"]
        else:
            p, ci, w, lost = 1 - d["p"], (1 - d["upper"], 1 - d["lower"]), d["losses"], d["wins"]
        return (p if w + lost else None), ci, {"wins": w, "losses": lost, "ties": d["ties"]}

    def _verdict_line(self, campaign: str) -> str:
        from studio.arena import battle_campaign

        verdict = battle_campaign(self.studio.store, campaign).get("verdict")
        return f"{campaign}: {verdict.split(':')[0] if verdict else 'open'}"


def svc_terminal() -> tuple[str, ...]:
    from studio.jobs import TERMINAL

    return TERMINAL


def guard_reasons(metrics: dict[str, dict[str, Any]] | None) -> list[str]:
    """The gate's guard rules (data/gate.yaml) applied to an evaluation's metrics alone: each
    guard that regressed past its tolerance (or was not measured), with its numbers."""
    from studio.evals import gate_decision, load_gate_config

    return gate_decision(metrics or {}, "better", load_gate_config())["reasons"]


# ------------------------------------------------------------------ the table and the checks

DELTA_NAMES = {
    "refusal_rate": "refusal",
    "capability_accuracy": "capability",
    "factual_accuracy": "factual",
    "consistency": "consistency",
}


def format_deltas(metrics: dict[str, dict[str, Any]] | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(
        f"{short} {metrics[name]['delta']:+.2f}" for name, short in DELTA_NAMES.items() if name in metrics
    )


def _interval(hits: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(0.95, method="wilson")
    return ci.low, ci.high


def format_table(pref: Preference, report: DemoReport) -> list[str]:
    """The final table: one row per version, then the checks, the reward model and the times."""
    header = [
        "version",
        "stage",
        "property rate",
        "wins vs base [95%]",
        "votes W-L-T",
        "gate",
        "evaluation deltas",
    ]
    lines = []
    body = []
    for row in report.rows:
        if row.property_rate is None:
            rate = "-"
        else:
            lo, hi = _interval(round(row.property_rate * row.property_n), row.property_n)
            rate = f"{row.property_rate:.0%} [{lo:.0%}, {hi:.0%}]"
        win = (
            "-" if row.win_rate is None else f"{row.win_rate:.0%} [{row.win_ci[0]:.0%}, {row.win_ci[1]:.0%}]"
        )
        votes = "-" if row.votes is None else f"{row.votes['wins']}-{row.votes['losses']}-{row.votes['ties']}"
        if row.gate is None:
            gate = "-"
        else:
            gate = "promoted" if row.promoted else ("passed" if row.gate["passed"] else "held")
        deltas = format_deltas(row.deltas)
        if row.base_deltas:
            deltas += f"; against base: {format_deltas(row.base_deltas)}"
        body.append([row.version, row.stage, rate, win, votes, gate, deltas])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    lines.append("")
    lines.append(
        f"property: {pref.measure}, on {report.config['heldout_prompts']} held-out prompts x "
        f"{report.config['samples_per_prompt']} answers (temperature {report.config['temperature']}); "
        "wins: the scripted expert's blind decisive votes against base on held-out prompts, with the "
        "stopping rule's 95% confidence sequence"
    )
    for row in report.rows:
        if row.gate and not row.gate["passed"]:
            lines.append(f"{row.version} held: " + "; ".join(row.gate["reasons"]))
    rm = report.reward_model
    if rm["heldout_prompts_accuracy"] is not None:
        lines.append(
            f"reward model {rm['version']}: orders {rm['heldout_prompts_accuracy']:.0%} of "
            f"{rm['heldout_prompts_pairs']} held-out pairs as the preference does "
            f"({rm['heldout_split_accuracy']:.0%} of {rm['heldout_split_pairs']} noisy pairs of its own "
            "held-out split)"
        )
    lines.append(
        "checks: " + ", ".join(f"{name} {'ok' if ok else 'FAILED'}" for name, ok in report.checks.items())
    )
    lines.append(
        "time: "
        + ", ".join(f"{name} {s:.0f} s" for name, s in report.stage_seconds.items())
        + f"; total {report.total_seconds / 60:.1f} min"
    )
    return lines


MIN_WIN_RATE = 0.65
MIN_REWARD_ACCURACY = 0.9


def checks(report: DemoReport, policy: str | None) -> dict[str, bool]:
    """What issue 12 asks the demo to show, each true or false.

    - `wins`: the last promoted version (`policy` at the end) won at least 65% of the decisive
      blind votes against base on held-out prompts, and the 95% interval lies above 50%;
    - `rises`: the property rate rises from stage to stage (base < PPO < DPO);
    - `reward_model`: the reward model orders at least 90% of held-out pairs as the preference does;
    - `guards`: no guard metric of the gate regressed past its tolerance, for any version.
    """
    by_name = {r.version: r for r in report.rows}
    last = by_name.get(policy or "base")
    rates = [r.property_rate for r in report.rows]
    # the guards judged on each evaluation itself: a quick-look evaluation (the gate waits for a
    # complete one) or an undecided re-battle is no regression
    guards_ok = all(not r.guard_reasons for r in report.rows if r.deltas is not None)
    acc = report.reward_model["heldout_prompts_accuracy"]
    return {
        "wins": bool(
            last is not None
            and last.version != "base"
            and last.win_rate is not None
            and last.win_rate >= MIN_WIN_RATE
            and last.win_ci is not None
            and last.win_ci[0] > 0.5
        ),
        "rises": all(a is not None and b is not None and a < b for a, b in pairwise(rates)),
        "reward_model": acc is not None and acc >= MIN_REWARD_ACCURACY,
        "guards": guards_ok,
    }


# ------------------------------------------------------------------ entry point


def fresh_data_dir(data_dir: Path | None) -> tuple[Path, bool]:
    """The demo's data directory and whether the demo made it up (a temporary one)."""
    if data_dir is None:
        return Path(tempfile.mkdtemp(prefix="studio-demo-")), True
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir}: a file, not a folder; give a new or empty folder")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise ValueError(
            f"--data-dir {data_dir}: not empty; the demo starts from a fresh data directory "
            "(give a new or empty folder, or leave --data-dir out for a temporary one)"
        )
    return data_dir, False


def run_demo(
    preference_name: str = DEFAULT_PREFERENCE,
    data_dir: Path | None = None,
    keep: bool = False,
    config: DemoConfig = FULL,
    port: int = 8000,
    out: IO[str] | None = None,
    wait_forever: Callable[[], None] | None = None,
) -> DemoReport:
    """Run the demo; with `keep`, leave the studio serving until `wait_forever` returns (Ctrl-C
    by default), else stop it (and remove a temporary data directory)."""
    pref = preference(preference_name)
    folder, temporary = fresh_data_dir(data_dir)
    demo = Demo(pref, folder, config, out, port)
    report = None
    try:
        try:
            report = demo.run()
        except DemoError as exc:
            raise DemoError(f"{exc} (data directory: {folder})") from exc
        if keep:
            from studio.users import BOOTSTRAP_FILE

            creds = json.loads((folder / BOOTSTRAP_FILE).read_text())
            demo.console.write(
                f"\nThe studio keeps running at {demo.url}/ on {folder}: log in as admin / "
                f"{creds['password']} to see the judgments, runs, curves, "
                "version cards and leaderboards (the scripted people's passwords are in demo-users.json). "
                "Ctrl-C stops it."
            )
            (wait_forever or _until_interrupted)()
        return report
    finally:
        demo.stop_studio()
        # a failed run keeps its folder: the error names logs/demo-studio.log in it
        if temporary and not keep and report is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _until_interrupted() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
