"""Training as the studio sees it: immutable snapshots, run records, lineage and the stage advisor.

The trainers never read the live database. At submit time the studio writes the rows a run will
train on to an immutable Parquet file named by its content hash; the run records that snapshot,
and the snapshot records every judgment id it came from. The runner (studio/jobs.py) executes runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio import campaigns as camp
from studio import launchers
from studio.export import build_rows
from studio.quality import campaign_agreement
from studio.store import ImportedPrompt, Store, StoreError, decode_json_columns, new_id
from trainers import configs
from trainers.common import STAGES, TrainerError, held_out_keys, prompt_key, rows_hash

RECIPES_DIR = Path(__file__).resolve().parents[1] / "data" / "recipes"
PIPELINES = {"ppo_then_dpo": ["ppo", "dpo"]}
SNAPSHOT_KIND = {"reward": "preference", "dpo": "preference", "ppo": "preference", "sft": "sft"}
POLICY_STAGES = {"dpo", "ppo", "sft"}
# Quick knobs the Train tab offers, mapped to recipe keys per stage (trainers.configs.setting_keys).
STEPS_KEY = {
    "reward": "train.max_steps",
    "dpo": "train.max_steps",
    "sft": "train.max_steps",
    "ppo": "ppo.iterations",
}


def stages_for(stage: str) -> list[str]:
    if stage in PIPELINES:
        return PIPELINES[stage]
    if stage not in STAGES:
        raise StoreError(f"stage {stage!r}: use one of {', '.join([*STAGES, *PIPELINES])}")
    return [stage]


def recipes(extra_dir: Path | None = None) -> dict[str, Path]:
    """Shipped recipes (the GPU ones as gpu/NAME), plus the studio's own (DATA_DIR/recipes) which
    win on a name clash."""
    found = {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}
    found |= {f"gpu/{p.stem}": p for p in sorted((RECIPES_DIR / "gpu").glob("*.yaml"))}
    if extra_dir is not None and extra_dir.is_dir():
        found |= {p.stem: p for p in sorted(extra_dir.glob("*.yaml"))}
    return found


# ---------------------------------------------------------------- snapshots


def take_snapshot(
    store: Store,
    data_dir: Path,
    kind: str,
    campaigns: list[str] | None,
    created_by: str | None = None,
    annotators: list[str] | None = None,
    min_strength: int | None = None,
) -> dict[str, Any]:
    """Write (or find) the immutable snapshot of these campaigns' judgments. Same data, same id.

    Filters: only these annotators' judgments; only judgments whose stated strength is at least
    `min_strength` (1 slight, 2 clear, 3 strong; a judgment without a strength counts as 0).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(set(campaigns or []))
    for name in names:
        if camp.get_campaign(store, name)["kind"] != "label":
            raise StoreError(
                f"campaign '{name}': a battle campaign has no rankings to train on; pick a labeling campaign"
            )
    if min_strength is not None and min_strength not in (1, 2, 3):
        raise StoreError(f"min_strength {min_strength}: use 1 (slight), 2 (clear) or 3 (strong)")
    rows: list[dict[str, Any]] = []
    for name in names or [None]:
        rows += build_rows(store, kind, name)[0]
    people = sorted(set(annotators or []))
    if people or min_strength:
        strength = {r["id"]: r["strength"] or 0 for r in store.query("SELECT id, strength FROM judgments")}
        rows = [
            r
            for r in rows
            if (not people or r["annotator"] in people) and strength[r["judgment_id"]] >= (min_strength or 0)
        ]
    if not rows:
        where = f"campaign(s) {', '.join(names)}" if names else "any campaign"
        if people or min_strength:
            where += f" (annotators {', '.join(people) or 'any'}, min strength {min_strength or 'any'})"
        raise StoreError(f"nothing to train on: {where} has no {kind} rows yet; label some tasks first")
    digest = rows_hash(rows)
    snap_id = f"snap-{digest[:16]}"
    existing = store.query("SELECT * FROM snapshots WHERE id = ?", [snap_id])
    if existing and Path(existing[0]["path"]).is_file():
        return decode_json_columns(existing[0], "filter")
    folder = data_dir / "snapshots" / snap_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.parquet"
    # Each call writes a temporary file of its own: two identical calls at once must not write
    # into one file (nor find it read-only), and the later replace swaps in identical bytes.
    tmp = folder / f".{kind}.parquet.{new_id()}.partial"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.chmod(tmp, 0o444)  # immutable: a run's data never changes under it
    os.replace(tmp, path)
    judgment_ids = sorted({r["judgment_id"] for r in rows})
    filt = {
        "kind": kind,
        "campaigns": names or "all",
        "annotators": people or "all",
        "min_strength": min_strength,
    }
    tmp_filter = folder / f".filter.json.{new_id()}.partial"
    tmp_filter.write_text(json.dumps({**filt, "content_hash": digest, "judgment_ids": judgment_ids}))
    os.replace(tmp_filter, folder / "filter.json")
    with store.transaction() as cur:
        # Asked again under the write lock: an identical call may have stored the row since the
        # first look. Both calls then return the one snapshot.
        if not cur.execute("SELECT 1 FROM snapshots WHERE id = ?", [snap_id]).fetchone():
            cur.execute(
                "INSERT INTO snapshots (id, content_hash, kind, path, filter, rows, created_by)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [snap_id, digest, kind, str(path), json.dumps(filt), len(rows), created_by],
            )
            cur.executemany(
                "INSERT INTO snapshot_judgments VALUES (?, ?)", [[snap_id, j] for j in judgment_ids]
            )
    return decode_json_columns(store.query("SELECT * FROM snapshots WHERE id = ?", [snap_id])[0], "filter")


