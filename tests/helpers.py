"""Builders for labeling tests that need tasks but not a model server.

Generation rows are written the way the sampler writes them; only the text is
made up here, so the task pool, judgments and exports run for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from studio import campaigns, labeling
from studio.importer import messages_hash
from studio.store import ImportedPrompt, Store, new_id
from studio.users import add_user

PASSWORD = "correct-horse-battery"


class StoreFile:
    """A studio database file and the one `Store` open on it; `reopen` is a restart."""

    def __init__(self, path: Path):
        self.path = path
        self.store: Store | None = Store(path)

    def reopen(self) -> Store:
        """Close the store (it writes what it acknowledged) and open the file again."""
        self.close()
        self.store = Store(self.path)
        return self.store

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def seed_campaign(
    store: Store,
    name: str = "c1",
    prompts: int = 4,
    n: int = 3,
    overlap: int = 2,
    texts: list[str] | None = None,
    content: Callable[[int], tuple[str, list[str]]] | None = None,
) -> list[str]:
    """A prompt set, the base version, a campaign and one task per prompt. Returns task ids.

    The campaign is created paused and opened once its tasks exist, so that a running
    studio's background sampler never races these hand-made tasks.
    """
    if not store.query("SELECT 1 FROM model_versions WHERE name = 'base'"):
        store.register_model_version("base", path="/models/base", content_hash="h" * 64, source="test")
        campaigns.ensure_policy_alias(store, "base")
    set_name = f"{name}-set"
    items = []
    for i in range(prompts):
        question = content(i)[0] if content else f"{name} question {i}?"
        msgs = [{"role": "user", "content": question}]
        items.append(ImportedPrompt(f"row {i}", msgs, messages_hash(msgs)))
    store.import_prompts(set_name, items, source="test")
    campaigns.create_campaign(store, name, prompt_set=set_name, n=n, overlap=overlap, status="paused")
    task_ids = []
    for i, p in enumerate(store.prompts(set_name)):
        answers = [
            content(i)[1][c]
            if content
            else texts[c]
            if texts
            else f"answer {c} to {p['messages'][0]['content']} " + "x" * (10 * c)
            for c in range(n)
        ]
        task_ids.append(add_sampled_task(store, name, p, answers))
    campaigns.set_status(store, name, "active")
    return task_ids


def add_sampled_task(store: Store, name: str, prompt: dict, answers: list[str]) -> str | None:
    """Store `answers` as the base version's completions of `prompt` and offer them as a task."""
    request_id = new_id()
    rows = [
        {
            "id": new_id(),
            "request_id": request_id,
            "choice_index": c,
            "prompt_id": prompt["id"],
            "messages": prompt["messages"],
            "model_version": "base",
            "text": text,
            "finish_reason": "stop",
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "latency_ms": 1.0,
            "temperature": 0.8,
            "top_p": 0.95,
            "max_tokens": 64,
            "seed": None,
            "sampling": {"n": len(answers)},
        }
        for c, text in enumerate(answers)
    ]
    store.add_generations(rows)
    return labeling.add_task(store, name, prompt["id"], "base", [r["id"] for r in rows])


def make_users(store: Store, *specs: tuple[str, str]) -> dict[str, str]:
    return {name: add_user(store, name, role, PASSWORD) for name, role in specs}


