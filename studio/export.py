"""Export judgments as datasets a TRL trainer loads as they are.

Kinds (TRL's dataset formats, conversational with an explicit prompt):
- preference: prompt / chosen / rejected, plus `margin` from preference strength.
  Every strictly ordered pair of a judgment becomes a row. Tied pairs carry no
  preference and are left out, and counted in the card. "All bad" judgments
  give no pairs (they go to `unpaired`).
- unpaired: prompt / completion / label (KTO-style). The best-ranked completions
  are True and the worst-ranked False; every completion of an "all bad"
  judgment, and every completion flagged unsafe or hallucination, is False.
- sft: messages (prompt + assistant answer): edited ideals first, then top
  choices (rank 1 in a judgment that is not "all bad" and not flagged).
- judgments: one row per judgment as it was given, for analysis rather than training
  (notebooks/annotator_agreement.ipynb): the completions in the order shown with their
  ranks (ties and "all bad" kept), strength, flags per completion, task, annotator and time
  taken. Agreement and position/length bias are computed from these rows exactly as
  studio.quality computes them from the database.

Formats: a `datasets` save_to_disk folder, Parquet, or JSONL, with a data card
(card.json + README.md in a folder; PATH.card.json / PATH.card.md beside a file).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from studio.campaigns import get_campaign
from studio.quality import annotator_quality, campaign_agreement
from studio.store import Store, StoreError

KINDS = ("preference", "unpaired", "sft", "judgments")
FORMATS = ("datasets", "parquet", "jsonl")
# Margin per strength, after Llama 2's reward-model margins (Touvron et al. 2023):
# a stronger stated preference asks the reward model for a larger score gap.
MARGINS = {None: 0.0, 1: 1 / 3, 2: 2 / 3, 3: 1.0}
NEGATIVE_FLAGS = {"unsafe", "hallucination"}


def _load(store: Store, campaign: str | None) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    if campaign is not None:
        get_campaign(store, campaign)  # a clear error for an unknown campaign
    judgments = store.query(
        "SELECT j.*, t.prompt_id, t.model_version FROM judgments j JOIN tasks t ON t.id = j.task_id"
        " WHERE ? IS NULL OR j.campaign = ? ORDER BY j.submitted_at, j.id",
        [campaign, campaign],
    )
    gen_ids = sorted({g for j in judgments for g in j["generation_ids"]})
    gens = {g["id"]: g for g in store.generations(gen_ids)}
    for j in judgments:
        j["flags"] = json.loads(j["flags"]) if isinstance(j["flags"], str) else j["flags"]
    return judgments, gens


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def build_rows(store: Store, kind: str, campaign: str | None = None) -> tuple[list[dict[str, Any]], dict]:
    if kind not in KINDS:
        raise StoreError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    judgments, gens = _load(store, campaign)
    rows: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    seen_sft: set[tuple[str, str]] = set()
    for j in judgments:
        prompt = gens[j["generation_ids"][0]]["messages"]
        shown = list(zip(j["generation_ids"], j["ranks"], strict=True))
        meta = {
            "judgment_id": j["id"],
            "campaign": j["campaign"],
            "annotator": j["annotator"],
            "model_version": j["model_version"],
        }
        counts["judgments"] += 1
        counts["all_bad_judgments"] += bool(j["all_bad"])
        flagged = {g for g, names in j["flags"].items() if names}
        if kind == "preference":
            if j["all_bad"]:
                continue
            for a, (ga, ra) in enumerate(shown):
                for gb, rb in shown[a + 1 :]:
                    if ra == rb:
                        counts["tied_pairs_left_out"] += 1
                        continue
                    (gc, rc), (gr, rr) = ((ga, ra), (gb, rb)) if ra < rb else ((gb, rb), (ga, ra))
                    rows.append(
                        {
                            "prompt": prompt,
                            "chosen": _assistant(gens[gc]["text"]),
                            "rejected": _assistant(gens[gr]["text"]),
                            "margin": MARGINS[j["strength"]],
                            "chosen_id": gc,
                            "rejected_id": gr,
                            "chosen_rank": rc,
                            "rejected_rank": rr,
                            **meta,
                        }
                    )
        elif kind == "judgments":
            rows.append(
                {
                    "prompt": prompt,
                    "completions": [gens[g]["text"] for g in j["generation_ids"]],
                    "generation_ids": list(j["generation_ids"]),
                    "ranks": list(j["ranks"]),
                    "all_bad": bool(j["all_bad"]),
                    "strength": j["strength"],
                    # aligned with `completions`: a dict keyed by generation id would be a
                    # different struct per row in Arrow
                    "flags": [list(j["flags"].get(g, [])) for g in j["generation_ids"]],
                    "rationale": j["rationale"],
                    "edited_text": j["edited_text"],
                    "task_id": j["task_id"],
                    "prompt_id": j["prompt_id"],
                    "duration_ms": j["duration_ms"],
                    "submitted_at": j["submitted_at"].isoformat(),
                    **meta,
                }
            )
        elif kind == "unpaired":
            worst = max(r for _, r in shown)
            for g, r in shown:
                bad_flag = bool(set(j["flags"].get(g, [])) & NEGATIVE_FLAGS)
                if j["all_bad"] or bad_flag or (r == worst and worst > 1):
                    label = False
                elif r == 1:
                    label = True
                else:
                    continue  # the middle of a ranking says nothing absolute
                rows.append(
                    {
                        "prompt": prompt,
                        "completion": _assistant(gens[g]["text"]),
                        "label": label,
                        "generation_id": g,
                        **meta,
                    }
                )
        else:  # sft
            candidates = []
            if j["edited_text"]:
                candidates.append((j["edited_text"], "edited"))
            if not j["all_bad"]:
                candidates += [
                    (gens[g]["text"], "top_choice") for g, r in shown if r == 1 and g not in flagged
                ]
            for text, source in candidates:
                key = (json.dumps(prompt, sort_keys=True), text)
                if key in seen_sft:
                    continue
                seen_sft.add(key)
                rows.append(
                    {"messages": [*prompt, {"role": "assistant", "content": text}], "source": source, **meta}
                )
    counts["rows"] = len(rows)
    return rows, dict(counts)


def data_card(
    store: Store, kind: str, campaign: str | None, rows: list[dict[str, Any]], counts: dict[str, int]
) -> dict[str, Any]:
    return {
        "kind": kind,
        "campaign_filter": campaign,
        "counts": counts,
        "campaigns": sorted({r["campaign"] for r in rows}),
        "model_versions": sorted({r["model_version"] for r in rows}),
        "annotators": sorted({r["annotator"] for r in rows}),
        "agreement": campaign_agreement(store, campaign),
        "annotator_quality": annotator_quality(store, campaign),
        "ties": "tied pairs carry no preference: left out of preference rows, counted in "
        "counts.tied_pairs_left_out; all-bad judgments appear only in unpaired rows (label False)",
        "format_notes": {
            "preference": "TRL preference, conversational, explicit prompt: prompt/chosen/rejected + margin",
            "unpaired": "TRL unpaired preference: prompt/completion/label",
            "sft": "TRL conversational language modeling: messages",
            "judgments": "one row per judgment, for analysis: completions in the order shown, ranks "
            "(1 best, equal = tie), all_bad, strength, flags per completion, annotator, task_id",
        }[kind],
    }


def _card_markdown(card: dict[str, Any]) -> str:
    lines = [
        f"# Preference Studio export: {card['kind']}",
        "",
        f"- format: {card['format_notes']}",
        f"- campaigns: {', '.join(card['campaigns']) or '-'}",
        f"- model versions: {', '.join(card['model_versions']) or '-'}",
        f"- annotators: {', '.join(card['annotators']) or '-'}",
        "",
        "## Counts",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in sorted(card["counts"].items())]
    lines += ["", "## Agreement", ""] + [f"- {k}: {v}" for k, v in card["agreement"].items()]
    lines += ["", "## Annotators", ""] + [
        f"- {q['annotator']}: " + ", ".join(f"{k} {v}" for k, v in q.items() if k != "annotator")
        for q in card["annotator_quality"]
    ]
    lines += ["", "## Ties", "", card["ties"], ""]
    return "\n".join(lines)


def format_for(path: Path) -> str:
    """The export format a path asks for: by its suffix, else a datasets folder."""
    return {".parquet": "parquet", ".jsonl": "jsonl"}.get(Path(path).suffix, "datasets")


def write_export(
    store: Store, out: Path, kind: str = "preference", fmt: str | None = None, campaign: str | None = None
) -> dict[str, Any]:
    """Write rows and the card. Written to a temporary name first: no half export is left behind."""
    out = Path(out)
    fmt = fmt or format_for(out)
    if fmt not in FORMATS:
        raise StoreError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    rows, counts = build_rows(store, kind, campaign)
    if not rows:
        raise StoreError(
            f"nothing to export: no {kind} rows"
            + (f" in campaign '{campaign}'" if campaign else "")
            + f" ({counts.get('judgments', 0)} judgment(s) found)"
        )
    card = data_card(store, kind, campaign, rows, counts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if fmt == "datasets":
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(tmp))
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str))
        (tmp / "README.md").write_text(_card_markdown(card))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    if fmt != "datasets":
        out.with_name(out.name + ".card.json").write_text(json.dumps(card, indent=2, default=str))
        out.with_name(out.name + ".card.md").write_text(_card_markdown(card))
    return {"path": str(out), "format": fmt, "kind": kind, **card}