# ---------------------------------------------------------------- runs


def submit_run(
    store: Store,
    data_dir: Path,
    *,
    stage: str,
    created_by: str,
    parent: str = camp.POLICY,
    campaigns: list[str] | None = None,
    held_out: float | None = None,
    recipe: str | None = None,
    steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    reward_model: str | None = None,
    annotators: list[str] | None = None,
    min_strength: int | None = None,
    eval_prompt_set: str | None = None,
    launcher: str | None = None,
    num_processes: int | None = None,
    launch_defaults: launchers.LaunchSettings | None = None,
    shared_dir: Path | None = None,
) -> dict[str, Any]:
    """Validate everything, take the snapshot, queue the run. Nothing is stored when a check fails.

    The run also fixes the prompts its blind re-battle may use (`rebattle_prompts`, a prompt set
    `heldout-<run>`): the prompts every policy stage holds out of this snapshot, or those of
    `eval_prompt_set` (a set an engineer marks for evaluation); never a prompt the new version or
    one of its ancestors trained on. When there are none, the run says so in its `notes` (the
    version is then held by the gate unless the re-battle is waived).

    Snapshots and the run's folder go under `shared_dir` (default `data_dir`), which the machines
    that train must also see. `launcher`/`num_processes` are the run's own launch choice, checked
    against `launch_defaults`, the running studio's launch settings (None: no studio runs, so
    whether it has a Ray cluster is checked when the run starts)."""
    stages = stages_for(stage)
    try:
        launch = launchers.check_choice(launch_defaults, launcher, num_processes)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    processes = (
        launchers.resolve(launch_defaults, launch)["num_processes"]
        if launch_defaults is not None or launch
        else None
    )
    parent_version = store.model_version(camp.resolve_policy(store, parent))
    if eval_prompt_set is not None and not store.query(
        "SELECT 1 FROM prompts WHERE set_name = ? LIMIT 1", [eval_prompt_set]
    ):
        known = ", ".join(s["name"] for s in store.prompt_sets()) or "none yet"
        raise StoreError(
            f"eval_prompt_set '{eval_prompt_set}': no such prompt set, or it holds no prompts "
            f"(prompt sets: {known}); import the evaluation prompts first"
        )
    if recipe and len(stages) > 1:
        raise StoreError(
            f"recipe {recipe!r}: a pipeline runs each stage with its own recipe ({', '.join(stages)}); "
            "change them with overrides such as ppo.iterations or train.beta"
        )
    available = recipes(data_dir / "recipes")
    chosen: dict[str, str] = {}
    for s in stages:
        name = recipe or s
        if name not in available:
            raise StoreError(f"recipe {name!r}: not found; available: {', '.join(available)}")
        chosen[s] = str(available[name])
    if steps is not None and not 1 <= steps <= 100_000:
        raise StoreError(f"steps {steps}: use a whole number from 1 to 100000")
    per_stage: dict[str, dict[str, Any]] = {}
    shares: dict[str, float] = {}  # each stage's held-out share, as its trainer will read it
    try:
        for key in overrides or {}:  # in a pipeline a key goes to the stages that have it
            configs.check_key(stages, str(key), "override")
        for s in stages:
            keys = configs.setting_keys(s)
            o = {k: v for k, v in (overrides or {}).items() if k in keys}
            if steps is not None:
                o[STEPS_KEY[s]] = steps
            if held_out is not None and "held_out" in keys:  # PPO holds nothing out
                o["held_out"] = held_out
            try:  # the stage's own config checks the recipe and every override, as its trainer will
                config = configs.validate(s, chosen[s], o)
            except configs.ConfigError as exc:
                raise configs.ConfigError(f"{s}: {exc}" if len(stages) > 1 else str(exc)) from None
            per_stage[s] = {key: configs.get(config, key) for key in o}  # as the trainer reads them
            shares[s] = float(getattr(config, "held_out", 0.0))  # PPO rolls out on every prompt
            if s == "ppo" and processes and processes > 1:
                config.ppo.check_processes(processes)  # type: ignore[attr-defined]  # as its trainer will
    except configs.ConfigError as exc:
        raise StoreError(str(exc)) from None
    rm = None
    if "ppo" in stages:
        rm = reward_model or newest_reward_model(store)
        if rm is None:
            raise StoreError(
                "ppo needs a reward model and none is registered yet: train the reward stage first"
            )
        if store.model_version(rm)["kind"] != "reward":
            raise StoreError(
                f"reward_model '{rm}' is not a reward model; pick one of: "
                f"{', '.join(v['name'] for v in reward_models(store)) or 'none yet'}"
            )
    kinds = {SNAPSHOT_KIND[s] for s in stages}
    shared = shared_dir or data_dir
    snapshot = take_snapshot(store, shared, kinds.pop(), campaigns, created_by, annotators, min_strength)
    plan = rebattle_plan(store, snapshot, stages, shares, parent_version["name"], eval_prompt_set)
    run_id = "run-" + new_id()[:10]
    out = shared / "runs" / run_id
    rebattle_set = None
    if plan.prompts:
        rebattle_set = f"heldout-{run_id}"
        store.import_prompts(rebattle_set, plan.prompts, source=plan.source)
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO runs (id, stages, status, parent, reward_model, recipes, overrides, snapshot_id,"
            " output_dir, versions, created_by, eval_prompt_set, rebattle_prompts, trained_prompts, notes,"
            " launch) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, [], ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                stages,
                parent_version["name"],
                rm,
                json.dumps(chosen),
                json.dumps(per_stage),
                snapshot["id"],
                str(out),
                created_by,
                eval_prompt_set,
                rebattle_set,
                plan.trained,
                plan.notes,
                json.dumps(launch) if launch is not None else None,
            ],
        )
    return get_run(store, run_id)