def seed_battles(
    store: Store,
    name: str,
    outcomes: list[tuple[str, str, str, str]],
    versions: tuple[str, ...] = ("base", "other"),
    leak_words: list[str] | None = None,
    budget: int = 1000,
) -> list[str]:
    """A battle campaign with hand-made battles (answer texts given), for tests without a model server.

    `outcomes`: (version_a, version_b, text_a, text_b) per battle. Returns battle ids.
    """
    from studio import arena

    for v in versions:
        if not store.query("SELECT 1 FROM model_versions WHERE name = ?", [v]):
            store.register_model_version(v, path=f"/models/{v}", content_hash=v * 8, source="test")
    if not store.query("SELECT 1 FROM aliases WHERE name = 'policy'"):
        campaigns.ensure_policy_alias(store, versions[0])
    set_name = f"{name}-set"
    msgs = [{"role": "user", "content": f"{name}: which is better?"}]
    store.import_prompts(set_name, [ImportedPrompt("row 1", msgs, messages_hash(msgs))], source="test")
    prompt_id = store.prompts(set_name)[0]["id"]
    arena.create_battle_campaign(
        store,
        name,
        prompt_set=set_name,
        versions=list(versions),
        budget=budget,
        leak_words=leak_words,
        criteria=["helpful"],
    )
    campaigns.set_status(store, name, "paused")
    ids = []
    for va, vb, ta, tb in outcomes:
        gens = []
        for version, text in ((va, ta), (vb, tb)):
            gens.append(
                {
                    "id": new_id(),
                    "request_id": new_id(),
                    "choice_index": 0,
                    "prompt_id": prompt_id,
                    "messages": msgs,
                    "model_version": version,
                    "text": text,
                    "finish_reason": "stop",
                    "prompt_tokens": 5,
                    "completion_tokens": 5,
                    "latency_ms": 1.0,
                    "temperature": 0.7,
                    "top_p": 0.95,
                    "max_tokens": 32,
                    "seed": 1,
                    "sampling": {},
                }
            )
        store.add_generations(gens)
        leak = arena.find_leak([ta, tb], arena.battle_campaign(store, name)["leak_words"], [va, vb])
        battle_id = new_id()
        with store.transaction() as cur:
            cur.execute(
                "INSERT INTO battles (id, campaign, prompt_id, version_a, version_b, generation_a,"
                " generation_b, leak) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [battle_id, name, prompt_id, va, vb, gens[0]["id"], gens[1]["id"], leak],
            )
        ids.append(battle_id)
    campaigns.set_status(store, name, "active")
    return ids


def login(browser: object, url: str, name: str) -> object:
    page = browser.new_page(viewport={"width": 1200, "height": 1600})
    page.goto(f"{url}/")
    page.fill("input[type=text]", name)
    page.fill("input[type=password]", PASSWORD)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#label-next", timeout=60_000)
    return page


def gradio_call(client: httpx.Client, api_name: str, data: list) -> tuple[str, dict]:
    start = client.post(f"/gradio_api/call/{api_name}", json={"data": data})
    assert start.status_code == 200, start.text
    stream = client.get(f"/gradio_api/call/{api_name}/{start.json()['event_id']}")
    event = next(line for line in stream.text.splitlines() if line.startswith("event:"))
    payload = next(line for line in stream.text.splitlines() if line.startswith("data:"))
    return event.split(":", 1)[1].strip(), json.loads(payload.split(":", 1)[1])


# ---------------------------------------------------------------- training

TOPICS = [
    "tides",
    "rainbows",
    "volcanoes",
    "bread",
    "magnets",
    "honey bees",
    "glaciers",
    "batteries",
    "comets",
    "coffee",
    "bridges",
    "clouds",
    "maps",
    "tea",
    "owls",
    "rivers",
    "deserts",
    "violins",
    "chess",
    "salt",
    "lighthouses",
    "maple trees",
    "submarines",
    "kites",
    "pianos",
    "penguins",
    "moss",
    "thunder",
    "yeast",
    "compasses",
    "coral",
    "windmills",
    "origami",
    "sundials",
    "tunnels",
    "cheese",
    "snow",
    "sails",
    "ink",
    "gears",
]


