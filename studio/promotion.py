"""Promotion: the gate decides where `policy` points, and every move of an alias is recorded.

A trained version is measured twice against its parent: an evaluation (studio/evals, the guard
metrics) and a blind re-battle on prompts it was not trained on (studio/arena, whose stopping
rule records a verdict). Whichever of the two finishes second calls `decide`, which applies the
gate (data/gate.yaml, `studio.evals.gate`): when the re-battle decided the version better and
every guard holds, `policy` moves to it by itself (unless `auto_promote` is off); otherwise the
version is held, with the gate's reasons. A person's `promote` is refused while the gate does
not pass, unless forced; a forced promotion records who forced it. Roll-backs are recorded the
same way. Every decision is a row of `promotions` (migration 008).

`decide` moves `policy` only from a version it was shown better than: the version's parent, or,
when `policy` points at an older ancestor (a parent that was never promoted: PPO held, then DPO
trained on top of it), that ancestor, once the version has its own complete evaluation and
re-battle verdict against it. When `policy` points elsewhere, or a person already promoted or
rolled back the version, the gate records a hold and leaves the alias to people.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from studio import campaigns as camp
from studio.evals import engine
from studio.evals import gate as gating
from studio.store import Store, StoreError, decode_json_columns, new_id

log = logging.getLogger(__name__)
GATE = "gate"  # `decided_by` of the gate's own decisions
# One decision at a time: the evaluation worker and a vote may both finish the evidence at once,
# and a person may press Promote meanwhile; each must see the others' rows.
_DECIDE_LOCK = threading.RLock()


class PromotionRefused(StoreError):
    """The gate did not pass and the promotion was not forced: the message names every reason."""


# -- the evidence ---------------------------------------------------------------------------------
def latest_evaluation(
    store: Store, version: str, against: str, complete: bool = True
) -> dict[str, Any] | None:
    """The newest evaluation of `version` against `against`; with `complete`, the newest that
    succeeded on every item (an evaluation with `limit` is a quick look, not evidence)."""
    rows = store.query(
        "SELECT id, status, settings FROM evals WHERE version = ? AND against = ?"
        " ORDER BY created_at DESC, id DESC",
        [version, against],
    )
    for row in rows:
        settings = decode_json_columns(row, "settings")["settings"] or {}
        if not complete or (row["status"] == "succeeded" and settings.get("limit") is None):
            return engine.get_eval(store, row["id"])
    return None


def rebattle_campaign(store: Store, version: str, against: str) -> dict[str, Any] | None:
    """The two-version battle campaign whose verdict the gate reads (as `gate.rebattle_verdict`
    picks it: the newest decided one, else the newest open one), or None."""
    rows = store.query(
        "SELECT b.name, b.verdict, b.budget, c.status, c.prompt_set FROM battle_campaigns b"
        " JOIN campaigns c ON c.name = b.name"
        " WHERE list_contains(b.versions, ?) AND list_contains(b.versions, ?)"
        " AND len(list_distinct(b.versions)) = 2"
        " ORDER BY (b.verdict IS NULL), c.created_at DESC",
        [version, against],
    )
    return rows[0] if rows else None


def ancestors(store: Store, version: str) -> list[str]:
    """The versions `version` descends from, its parent first, the root last."""
    found: list[str] = []
    parent = store.model_version(version)["parent"]
    while parent is not None and parent not in found:  # a cycle cannot be stored; guard anyway
        found.append(parent)
        parent = store.model_version(parent)["parent"]
    return found


def gate_state(
    store: Store, version: str, config: gating.GateConfig | None = None, against: str | None = None
) -> dict[str, Any]:
    """Where the gate stands on `version` now: {version, parent, against, passed, reasons, ready,
    eval_id, battle_campaign, verdict, waived}. `ready`: the evidence the gate waits for is in
    (a complete evaluation against `against`, and the re-battle's verdict when one is open).
    `against` is the parent unless another ancestor is named (see `decide`). A version without
    a parent (the base) is the reference: nothing to pass."""
    config = config or gating.load_gate_config()
    v = store.model_version(version)
    parent = v["parent"]
    against = against or parent
    state: dict[str, Any] = {
        "version": v["name"],
        "parent": parent,
        "against": against,
        "eval_id": None,
        "battle_campaign": None,
        "verdict": None,
        "waived": False,
        "auto_promote": config.auto_promote,
    }
    if parent is None:
        return state | {"passed": True, "reasons": [], "ready": False, "root": True}
    evaluation = latest_evaluation(store, v["name"], against)
    campaign = rebattle_campaign(store, v["name"], against)
    verdict = gating.rebattle_verdict(store, v["name"], against)
    waived = bool(evaluation and (evaluation["settings"] or {}).get("waived"))
    state |= {
        "eval_id": evaluation["id"] if evaluation else None,
        "battle_campaign": campaign["name"] if campaign else None,
        "verdict": verdict,
        "waived": waived,
        "root": False,
    }
    metrics = (evaluation["result"] or {}).get("metrics", {}) if evaluation else {}
    decision = gating.gate_decision(metrics, verdict, config, waived=waived)
    reasons = list(decision["reasons"])
    if evaluation is None:
        pending = latest_evaluation(store, v["name"], against, complete=False)
        status = ""
        if pending is not None:
            limit = (pending["settings"] or {}).get("limit")
            done = f"ran only {limit} items per suite" if limit and pending["status"] == "succeeded" else None
            status = f" (the newest, {pending['id']}, {done or pending['status']})"
        # without an evaluation every guard reads "not measured": say the one thing to do
        reasons = [r for r in reasons if r.startswith("re-battle:")]
        whom, flag = ("its parent ", "") if against == parent else ("", f" --against {against}")
        reasons.insert(
            0,
            f"evaluation: no complete evaluation against {whom}{against} yet{status}; "
            f"run `studio eval {v['name']}{flag}`",
        )
    if campaign is None:
        why = "its run had no held-out prompts; see the run's notes" if against == parent else "none asked"
        reasons = [
            f"re-battle: none was opened against {against} ({why}); an engineer may waive this"
            if r.startswith("re-battle: no verdict yet")
            else r
            for r in reasons
        ]
    open_battle = campaign is not None and verdict == "none"
    waits_for_battle = open_battle and config.require_rebattle and not waived
    root_reasons, root_ready = _guards_against_root(store, v["name"], against, config, state)
    return state | {
        "passed": not reasons and not root_reasons,
        "reasons": reasons + root_reasons,
        "ready": evaluation is not None and root_ready and not waits_for_battle,
    }


def _guards_against_root(
    store: Store, version: str, against: str, config: gating.GateConfig, state: dict[str, Any]
) -> tuple[list[str], bool]:
    """The guards on `version`'s evaluation against its lineage's root, when the gate asks for
    them (`guard_against_root`) and the root is not already the version it is judged against:
    (reasons, whether that evaluation is in). Sets state["root_eval_id"] when it is."""
    root = engine.lineage_root(store, version)
    if not config.guard_against_root or root in (version, against):
        return [], True
    evaluation = latest_evaluation(store, version, root)
    if evaluation is None:
        return [
            f"guards against {root}, the lineage's root: no complete evaluation against {root} yet; "
            f"run `studio eval {version} --against {root}` (the tolerances hold against the root "
            "too, so that they do not add up along the chain; data/gate.yaml)"
        ], False
    state["root_eval_id"] = evaluation["id"]
    metrics = (evaluation["result"] or {}).get("metrics", {})
    # the guards only: the re-battle that counts is the one against `against`
    decision = gating.gate_decision(metrics, None, config, waived=True)
    return [f"against {root}, the lineage's root: {reason}" for reason in decision["reasons"]], True


def _over_incumbent(
    store: Store, state: dict[str, Any], incumbent: str | None, config: gating.GateConfig | None = None
) -> dict[str, Any] | None:
    """The gate's state on `state`'s version against `incumbent` (where an alias points) when that
    is an ancestor older than the parent (the parent was never promoted), else None."""
    if (
        incumbent is None
        or incumbent == state["parent"]
        or incumbent not in ancestors(store, state["version"])
    ):
        return None
    return gate_state(store, state["version"], config, against=incumbent)


# -- recording ------------------------------------------------------------------------------------
def _record(
    store: Store,
    action: str,
    alias: str,
    version: str,
    from_version: str | None,
    decided_by: str,
    *,
    forced: bool = False,
    passed: bool | None = None,
    reasons: list[str] | None = None,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    state = state or {}
    row_id = "promo-" + new_id()[:12]
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO promotions (id, action, alias, version, from_version, decided_by, forced, passed,"
            " reasons, eval_id, battle_campaign, verdict, root_eval_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                row_id,
                action,
                alias,
                version,
                from_version,
                decided_by,
                forced,
                passed,
                json.dumps(reasons or []),
                state.get("eval_id"),
                state.get("battle_campaign"),
                state.get("verdict"),
                state.get("root_eval_id"),
            ],
        )
    return history(store, row_id=row_id)[0]


def history(
    store: Store, version: str | None = None, *, row_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Promotion records, newest first: all, one, or those concerning `version` (decided on it,
    or moving an alias away from it)."""
    rows = store.query(
        "SELECT * FROM promotions WHERE (? IS NULL OR id = ?)"
        " AND (? IS NULL OR version = ? OR from_version = ?) ORDER BY decided_at DESC, id DESC LIMIT ?",
        [row_id, row_id, version, version, version, limit],
    )
    return [decode_json_columns(r, "reasons") for r in rows]


def _move(store: Store, alias: str, version: str) -> str | None:
    before = camp.aliases(store).get(alias)
    camp.set_alias(store, alias, version)
    return before


# -- the gate's decision --------------------------------------------------------------------------
def decide(store: Store, version: str, config: gating.GateConfig | None = None) -> dict[str, Any] | None:
    """Apply the gate to `version` once its evidence is in; record and return the decision.

    Called when an evaluation finishes and when a battle verdict is recorded: whichever comes
    second decides. Returns None while the evidence is incomplete (or for a root version). The
    same evidence decides once: calling again returns the recorded decision."""
    config = config or gating.load_gate_config()
    with _DECIDE_LOCK:
        state = gate_state(store, version, config)
        policy = camp.aliases(store).get(camp.POLICY)
        over = _over_incumbent(store, state, policy, config)
        # the evidence against the version this one would replace decides once it is all in (an
        # evaluation against it alone is no request to replace it: a duel or a waiver is)
        if over is not None and over["ready"] and (over["battle_campaign"] or over["waived"]):
            state = over
        if state["root"] or not state["ready"]:
            return None
        name, parent, against = state["version"], state["parent"], state["against"]
        done = store.query(
            "SELECT id FROM promotions WHERE decided_by = ? AND version = ?"
            " AND eval_id IS NOT DISTINCT FROM ? AND battle_campaign IS NOT DISTINCT FROM ?"
            " AND verdict IS NOT DISTINCT FROM ? AND root_eval_id IS NOT DISTINCT FROM ?",
            [GATE, name, *(state.get(k) for k in ("eval_id", "battle_campaign", "verdict", "root_eval_id"))],
        )
        if done:
            return history(store, row_id=done[0]["id"])[0]
        people = store.query(
            "SELECT decided_by, action FROM promotions WHERE decided_by <> ?"
            " AND (version = ? OR from_version = ?) ORDER BY decided_at DESC LIMIT 1",
            [GATE, name, name],
        )
        notes = [f"re-battle waived in evaluation {state['eval_id']}"] if state["waived"] else []
        if against != parent:
            notes.append(f"judged against {against}, where {camp.POLICY} points, not its parent {parent}")
        if state["passed"]:
            if not config.auto_promote:
                why = "the gate passed; auto_promote is off (data/gate.yaml), so a person promotes it"
            elif people:
                why = (
                    f"the gate passed, but {people[0]['decided_by']} already chose for this version "
                    f"({people[0]['action']}); the gate does not overrule a person"
                )
            elif policy != against:
                why = (
                    f"the gate passed against {parent}, but {camp.POLICY} points at {policy}, not at "
                    f"{parent}; promote it by hand if it should replace {policy}"
                )
                if policy in ancestors(store, name):
                    why += (
                        f", or evaluate and re-battle it against {policy}: with that evidence the "
                        f"gate decides over {policy} itself"
                    )
            else:
                before = _move(store, camp.POLICY, name)
                log.info("the gate promoted %s (policy was %s)", name, before)
                return _record(
                    store, "promote", camp.POLICY, name, before, GATE, passed=True, reasons=notes, state=state
                )
            return _record(
                store,
                "hold",
                camp.POLICY,
                name,
                None,  # a hold moves nothing
                GATE,
                passed=True,
                reasons=[why, *notes],
                state=state,
            )
        log.info("the gate holds %s: %s", name, "; ".join(state["reasons"]))
        return _record(
            store,
            "hold",
            camp.POLICY,
            name,
            None,
            GATE,
            passed=False,
            reasons=state["reasons"],
            state=state,
        )


def after_verdict(store: Store, campaign: str) -> list[dict[str, Any]]:
    """A battle campaign recorded its verdict: decide each of its versions that descends from the
    other (the re-battle of a trained version against its parent, or a duel with an older
    ancestor that `policy` may still point at)."""
    row = store.query("SELECT versions FROM battle_campaigns WHERE name = ?", [campaign])
    if not row:
        return []
    names = list(dict.fromkeys(row[0]["versions"]))
    decided = []
    for name in names:
        try:
            older = ancestors(store, name)
        except StoreError:
            continue  # an alias in a hand-made campaign: not a trained version's re-battle
        if any(other in older for other in names):
            found = decide(store, name)
            if found is not None:
                decided.append(found)
    return decided


def after_verdict_quietly(store: Store, campaign: str) -> None:
    """`after_verdict` for the vote path: a failing decision is logged, the vote still counts."""
    try:
        after_verdict(store, campaign)
    except Exception:
        log.exception("the gate could not decide after the verdict of campaign %s", campaign)


# -- people's actions -----------------------------------------------------------------------------
def promote(store: Store, version: str, alias: str, by: str, force: bool = False) -> dict[str, Any]:
    """A person points `alias` at `version`. Refused while the gate does not pass, naming every
    reason with its numbers, unless `force`; the record says who did it and whether it was forced."""
    with _DECIDE_LOCK:
        state = gate_state(store, version)
        if not state["passed"]:
            over = _over_incumbent(store, state, camp.aliases(store).get(alias))  # as `decide` judges
            if over is not None and over["passed"]:
                state = over
        if store.model_version(state["version"])["kind"] == "reward":  # no gate or force changes this
            raise StoreError(
                f"version '{state['version']}' is a reward model; only policy versions can be promoted"
            )
        if not state["passed"] and not force:
            raise PromotionRefused(
                f"version '{state['version']}' may not be promoted to {alias}: its gate did not pass: "
                + "; ".join(state["reasons"])
                + '. Promote it anyway with --force (REST: "force": true; Models tab: tick \'Promote '
                "although the gate did not pass'); who forced it is recorded."
            )
        before = _move(store, alias, state["version"])
        record = _record(
            store,
            "promote",
            alias,
            state["version"],
            before,
            by,
            forced=not state["passed"],
            passed=state["passed"],
            reasons=state["reasons"],
            state=state,
        )
    return {
        "alias": alias,
        "version": state["version"],
        "previous": before,
        "forced": record["forced"],
        "reasons": state["reasons"],
        "record": record["id"],
    }


def rollback(store: Store, alias: str, by: str) -> dict[str, Any]:
    """A person points `alias` back at the parent of the version it points at; recorded."""
    with _DECIDE_LOCK:
        known = camp.aliases(store)
        if alias not in known:
            raise StoreError(f"alias '{alias}' does not exist (known: {', '.join(known) or 'none'})")
        current = store.model_version(known[alias])
        if not current["parent"]:
            raise StoreError(f"{alias} is at '{current['name']}', which has no parent to roll back to")
        _move(store, alias, current["parent"])
        record = _record(store, "rollback", alias, current["parent"], current["name"], by)
    return {"alias": alias, "version": current["parent"], "previous": current["name"], "record": record["id"]}


# -- evaluations that feed the gate ----------------------------------------------------------------
def start_evaluation(
    store: Store, backend: Any, version: str, against: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`evals.start_eval`, and when it succeeds the gate decides on the version (if it was
    compared with one of its ancestors, its parent or an older one `policy` may point at: `decide`
    reads only such evaluations)."""

    def done(eval_id: str) -> None:
        record = engine.get_eval(store, eval_id)
        if record["against"] in ancestors(store, record["version"]):
            decide(store, record["version"])

    return engine.start_eval(store, backend, version, against, on_done=done, **kwargs)


def evaluate_new_version(studio: Any, version: str, parent: str, created_by: str) -> dict[str, Any] | None:
    """Queue the evaluation of a version a run just registered against its parent (the default
    suites and seed, so the parent's stored runs are reused), and, when the gate holds the guards
    against the lineage's root as well, against the root after it (its suite runs are the ones
    just made and the root's, both stored: no new sampling). Never fails the run: when one cannot
    start, the gate records a hold saying why."""
    store: Store = studio.store
    against = [parent]
    root = engine.lineage_root(store, version)
    if root not in (version, parent) and gating.load_gate_config().guard_against_root:
        against.append(root)
    backend = getattr(studio, "backend", None)
    first = None
    for other in against:
        try:
            if backend is None:
                raise engine.EvalError("no model server to evaluate on")
            started = start_evaluation(store, backend, version, other, created_by=created_by)
        except Exception as exc:
            what = f"the automatic evaluation of {version} against {other} could not start"
            if isinstance(exc, engine.EvalError):  # a known cause (no model server...): it says it all
                log.warning("%s: %s", what, exc)
            else:
                log.exception(what)
            flag = "" if other == parent else f" --against {other}"
            reason = (
                f"evaluation: the automatic evaluation against {other} could not start ({exc}); "
                f"start it with `studio eval {version}{flag}`"
            )
            _record(store, "hold", camp.POLICY, version, None, GATE, passed=False, reasons=[reason])
            return first
        first = first or started
    return first


# -- the version card -----------------------------------------------------------------------------
def _gate_shown(store: Store, version: str) -> dict[str, Any]:
    """The gate's state as a card shows it: against the version the gate last judged `version`
    against. That is the parent, unless `decide` judged it against an older ancestor `policy`
    pointed at (PPO held, DPO over it judged against base): then the parent's state would say
    "does not pass" beside the gate's own promotion (full run 12, docs/demo.md)."""
    rows = store.query(
        "SELECT e.against FROM promotions p JOIN evals e ON e.id = p.eval_id"
        " WHERE p.decided_by = ? AND p.version = ? ORDER BY p.decided_at DESC, p.id DESC LIMIT 1",
        [GATE, version],
    )
    # None: the parent, as before any decision
    return gate_state(store, version, against=rows[0]["against"] if rows else None)


def card(store: Store, version: str) -> dict[str, Any]:
    """Everything about one version for the Models tab, REST and notebooks: its metrics beside its
    parent's (delta and interval), the re-battle (votes, win rate with its interval, verdict), the
    gate's state and decisions, the promotion history and the lineage."""
    from studio import arena, training  # arena brings scipy; the card is not on a hot path

    name = camp.resolve_model(store, version)
    v = store.model_version(name)
    parent = v["parent"]
    out: dict[str, Any] = {
        "version": name,
        "kind": v["kind"],
        "parent": parent,
        "source": v["source"],
        "created_at": v["created_at"],
        "aliases": sorted(a for a, target in camp.aliases(store).items() if target == name),
        "evaluation": None,
        "evaluations": [],
        "metrics": [],
        "rebattle": None,
        "gate": _gate_shown(store, name),
        "promotions": history(store, name),
        "lineage": training.lineage(store, name),
    }
    out["evaluations"] = [
        {k: e[k] for k in ("id", "against", "status", "suites", "created_at", "finished_at", "error")}
        for e in engine.list_evals(store, name, limit=20)
    ]
    if parent is None:
        return out
    shown = latest_evaluation(store, name, parent) or latest_evaluation(store, name, parent, complete=False)
    if shown is not None:
        out["evaluation"] = {
            k: shown[k] for k in ("id", "status", "suites", "seed", "created_at", "finished_at", "error")
        } | {
            "limit": (shown["settings"] or {}).get("limit"),
            "gate_then": (shown["result"] or {}).get("gate"),
        }
        metrics = (shown["result"] or {}).get("metrics", {})
        out["metrics"] = [{"metric": m, **metrics[m]} for m in sorted(metrics)]
    campaign = rebattle_campaign(store, name, parent)
    if campaign is not None:
        duel = arena.two_version_duel(store, campaign["name"])
        battle: dict[str, Any] = {
            "campaign": campaign["name"],
            "status": campaign["status"],
            "prompt_set": campaign["prompt_set"],
            "budget": campaign["budget"],
            "verdict": campaign["verdict"],
            "votes": 0,
        }
        if duel is not None:
            mine = duel["x"] == name  # the duel's p is P(x wins a decisive vote); say it for this version
            battle |= {
                "votes": duel["wins"] + duel["losses"] + duel["ties"],
                "wins": duel["wins"] if mine else duel["losses"],
                "losses": duel["losses"] if mine else duel["wins"],
                "ties": duel["ties"],
                "win_rate": duel["p"] if mine else 1 - duel["p"],
                "interval": [duel["lower"], duel["upper"]]
                if mine
                else [1 - duel["upper"], 1 - duel["lower"]],
                "alpha": duel["alpha"],
                "decided": duel["decided"],
                "rule": duel["rule"],
            }
        out["rebattle"] = battle
    return out
