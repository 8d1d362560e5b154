"""The Gradio studio mounted at /. One function per tab."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from studio.importer import PromptFileError, normalize_messages
from studio.runtime import Studio
from studio.serving.client import BackendError, SamplingParams
from studio.store import StoreError


def _playground_tab(studio: Studio) -> None:
    with gr.Tab("Playground"):
        gr.Markdown("Sample completions from the served model. Every completion is stored.")
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Ask the model something")
        with gr.Row():
            n = gr.Slider(1, 8, value=4, step=1, label="Completions (n)")
            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature")
            max_tokens = gr.Slider(8, 512, value=128, step=8, label="Max tokens")
            seed = gr.Number(value=None, label="Seed (optional)", precision=0)
        go = gr.Button("Sample", variant="primary")
        out = gr.Markdown(sanitize_html=True)

        def run(text: str, n_: float, temp: float, max_tok: float, seed_: float | None) -> str:
            assert studio.sampler is not None
            try:
                messages = normalize_messages(text, "Prompt box", "prompt")
                params = SamplingParams(
                    n=int(n_),
                    temperature=float(temp),
                    max_tokens=int(max_tok),
                    seed=None if seed_ is None else int(seed_),
                )
                rows = studio.sampler.sample(messages, params, version=studio.base_version)
            except (PromptFileError, StoreError, ValueError, BackendError) as exc:
                raise gr.Error(str(exc)) from None
            parts = []
            for r in rows:
                parts.append(
                    f"**Completion {r['choice_index'] + 1}** · {r['completion_tokens']} tokens · "
                    f"{r['finish_reason']} · {r['latency_ms']:.0f} ms\n\n{r['text']}\n\n---"
                )
            return "\n\n".join(parts)

        go.click(run, [prompt, n, temperature, max_tokens, seed], out, concurrency_limit=8)


def _models_tab(studio: Studio, demo: gr.Blocks) -> None:
    with gr.Tab("Models"):
        table = gr.Dataframe(interactive=False)
        refresh = gr.Button("Refresh")

        def load() -> pd.DataFrame:
            assert studio.store is not None
            rows = studio.store.model_versions()
            cols = ["name", "kind", "source", "parent", "content_hash", "created_at", "path"]
            return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)

        refresh.click(load, None, table)
        demo.load(load, None, table)


def build_ui(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="Preference Studio") as demo:
        gr.Markdown("# Preference Studio")
        _playground_tab(studio)
        _models_tab(studio, demo)
    return demo