def easy_preference_rows(n: int = 40) -> list[dict]:
    """An easy preference: a short helpful answer beats a curt refusal. Rows in the export's schema."""
    rows = []
    for i, topic in enumerate((TOPICS * (n // len(TOPICS) + 1))[:n]):
        prompt = [{"role": "user", "content": f"Tell me one fact about {topic}."}]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [
                    {
                        "role": "assistant",
                        "content": f"Sure! Here is a fact about {topic}: they are "
                        "studied by scientists and have a long history.",
                    }
                ],
                "rejected": [{"role": "assistant", "content": "No. I will not answer that."}],
                "margin": 1.0,
                "judgment_id": f"j{i}",
            }
        )
    return rows


def seed_easy_judgments(store: Store, name: str = "easy", n: int = 40, annotator: str = "ann1") -> None:
    """A labeling campaign whose n tasks are judged with the easy preference (chosen ranked first)."""
    from studio import labeling
    from studio.labeling import Submission

    rows = easy_preference_rows(n)

    def content(i: int) -> tuple[str, list[str]]:
        return rows[i]["prompt"][0]["content"], [
            rows[i]["chosen"][0]["content"],
            rows[i]["rejected"][0]["content"],
        ]

    if not store.query("SELECT 1 FROM users WHERE name = ?", [annotator]):
        make_users(store, (annotator, "annotator"))
    seed_campaign(store, name, prompts=n, n=2, overlap=1, content=content)
    chosen = {r["chosen"][0]["content"] for r in rows}
    while (task := labeling.next_task(store, name, annotator)) is not None:
        ranks = [1 if c["text"] in chosen else 2 for c in task["completions"]]
        labeling.submit(store, annotator, Submission(task["assignment_id"], ranks=ranks, strength=3))


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def tiny_model(folder: Path, tokenizer_from: Path, seed: int = 0, init_range: float = 0.02) -> Path:
    """A random 1-layer Llama with the packaged tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            initializer_range=init_range,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Traffic:
    """Requests sent from `threads` threads until the block ends, each thread waiting `pause`
    seconds after each answer, to each model in `models` in turn (append to it to add one).
    `send(model)` raises on a failed request; every failure is kept with its message."""

    def __init__(
        self, send: Callable[[str], object], models: list[str], threads: int = 2, pause: float = 0.0
    ):
        import threading

        self.send = send
        self.models = models
        self.pause = pause
        self.ok: dict[str, int] = {}
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, offset: int) -> None:
        turn = offset
        while not self._stop.is_set():
            model = self.models[turn % len(self.models)]
            turn += 1
            try:
                self.send(model)
            except Exception as exc:
                self.failed.append(f"{model}: {exc}")
            else:
                self.ok[model] = self.ok.get(model, 0) + 1
            self._stop.wait(self.pause)

    def wait_for(self, model: str, answers: int, timeout: float = 300.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while self.ok.get(model, 0) < answers:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{model}: {self.ok.get(model, 0)} answers in {timeout} s; {self.failed[:3]}"
                )
            time.sleep(0.1)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def rest_sender(url: str, token: str, max_tokens: int = 8) -> Callable[[str], object]:
    """`Traffic`'s send over the studio's REST API: one stored sample per call, 200 or raise."""
    client = httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=600)

    def send(model: str) -> object:
        resp = client.post(
            "/sample", json={"prompt": "Say one word.", "model": model, "max_tokens": max_tokens}
        )
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    return send


def random_adapter(base_model: Path, out: Path, seed: int = 0, rank: int = 8, strength: float = 0.01) -> Path:
    """A PEFT LoRA adapter over `base_model` with small random weights: what a trained one costs
    to load and serve, in seconds instead of a training run. `strength` scales its B matrices:
    at 0.01 most greedy answers stay the base's, at 1 they change."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(strength)
    peft_model.save_pretrained(out)
    return out


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 2) -> Iterator[str]:
    """A Ray head on loopback with its job server (dashboard); yields its Jobs address.

    `ray start --block` stays in the foreground as the parent of the head's processes, in a
    session of its own: stopping it by its process group stops this head and nothing else on the
    machine (`ray stop` would stop every Ray on it). The head's `python` is this interpreter and
    PYTHONPATH this checkout, as on a cluster whose image has the project installed. Anything of
    the head that outlives it names its temp folder and is ended by its pid."""
    from ray.job_submission import JobSubmissionClient

    root = Path(__file__).resolve().parents[1]
    # a short folder: Ray's socket paths must fit the 107 bytes of a Unix socket name
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    dashboard = _free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(root),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--port",
        str(_free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--num-cpus",
        str(num_cpus),
        "--include-dashboard",
        "true",
        "--temp-dir",
        str(temp),
        "--disable-usage-stats",
    ]
    log_path = temp.parent / f"{temp.name}.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{dashboard}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    JobSubmissionClient(address)
                    break
                except Exception:
                    if head.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the Ray head did not start; see {log_path}") from None
                    time.sleep(1)
            yield address
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGTERM)
            try:
                # a clean stop of the head takes half a minute on 2 cores; this head holds nothing
                # worth keeping, so a few seconds are its grace before the kill
                head.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(head.pid, signal.SIGKILL)
            time.sleep(1)
            left = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
