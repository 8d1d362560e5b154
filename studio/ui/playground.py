"""The Playground tab: sample completions from the served model; every one is stored."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from studio import services as svc
from studio.ui.common import handler, text
from studio.ui.label import cut_note
from studio.users import User

if TYPE_CHECKING:
    from studio.runtime import Studio

SHOWN_TO = ("sample",)
SPEC = svc.SampleSpec


def build(studio: Studio, demo: gr.Blocks) -> gr.Tab:
    on = handler(studio)
    with gr.Tab("Playground", id="playground") as tab:
        gr.Markdown("Sample completions from the served model. Every completion is stored.")
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Ask the model something")
        with gr.Row():
            n = gr.Slider(1, 8, value=SPEC.n, step=1, label="Completions (n)")
            temperature = gr.Slider(0.0, 2.0, value=SPEC.temperature, step=0.05, label="Temperature")
            max_tokens = gr.Slider(8, 512, value=SPEC.max_tokens, step=8, label="Max tokens")
            seed = gr.Number(value=SPEC.seed, label="Seed (optional)", precision=0)
        go = gr.Button("Sample", variant="primary")
        out = gr.Markdown(sanitize_html=True)

    def sample(
        user: User, prompt_text: str | None, n_: float, temp: float, max_tok: float, seed_: float | None
    ) -> str:
        spec = svc.SampleSpec(
            prompt=prompt_text or "",
            n=int(n_),
            temperature=float(temp),
            max_tokens=int(max_tok),
            seed=None if seed_ is None else int(seed_),
        )
        rows = svc.sample(studio, user, spec)["generations"]
        return "\n\n".join(
            f"**Completion {r['choice_index'] + 1}** · {r['completion_tokens']} tokens · "
            f"{text(r['finish_reason'])} · {r['latency_ms']:.0f} ms{cut_note(r['finish_reason'])}"
            f"\n\n{r['text']}\n\n---"
            for r in rows
        )

    go.click(
        on(sample), [prompt, n, temperature, max_tokens, seed], out, api_name="sample", concurrency_limit=8
    )
    return tab