# ---------------------------------------------------------------- the re-battle's prompts


@dataclass
class RebattlePlan:
    """What a run's blind re-battle may sample, decided when the run is submitted."""

    trained: list[str]  # content hashes of the prompts this run's policy stages train on
    prompts: list[ImportedPrompt]  # the re-battle's prompts (none: no re-battle)
    source: str  # where they come from, kept as the prompt set's source
    notes: list[str]  # what the run says about it when it is submitted


def _snapshot_prompts(store: Store, snapshot_id: str) -> dict[str, dict[str, Any]]:
    """judgment id -> {prompt id, content hash, messages} of the prompts a snapshot's rows came from."""
    rows = store.query(
        "SELECT sj.judgment_id, p.id, p.content_hash, p.messages FROM snapshot_judgments sj"
        " JOIN judgments j ON j.id = sj.judgment_id JOIN tasks t ON t.id = j.task_id"
        " JOIN prompts p ON p.id = t.prompt_id WHERE sj.snapshot_id = ?",
        [snapshot_id],
    )
    return {r["judgment_id"]: r for r in rows}


def ancestors_trained(store: Store, version: str) -> set[str]:
    """Content hashes of every prompt that `version` or any of its ancestors was trained on
    (as far as the studio knows: runs it queued; a run from before the split was recorded
    counts with its whole snapshot)."""
    hashes: set[str] = set()
    seen: set[str] = set()
    name: str | None = version
    while name is not None and name not in seen:
        seen.add(name)
        v = store.model_version(name)
        run_id = (v.get("meta") or {}).get("run_id")
        if run_id:
            run = store.query("SELECT snapshot_id, trained_prompts FROM runs WHERE id = ?", [run_id])
            if run and run[0]["trained_prompts"] is not None:
                hashes |= set(run[0]["trained_prompts"])
            elif run:
                every = _snapshot_prompts(store, run[0]["snapshot_id"]).values()
                hashes |= {p["content_hash"] for p in every}
        name = v["parent"]
    return hashes


