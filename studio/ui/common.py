"""What the tabs share: the handler decorator, the campaign picker, tables and the SVG plots.

A tab's event handler is a thin adapter over `studio.services`: it translates the components'
values, calls one service function with the session's user and renders the answer. The service
checks the role; `handler` only says who is logged in, and turns the errors a user can act on
into a toast that shows their message as text.
"""

from __future__ import annotations

import html
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from studio import services as svc
from studio import users
from studio.errors import storage_full
from studio.serving.client import BackendError
from studio.users import AuthError, User

if TYPE_CHECKING:
    from studio.runtime import Studio

# What a user can act on (refused, bad input, a part not running); anything else is a bug and
# reaches Gradio as one. StoreError and PromptFileError are ValueErrors.
USER_ERRORS = (AuthError, ValueError, BackendError)


def text(value: Any) -> str:
    """A value shown inside Markdown or a toast as the text it is (names may hold '<' or '&')."""
    return html.escape(str(value), quote=False)


def error(message: str) -> gr.Error:
    # gr.Error renders its message as HTML: escape it. A user error is not a server fault, so
    # no traceback in the studio's log.
    return gr.Error(text(message), print_exception=False)


def info(message: str) -> None:
    gr.Info(text(message))


def session_user(studio: Studio, request: gr.Request | None) -> User | None:
    """Who is logged in on this Gradio session (Gradio's login checked the password), or None."""
    name = getattr(request, "username", None) if request is not None else None
    return users.get_user(studio.store, name) if name and studio.store is not None else None


