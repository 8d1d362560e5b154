"""Is an external server running the same model as a local folder? What its API lets us check.

A server does not hand out its weights, so the check is of what it does expose:

- `/v1/models`: the served model's context (`max_model_len`) must fit the folder's
  `config.json` (`max_position_embeddings`); its `root` (the path or hub id it loaded) is reported;
- `/tokenize` of a fixed text (several scripts, digits, code, whitespace) must give exactly the ids
  of the folder's tokenizer, and so must a chat through the chat template (what training
  formats with the folder's template is then what the server samples from);
- `/detokenize` of the folder's last token id must give the folder's text for it (the server's
  vocabulary is at least as large and agrees at its far end).

A different tokenizer, template or context fails the check; two models that share a tokenizer
(two fine-tunes of one base) pass it, and telling them apart would need the weights. Training
from `--model DIR` then trains the model the server serves, up to that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.serving.client import BackendError, OpenAIChatBackend
from studio.serving.vllm_server import ServingError

PROBE_TEXT = "Grüße aus Zürich! 東京 2024: x = [i**2 for i in range(10)]  \n\tend."
PROBE_CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a prime number."},
]


def _local_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _ids(encoded: Any) -> list[int]:
    """apply_chat_template's answer as ids (a list, or a BatchEncoding in transformers 5)."""
    if isinstance(encoded, list):
        return [int(i) for i in encoded]
    return [int(i) for i in encoded["input_ids"]]


def check_same_model(url: str, served_name: str, model_dir: Path) -> str:
    """Check the server at `url` against `model_dir`; the facts checked as one line, or ServingError."""
    config = json.loads((model_dir / "config.json").read_text())
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    tokenizer = _local_tokenizer(model_dir)
    where = f"--backend-url {url} (model '{served_name}') against --model {model_dir}"
    with OpenAIChatBackend(url, timeout=60.0) as client:
        try:
            cards = {str(c.get("id")): c for c in client.model_cards()}
            card = cards[served_name]
            text_ids = client.tokenize(served_name, text=PROBE_TEXT)
            chat_ids = client.tokenize(served_name, messages=PROBE_CHAT)
            last = len(tokenizer) - 1
            resp = client._http.post("/detokenize", json={"model": served_name, "tokens": [last]})
        except (BackendError, KeyError) as exc:
            raise ServingError(f"{where}: could not check the model ({exc})") from None
        length = card.get("max_model_len")
        if isinstance(length, int) and isinstance(positions, int) and length > positions:
            raise ServingError(
                f"{where}: the server's context is {length} tokens, more than the folder's "
                f"max_position_embeddings {positions}: not the same model"
            )
        local_text = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if text_ids != local_text:
            at = next((i for i, (a, b) in enumerate(zip(text_ids, local_text, strict=False)) if a != b), None)
            at = at if at is not None else min(len(text_ids), len(local_text))
            raise ServingError(
                f"{where}: the tokenizers differ (a fixed text gives {len(text_ids)} tokens on the "
                f"server, {len(local_text)} here; first difference at token {at}): not the same model"
            )
        local_chat = _ids(
            tokenizer.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, tokenize=True)
        )
        if chat_ids != local_chat:
            raise ServingError(
                f"{where}: the chat templates differ ({len(chat_ids)} tokens on the server, "
                f"{len(local_chat)} here for the same chat): training would format prompts unlike "
                "the server; serve the folder's template (vLLM --chat-template) or fix the folder"
            )
        local_last = tokenizer.decode([last])
        if resp.status_code != 200 or resp.json().get("prompt") != local_last:
            raise ServingError(
                f"{where}: the server's vocabulary does not end like the folder's (token {last}: "
                f"{resp.text[:100]!r} there, {local_last!r} here): not the same model"
            )
    return (
        f"context {length} (config {positions}), root {card.get('root')}, tokenizer and chat template "
        f"identical on {len(local_text)}+{len(local_chat)} probe tokens, vocabulary of {last + 1}"
    )