def rebattle_plan(
    store: Store,
    snapshot: dict[str, Any],
    stages: list[str],
    shares: dict[str, float],
    parent: str,
    eval_prompt_set: str | None = None,
) -> RebattlePlan:
    """The prompts the run's re-battle may use, split exactly as the trainers split the snapshot
    (trainers.common.held_out_keys over the Parquet rows they read): a prompt is held out only
    when every policy stage of the run holds it out, and never when the parent's lineage trained
    on it. With `eval_prompt_set`, that set's prompts instead, less any trained on."""
    import pyarrow.parquet as pq

    policy = [s for s in stages if s in POLICY_STAGES]
    if not policy:  # a reward model: no version to re-battle
        return RebattlePlan([], [], "", [])
    rows = pq.read_table(snapshot["path"]).to_pylist()  # what trainers.common.read_snapshot reads
    try:
        held: set[str] | None = None
        for s in policy:
            keys = held_out_keys(rows, shares.get(s, 0.0))
            held = keys if held is None else held & keys
    except TrainerError as exc:
        raise StoreError(str(exc)) from None
    held = held or set()
    source_of = _snapshot_prompts(store, snapshot["id"])
    trained: set[str] = set()
    kept: dict[str, dict[str, Any]] = {}
    for row in rows:
        prompt = source_of.get(row.get("judgment_id"))
        if prompt is None:
            continue
        if prompt_key(row) in held:
            kept[prompt["content_hash"]] = prompt
        else:
            trained.add(prompt["content_hash"])
    seen_before = trained | ancestors_trained(store, parent)
    if eval_prompt_set is not None:
        marked = store.query(
            "SELECT id, content_hash, messages FROM prompts WHERE set_name = ? ORDER BY position",
            [eval_prompt_set],
        )
        fresh = [p for p in marked if p["content_hash"] not in seen_before]
        if not fresh:
            raise StoreError(
                f"eval_prompt_set '{eval_prompt_set}': all {len(marked)} of its prompts are trained on by "
                "this run or the versions it starts from; mark a set of prompts the model has not seen"
            )
        dropped = len(marked) - len(fresh)
        source = f"prompt set {eval_prompt_set} (marked for evaluation)" + (
            f", less {dropped} prompt(s) trained on" if dropped else ""
        )
        return RebattlePlan(sorted(trained), _as_imported(fresh, eval_prompt_set), source, [])
    fresh = [p for h, p in sorted(kept.items()) if h not in seen_before]
    if not fresh:
        split = ", ".join(f"{s} {shares.get(s, 0.0):g}" for s in policy)
        why = (
            "ppo rolls out on every prompt of the snapshot"
            if "ppo" in policy
            else f"held_out is {split}"
            if not held
            else "every held-out prompt was trained on by an ancestor version"
        )
        note = (
            f"no held-out prompts for the blind re-battle ({why}): the new version gets no re-battle, "
            "so the gate holds it unless an engineer waives the re-battle. Set held_out above 0, or "
            "pass eval_prompt_set (a prompt set marked for evaluation)."
        )
        return RebattlePlan(sorted(trained), [], "", [note])
    split = ", ".join(f"{s} held_out {shares.get(s, 0.0):g}" for s in policy)
    source = f"held out of snapshot {snapshot['id']} ({split})"
    return RebattlePlan(sorted(trained), _as_imported(fresh, None), source, [])