def handler(studio: Studio) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make `body(user, *inputs)` a Gradio event function of `(*inputs, request)`.

    The wrapper resolves the session's user (authentication only: the service the body calls
    checks what the user may do) and turns `USER_ERRORS` into a toast with the message as text.
    """

    def wrap(body: Callable[..., Any]) -> Callable[..., Any]:
        inputs = list(inspect.signature(body).parameters.values())[1:]  # all but the user

        def event(*args: Any) -> Any:
            *values, request = args
            user = session_user(studio, request)
            if user is None:
                raise error("not logged in (or the account was disabled): open /login")
            try:
                return body(user, *values)
            except USER_ERRORS as exc:
                raise error(str(exc)) from None
            except Exception as exc:
                full = storage_full(exc)  # the disk is full: say so, the user can retry later
                if full is None:
                    raise
                raise error(str(full)) from None

        # Gradio reads the signature to count the inputs and to find where the request goes.
        request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
        event.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p.replace(annotation=inspect.Parameter.empty) for p in inputs] + [request]
        )
        event.__annotations__ = {"request": gr.Request}
        event.__name__ = event.__qualname__ = body.__name__
        event.__doc__ = body.__doc__
        return event

    return wrap


def may(user: User, actions: Iterable[str]) -> bool:
    """Whether the user may do any of these service actions (by the capability each requires)."""
    return any(user.can(svc.ACTIONS[a].capability) for a in actions)  # type: ignore[attr-defined]


def nothing(outputs: Sequence[Any]) -> list[Any]:
    """Leave every output as it is."""
    return [gr.update() for _ in outputs]


# -- the campaign picker ----------------------------------------------------------------------
def campaign_dropdown(label: str, elem_id: str | None = None, **kwargs: Any) -> gr.Dropdown:
    # custom values let API clients name a campaign; the service checks that it exists
    return gr.Dropdown(label=label, choices=[], allow_custom_value=True, elem_id=elem_id, **kwargs)


def campaign_picker(studio: Studio, user: User, kind: str) -> Any:
    """The active campaigns of a kind for a campaign dropdown, preselected when there is one."""
    names = [c["name"] for c in svc.list_campaigns(studio, user, kind=kind) if c["status"] == "active"]
    return gr.update(choices=names, value=names[0] if len(names) == 1 else None)


# -- tables -----------------------------------------------------------------------------------
def table(label: str | None, columns: Sequence[str], **kwargs: Any) -> gr.Dataframe:
    """A read-only table that shows its real column names even while it is empty."""
    return gr.Dataframe(interactive=False, label=label, headers=list(columns), **kwargs)


def frame(rows: Iterable[dict[str, Any]], columns: Sequence[str], others: bool = False) -> pd.DataFrame:
    """Rows as a table with these columns (an empty one keeps its headers); with `others`, keys the
    rows have beyond them follow, so a field added to an answer shows without a UI change."""
    rows = list(rows)
    names = list(columns)
    for row in rows if others else ():
        names += [k for k in row if k not in names]
    return pd.DataFrame([{c: r.get(c) for c in names} for r in rows], columns=names)


def matrix(
    values: dict[str, dict[str, Any]] | None, first: str = "version", by: str = "index"
) -> pd.DataFrame:
    """A nested mapping as a table named by a leading `first` column: row -> column -> value
    (`by="index"`: win rates, counts) or column -> row -> value (`by="columns"`)."""
    if not values:
        return pd.DataFrame(columns=[first])
    return pd.DataFrame.from_dict(values, orient=by).reset_index(names=first)


# -- the SVG plots (inline, no plotting library) ---------------------------------------------------
def forest_plot(rows: list[dict[str, Any]]) -> str:
    """Ratings with their intervals as an inline SVG."""
    if not rows:
        return "<p>No votes yet.</p>"
    lo = min(r["lower"] for r in rows) - 20
    hi = max(r["upper"] for r in rows) + 20
    width, left, right, row_h = 700, 180, 70, 26  # the right margin holds the rating labels

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (width - left - right - 10)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row_h * len(rows) + 30}" '
        'font-family="sans-serif" font-size="12" role="img" aria-label="ratings with 95% intervals">'
    ]
    for i, r in enumerate(rows):
        y = 20 + i * row_h
        name = html.escape(r["version"])
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{name}</text>')
        parts.append(
            f'<line x1="{x(r["lower"]):.1f}" x2="{x(r["upper"]):.1f}" y1="{y}" y2="{y}" '
            'stroke="#888" stroke-width="3"/>'
        )
        parts.append(f'<circle cx="{x(r["rating"]):.1f}" cy="{y}" r="5" fill="#e8590c"/>')
        parts.append(f'<text x="{width - right + 8}" y="{y + 4}">{r["rating"]:.0f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def interval_plot(
    rows: list[dict[str, Any]],
    *,
    reference: float = 0.0,
    domain: tuple[float, float] | None = None,
    label: str = "values with 95% intervals",
    fmt: str = "{:+.3f}",
) -> str:
    """Values with their intervals as an inline SVG (a forest plot), one row each
    (`{label, value, lower, upper}`), with a dashed line at `reference` (no change: 0; an even
    split: 0.5). `domain` fixes the axis; by default it spans the intervals and the reference."""
    if not rows:
        return ""
    lo, hi = domain or (
        min(reference, *(r["lower"] for r in rows)),
        max(reference, *(r["upper"] for r in rows)),
    )
    pad = (hi - lo) * 0.05 or 0.05
    lo, hi = (lo, hi) if domain else (lo - pad, hi + pad)
    width, left, right, row_h = 700, 180, 80, 24

    def x(v: float) -> float:
        return left + (min(max(v, lo), hi) - lo) / (hi - lo) * (width - left - right - 10)

    height = row_h * len(rows) + 34
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12" role="img" aria-label="{html.escape(label)}">',
        f'<line x1="{x(reference):.1f}" x2="{x(reference):.1f}" y1="8" y2="{height - 20}" '
        'stroke="#444" stroke-dasharray="4 3"/>',
        f'<text x="{x(reference):.1f}" y="{height - 6}" text-anchor="middle">{fmt.format(reference)}</text>',
        f'<text x="{x(lo):.1f}" y="{height - 6}" text-anchor="start">{fmt.format(lo)}</text>',
        f'<text x="{x(hi):.1f}" y="{height - 6}" text-anchor="end">{fmt.format(hi)}</text>',
    ]
    for i, r in enumerate(rows):
        y = 18 + i * row_h
        parts.append(
            f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{html.escape(str(r["label"]))}</text>'
        )
        parts.append(
            f'<line x1="{x(r["lower"]):.1f}" x2="{x(r["upper"]):.1f}" y1="{y}" y2="{y}" '
            'stroke="#888" stroke-width="3"/>'
        )
        parts.append(f'<circle cx="{x(r["value"]):.1f}" cy="{y}" r="5" fill="#e8590c"/>')
        parts.append(f'<text x="{width - right + 8}" y="{y + 4}">{fmt.format(r["value"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_plot(title: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """A small inline SVG line chart: one polyline per series, with the y range printed."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    width, height, pad = 320, 150, 28
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    colours = ["#e8590c", "#1c7ed6", "#2f9e44", "#ae3ec9"]

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / (x1 - x0) * (width - 2 * pad)
        py = height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad}" y="14" font-weight="bold">{html.escape(title)}</text>',
        f'<text x="{width - pad}" y="14" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{width - pad}" y="{height - pad + 12}" text-anchor="end">'
        f"{y0:.3g} (steps {x0:.0f}-{x1:.0f})</text>",
    ]
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        path = " ".join(at(x, y) for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(f'<text x="{pad + 90 * i}" y="{height - 2}" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# Which metrics.jsonl keys each run chart draws (the stages name the same curve differently).
CURVES = {
    "loss": ("loss",),
    "reward": ("reward", "rewards/margins", "margin", "heldout_margin_gain"),
    "KL": ("kl", "objective/kl"),
    "accuracy": ("accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
}


def run_curves(events: list[dict[str, Any]]) -> str:
    """A run's step events (metrics.jsonl) as the CURVES charts, one line per stage and key."""
    charts = []
    for title, keys in CURVES.items():
        series: dict[str, list[tuple[float, float]]] = {}
        for e in events:
            if e["event"] != "step":
                continue
            for key in keys:
                if isinstance(e.get(key), int | float):
                    series.setdefault(f"{e['stage']} {key}", []).append((e["step"], e[key]))
        charts.append(line_plot(title, series))
    return "".join(c for c in charts if c) or "<p>No curves yet.</p>"
