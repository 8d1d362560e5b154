"""Evaluation suites: one JSONL file each in data/evals/, read and checked here.

The first line of a suite file is its header, every other line one item:

    {"suite": "factual", "format": 1, "scorer": "factual", "description": "...",
     "generation": {"max_tokens": 16, "temperature": 0.0}, "metrics": {"factual_accuracy": "..."}}
    {"id": "fact-001", "prompt": "What is the capital of France?", "answers": ["Paris"]}

Dropping a file of this form into the folder adds a suite. The scorer names what the items
carry and which metrics come out (SCORERS below); a header may rename the metrics with
"metrics": {"default name": ...} keys in the scorer's order. A suite's content hash covers the
whole file, so editing an item re-measures every version on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.evals import scorers

SUITES_DIR = Path(__file__).resolve().parents[2] / "data" / "evals"
FORMAT = 1


@dataclass(frozen=True)
class Scorer:
    name: str
    metrics: tuple[str, ...]  # default metric names, in order
    required: dict[str, type | tuple[type, ...]]  # item field -> type
    generation: dict[str, Any]  # default generation settings


SCORERS: dict[str, Scorer] = {
    "refusal": Scorer(
        "refusal",
        ("refusal_rate", "safe_refusal_rate"),
        {"harmful": bool},
        {"max_tokens": 32, "temperature": 0.0},
    ),
    "consistency": Scorer(
        "consistency",
        ("consistency",),
        {"kind": str},
        {"max_tokens": 24, "temperature": 0.8, "k": 5},
    ),
    "factual": Scorer(
        "factual", ("factual_accuracy",), {"answers": list}, {"max_tokens": 16, "temperature": 0.0}
    ),
    "multiple_choice": Scorer(
        "multiple_choice", ("capability_accuracy",), {"choices": list, "answer": int}, {}
    ),
    "instructions": Scorer(
        "instructions",
        ("instruction_following",),
        {"instructions": list},
        {"max_tokens": 64, "temperature": 0.0},
    ),
    "pairwise_judge": Scorer(
        "pairwise_judge", ("judge_win_rate",), {}, {"max_tokens": 48, "temperature": 0.0}
    ),
}


class SuiteError(ValueError):
    """A suite file is malformed, or a suite name is unknown."""


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    scorer: str
    description: str
    generation: dict[str, Any]
    metric_names: dict[str, str]  # scorer's default name -> the name this suite reports
    header: dict[str, Any]
    items: list[dict[str, Any]] = field(repr=False)
    content_hash: str = ""

    @property
    def metrics(self) -> list[str]:
        return list(self.metric_names.values())

    def messages(self, item: dict[str, Any]) -> list[dict[str, str]]:
        """The chat messages sent for an item (its prompt through the header's prompt_template)."""
        prompt = item["prompt"]
        if isinstance(prompt, list):
            return prompt
        template = self.header.get("prompt_template", "{prompt}")
        return [{"role": "user", "content": template.format(prompt=prompt)}]


def _fail(path: Path, line: int, message: str) -> SuiteError:
    return SuiteError(f"{path.name} line {line}: {message}")


def load_suite(path: Path | str) -> Suite:
    """Read and check one suite file; every error names the file and the line."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.decode("utf-8").splitlines()
    records: list[tuple[int, dict[str, Any]]] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(path, number, f"not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise _fail(path, number, "expected a JSON object")
        records.append((number, record))
    if not records:
        raise SuiteError(f"{path.name}: empty; the first line must be the suite header")
    header_line, header = records[0]
    name = header.get("suite")
    if not isinstance(name, str) or not name.strip():
        raise _fail(path, header_line, "the header needs a 'suite' name")
    if header.get("format", FORMAT) != FORMAT:
        raise _fail(path, header_line, f"format {header.get('format')!r} is not supported (use {FORMAT})")
    scorer_name = header.get("scorer")
    if scorer_name not in SCORERS:
        raise _fail(path, header_line, f"scorer {scorer_name!r}: use one of {', '.join(SCORERS)}")
    scorer = SCORERS[scorer_name]
    generation = {**scorer.generation, **(header.get("generation") or {})}
    names = header.get("metrics") or {}
    if not isinstance(names, dict):
        raise _fail(path, header_line, "'metrics' must map metric names to their descriptions")
    # a header lists its metrics in the scorer's order; other names rename them
    given = list(names)
    if given and len(given) != len(scorer.metrics):
        raise _fail(
            path,
            header_line,
            f"scorer {scorer_name} reports {len(scorer.metrics)} metric(s) ({', '.join(scorer.metrics)}); "
            f"the header lists {len(given)}",
        )
    metric_names = dict(zip(scorer.metrics, given or scorer.metrics, strict=True))
    if scorer_name == "multiple_choice":
        norm = header.get("normalise", "per_token")
        if norm not in ("sum", "per_token"):
            raise _fail(path, header_line, f"normalise {norm!r}: use 'sum' or 'per_token'")
        if header.get("context", "chat") not in ("chat", "raw"):
            raise _fail(path, header_line, f"context {header.get('context')!r}: use 'chat' or 'raw'")
    items: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, item in records[1:]:
        item_id = item.get("id")
        if not isinstance(item_id, str) or not item_id:
            raise _fail(path, number, "field 'id' is missing (expected a string unique in the suite)")
        if item_id in seen:
            raise _fail(path, number, f"id {item_id!r} repeats line {seen[item_id]}")
        seen[item_id] = number
        prompt = item.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()) and not (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)
        ):
            raise _fail(
                path, number, "field 'prompt' is missing (expected a string or a list of chat messages)"
            )
        for key, kind in scorer.required.items():
            if not isinstance(item.get(key), kind) or (kind is int and isinstance(item.get(key), bool)):
                raise _fail(
                    path, number, f"field '{key}' is missing or not a {getattr(kind, '__name__', kind)}"
                )
        try:
            _check_item(scorer_name, item)
        except ValueError as exc:
            raise _fail(path, number, str(exc)) from None
        items.append(item)
    if not items:
        raise SuiteError(f"{path.name}: the header is there but no items follow")
    return Suite(
        name=name,
        path=path,
        scorer=scorer_name,
        description=str(header.get("description", "")),
        generation=generation,
        metric_names=metric_names,
        header=header,
        items=items,
        content_hash=hashlib.sha256(raw).hexdigest(),
    )


def _check_item(scorer: str, item: dict[str, Any]) -> None:
    if scorer == "factual" and not all(isinstance(a, str) and a.strip() for a in item["answers"]):
        raise ValueError("field 'answers' must be a non-empty list of strings")
    if scorer == "factual" and not item["answers"]:
        raise ValueError("field 'answers' is empty")
    if scorer == "multiple_choice":
        choices = item["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError("field 'choices' needs at least two non-empty strings")
        if not 0 <= item["answer"] < len(choices):
            raise ValueError(
                f"field 'answer' {item['answer']} is not an index into the {len(choices)} choices"
            )
    if scorer == "consistency":
        if item["kind"] not in ("short", "open"):
            raise ValueError(f"field 'kind' {item['kind']!r}: use 'short' or 'open'")
        groups = item.get("aliases", [])
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and all(isinstance(a, str) for a in g) for g in groups
        ):
            raise ValueError("field 'aliases' must be a list of lists of strings")
    if scorer == "instructions":
        if not item["instructions"]:
            raise ValueError("field 'instructions' is empty")
        for spec in item["instructions"]:
            if not isinstance(spec, dict) or not isinstance(spec.get("id"), str):
                raise ValueError("each instruction needs an 'id' (an IFEval instruction id) and 'kwargs'")
            scorers.check_instruction_spec(spec["id"], dict(spec.get("kwargs") or {}))


def available_suites(folder: Path | str | None = None) -> dict[str, Suite]:
    """Every suite in the folder (data/evals/ by default), by name."""
    folder = Path(folder) if folder is not None else SUITES_DIR
    found: dict[str, Suite] = {}
    for path in sorted(folder.glob("*.jsonl")):
        suite = load_suite(path)
        if suite.name in found:
            raise SuiteError(
                f"{path.name}: suite name {suite.name!r} is also used by {found[suite.name].path.name}"
            )
        found[suite.name] = suite
    return found


def pick_suites(names: list[str] | None, folder: Path | str | None = None) -> list[Suite]:
    """The named suites (all of them when `names` is empty), or an error listing what exists."""
    known = available_suites(folder)
    if not names:
        return list(known.values())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SuiteError(f"unknown suite(s) {', '.join(unknown)}; available: {', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]
