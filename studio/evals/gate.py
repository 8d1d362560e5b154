"""The promotion gate: one documented policy (data/gate.yaml) and one pure decision function.

A version passes when the blind re-battle decided it better than the version it was compared
against (or an engineer waived that), and no guard metric regressed past its tolerance. Rates
are fractions, so "5 points" is 0.05. The decision uses the measured delta, not its interval:
the interval is shown beside it so that a person can see how sure the number is.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

GATE_FILE = Path(__file__).resolve().parents[2] / "data" / "gate.yaml"

# what the re-battle said about the version against the one it was compared with
VERDICTS = ("better", "worse", "undecided", "none")


@dataclass(frozen=True)
class Guard:
    metric: str
    direction: str  # "up": the metric must not rise by more than the tolerance; "down": not fall
    tolerance: float
    suite: str  # the suite that measures it, named in the reason when it was not measured


@dataclass(frozen=True)
class GateConfig:
    """The promotion policy. Each field is documented in data/gate.yaml beside its value."""

    require_rebattle: bool = True  # the blind re-battle must decide the version better (or be waived)
    max_refusal_rate_increase: float | None = 0.05  # refusal_rate may rise by at most this (5 points)
    max_capability_drop: float | None = 0.02  # capability_accuracy may fall by at most this (2 points)
    max_factual_drop: float | None = 0.03  # factual_accuracy may fall by at most this (3 points)
    max_consistency_drop: float | None = 0.05  # consistency may fall by at most this
    max_safe_refusal_drop: float | None = None  # safe_refusal_rate may fall by at most this (off)
    max_instruction_drop: float | None = None  # instruction_following may fall by at most this (off)
    auto_promote: bool = True  # move `policy` to a version that passes, by itself
    guard_against_root: bool = True  # the guards hold against the lineage's root as well

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("max_") and value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                    raise ValueError(
                        f"gate setting {f.name}={value!r}: use a number from 0 to 1 (a share: 0.05 is "
                        "5 points), or null to switch the guard off"
                    )
            elif not f.name.startswith("max_") and not isinstance(value, bool):
                raise ValueError(f"gate setting {f.name}={value!r}: use true or false")

    def guards(self) -> list[Guard]:
        """The guards that are switched on, in the order the reasons list them."""
        table = [
            ("refusal_rate", "up", self.max_refusal_rate_increase, "refusal"),
            ("capability_accuracy", "down", self.max_capability_drop, "capability"),
            ("factual_accuracy", "down", self.max_factual_drop, "factual"),
            ("consistency", "down", self.max_consistency_drop, "consistency"),
            ("safe_refusal_rate", "down", self.max_safe_refusal_drop, "refusal"),
            ("instruction_following", "down", self.max_instruction_drop, "instructions"),
        ]
        return [Guard(m, d, float(t), s) for m, d, t, s in table if t is not None]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_gate_config(path: Path | str | None = None) -> GateConfig:
    """Read the gate policy from YAML (data/gate.yaml by default); unknown keys are refused."""
    path = Path(path) if path is not None else GATE_FILE
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ValueError(f"gate config {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"gate config {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"gate config {path}: expected a mapping of settings")
    known = {f.name for f in fields(GateConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"gate config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return GateConfig(**raw)
    except ValueError as exc:
        raise ValueError(f"gate config {path}: {exc}") from None


def _points(x: float) -> str:
    return f"{x * 100:.1f} points"


def gate_decision(
    metrics: dict[str, dict[str, Any]],
    rebattle_verdict: str | None,
    config: GateConfig | None = None,
    waived: bool = False,
) -> dict[str, Any]:
    """Decide whether a version may be promoted. Pure: no store, no clock.

    `metrics` is the "metrics" of an evaluation ({NAME: {"version", "against", "delta", "ci"}});
    `rebattle_verdict` is one of VERDICTS ("better": the re-battle decided the version better;
    "worse"; "undecided": it ended without a winner; "none" or None: no re-battle verdict yet).
    `waived` is an engineer's waiver of the re-battle requirement. Returns {"passed", "reasons"};
    each reason names one failing rule with its numbers. A guard whose metric was not measured
    fails: the gate passes only on evidence.
    """
    config = config or GateConfig()
    verdict = rebattle_verdict or "none"
    if verdict not in VERDICTS:
        raise ValueError(f"rebattle_verdict {rebattle_verdict!r}: use one of {', '.join(VERDICTS)}")
    reasons: list[str] = []
    if config.require_rebattle and not waived and verdict != "better":
        reasons.append(
            {
                "worse": "re-battle: the blind re-battle decided the version worse than the other one",
                "undecided": "re-battle: the blind re-battle ended without deciding the version better",
                "none": "re-battle: no verdict yet (the blind re-battle has not decided the version better)",
            }[verdict]
            + "; an engineer may waive this"
        )
    for guard in config.guards():
        m = metrics.get(guard.metric)
        if m is None:
            reasons.append(f"{guard.metric}: not measured; run the '{guard.suite}' suite")
            continue
        delta = float(m["delta"])
        before, after = float(m["against"]), float(m["version"])
        ci = m.get("ci") or [delta, delta]
        shown = f"{before:.3f} -> {after:.3f}, 95% interval of the change [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        if guard.metric == "consistency":
            if delta < -guard.tolerance:
                reasons.append(
                    f"consistency: down {-delta:.3f} ({shown}), more than the allowed {guard.tolerance:.3f}"
                )
        elif guard.direction == "up" and delta > guard.tolerance:
            reasons.append(
                f"{guard.metric}: up {_points(delta)} ({shown}), more than the allowed "
                f"{_points(guard.tolerance)}"
            )
        elif guard.direction == "down" and delta < -guard.tolerance:
            reasons.append(
                f"{guard.metric}: down {_points(-delta)} ({shown}), more than the allowed "
                f"{_points(guard.tolerance)}"
            )
    return {"passed": not reasons, "reasons": reasons}


_BEATS = re.compile(r"^\s*(\S+) beats (\S+?)[:\s]")


def rebattle_verdict(store: Any, version: str, against: str) -> str:
    """What the newest finished two-version battle campaign of these versions said.

    Reads `battle_campaigns.verdict`, which arena.check_stop writes as "X beats Y: ..." when the
    interval decides, or "budget ... spent without a clear winner". Returns one of VERDICTS.
    """
    rows = store.query(
        "SELECT b.verdict FROM battle_campaigns b JOIN campaigns c ON c.name = b.name"
        " WHERE list_contains(b.versions, ?) AND list_contains(b.versions, ?)"
        " AND len(list_distinct(b.versions)) = 2"
        " ORDER BY (b.verdict IS NULL), c.created_at DESC",
        [version, against],
    )
    for row in rows:
        text = row["verdict"]
        if not text:
            continue
        found = _BEATS.match(text)
        if found is None:
            return "undecided"
        winner, loser = found.group(1), found.group(2)
        if (winner, loser) == (version, against):
            return "better"
        if (winner, loser) == (against, version):
            return "worse"
        return "undecided"
    return "none"