def _as_imported(prompts: list[dict[str, Any]], set_name: str | None) -> list[ImportedPrompt]:
    out = []
    for p in prompts:
        messages = json.loads(p["messages"]) if isinstance(p["messages"], str) else p["messages"]
        where = f"prompt {p['id']}" + (f" of set {set_name}" if set_name else "")
        out.append(ImportedPrompt(where, messages, p["content_hash"], metadata={"from_prompt": p["id"]}))
    return out


def get_run(store: Store, run_id: str) -> dict[str, Any]:
    rows = store.query("SELECT * FROM runs WHERE id = ?", [run_id])
    if not rows:
        raise StoreError(f"run '{run_id}' does not exist; `studio runs list` shows the runs")
    return _run(rows[0])


def list_runs(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    rows = store.query("SELECT * FROM runs ORDER BY created_at DESC, id LIMIT ?", [limit])
    return [_run(r) for r in rows]


def _run(row: dict[str, Any]) -> dict[str, Any]:
    run = decode_json_columns(row, "recipes", "overrides", "metrics", "launch")
    trained = run.pop("trained_prompts", None)  # hashes: their count is what a person reads
    run["trained_prompt_count"] = None if trained is None else len(trained)
    run["notes"] = list(run.get("notes") or [])
    return run


def reward_models(store: Store) -> list[dict[str, Any]]:
    return [v for v in store.model_versions() if v["kind"] == "reward"]


def newest_reward_model(store: Store) -> str | None:
    found = reward_models(store)
    return found[-1]["name"] if found else None


def lineage(store: Store, version: str) -> list[dict[str, Any]]:
    """The chain from this version back to the base: each step's run, snapshot and judgment count."""
    chain = []
    name: str | None = camp.resolve_model(store, version)
    while name is not None:
        v = store.model_version(name)
        step: dict[str, Any] = {
            "version": v["name"],
            "kind": v["kind"],
            "parent": v["parent"],
            "source": v["source"],
        }
        run_id = (v.get("meta") or {}).get("run_id")
        if run_id:
            run = get_run(store, run_id)
            snap = decode_json_columns(
                store.query("SELECT * FROM snapshots WHERE id = ?", [run["snapshot_id"]])[0], "filter"
            )
            judged = store.query(
                "SELECT count(*) AS n FROM snapshot_judgments WHERE snapshot_id = ?", [snap["id"]]
            )
            stage = v["meta"].get("stage")
            step |= {
                "run": run_id,
                "stage": stage,
                "snapshot": snap["id"],
                "snapshot_hash": snap["content_hash"],
                "filter": snap["filter"],
                "judgments": judged[0]["n"],
                "metrics": (run.get("metrics") or {}).get(stage, {}),
            }
        chain.append(step)
        name = v["parent"]
    return chain


# ---------------------------------------------------------------- the stage advisor


def flag_rates(store: Store) -> dict[str, float | int]:
    rows = store.query("SELECT flags FROM judgments")
    shown = unsafe = refusal = 0
    for r in rows:
        flags = json.loads(r["flags"]) if isinstance(r["flags"], str) else (r["flags"] or {})
        for names in flags.values():
            shown += 1
            unsafe += "unsafe" in names
            refusal += "unhelpful_refusal" in names
    return {
        "judgments": len(rows),
        "unsafe_rate": unsafe / shown if shown else 0.0,
        "refusal_rate": refusal / shown if shown else 0.0,
    }


# Below this many ranked pairs the advisor says to label more first (see advise).
FEW_PAIRS = 300


def advise(store: Store) -> dict[str, Any]:
    """Recommend PPO or DPO from measured signals, and say why (the numbers are returned too).

    The rule of thumb practitioners give: PPO explores beyond the labelled answers and is the tool
    for shaping broad behaviour (unsafe answers, needless refusals), but only with a reward model
    that is right most of the time; DPO is cheaper and stabler and sets preferences directly from
    the pairs, and with noisy labels its robust loss is the safer choice.
    """
    signals: dict[str, Any] = flag_rates(store)
    signals["agreement_alpha"] = campaign_agreement(store, None)["krippendorff_alpha"]
    rm = newest_reward_model(store)
    signals["reward_model"] = rm
    signals["reward_model_accuracy"] = (
        (store.model_version(rm).get("meta") or {}).get("metrics", {}).get("heldout_accuracy") if rm else None
    )
    # Pairs the trainers learn from: ties and all-bad judgments give none. Few pairs is the one
    # shortfall no choice of stage makes up for, so it is said first, whatever the stage.
    signals["ranked_pairs"] = store.query(
        "SELECT count(*) AS n FROM judgment_pairs WHERE NOT is_tie AND NOT all_bad"
    )[0]["n"]
    behaviour = signals["unsafe_rate"] + signals["refusal_rate"]
    acc, alpha = signals["reward_model_accuracy"], signals["agreement_alpha"]
    if signals["judgments"] == 0:
        return {"stage": None, "why": "no judgments yet: label first, then train", "signals": signals}
    reasons = []
    if signals["ranked_pairs"] < FEW_PAIRS:
        reasons.append(
            f"only {signals['ranked_pairs']} ranked pairs (ties and all-bad judgments give none): in "
            "the demo's runs a reward model ordered 54% of held-out pairs after 114 pairs, 86% after "
            "622 and 93-97% after 1,234 (docs/demo.md): label more before training, to "
            f"{FEW_PAIRS} pairs at the least"
        )
    if alpha is not None and alpha < 0.4:
        reasons.append(
            f"annotators agree weakly (Krippendorff's alpha {alpha:.2f} < 0.40): the labels are noisy, "
            "so prefer DPO with loss_type robust over a reward model fitted to noise"
        )
        stage = "dpo"
    elif acc is None:
        reasons.append("there is no reward model yet, and PPO needs one: train the reward stage, or use DPO")
        stage = "dpo"
    elif acc < 0.7:
        reasons.append(
            f"the newest reward model is right on only {acc:.0%} of held-out pairs (< 70%): "
            "PPO would optimise its mistakes; use DPO, or label more and retrain it"
        )
        stage = "dpo"
    elif behaviour >= 0.1:
        reasons.append(
            f"{behaviour:.0%} of judged answers are flagged unsafe or unhelpful refusals and the reward "
            f"model is right on {acc:.0%}: shape the behaviour with PPO, then set it with DPO"
        )
        stage = "ppo_then_dpo"
    else:
        reasons.append(
            f"few behaviour flags ({behaviour:.0%}) and a reward model right on {acc:.0%}: the pairs "
            "already say what is wanted; DPO sets it directly and costs a fraction of PPO"
        )
        stage = "dpo"
    return {"stage": stage, "why": "; ".join(reasons), "signals": signals}
