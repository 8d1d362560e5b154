"""Bad input gets a message naming it, never a traceback: surrogates, deep JSON, sizes, seeds, timeouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from studio import campaigns
from studio.importer import PromptFileError, normalize_messages, read_prompts
from studio.serving.client import (
    SEED_MAX,
    SEED_MIN,
    BackendError,
    BackendRequestError,
    OpenAIChatBackend,
    SamplingParams,
)
from studio.store import Store, StoreError
from studio.textcheck import (
    MAX_PROMPT_CHARS,
    MAX_RECORD_BYTES,
    check_json,
    check_text,
    shorten,
)
from tests.helpers import seed_campaign

SURROGATE = "\ud800"
SURROGATE_JSON = '"bad \\ud800 text"'  # as it arrives in a file: a JSON escape without its pair


# ---------------------------------------------------------------- the shared checks


def test_check_text_names_the_field_the_limit_and_the_surrogate() -> None:
    assert check_text("fine", "rationale", max_chars=10) == "fine"
    assert check_text(None, "rationale", max_chars=10, optional=True) is None
    with pytest.raises(StoreError, match=r"rationale: 11 characters, over the limit of 10; shorten it"):
        check_text("x" * 11, "rationale", max_chars=10)
    with pytest.raises(StoreError, match=r"edited text: character 3 is a lone surrogate"):
        check_text("ab" + SURROGATE, "edited text", max_chars=10)
    with pytest.raises(StoreError, match="rationale: expected text, got int"):
        check_text(5, "rationale", max_chars=10)
    with pytest.raises(PromptFileError):
        check_text(SURROGATE, "x", max_chars=10, error=PromptFileError)


def test_check_json_refuses_deep_nesting_and_surrogates_in_keys_and_values() -> None:
    deep: object = "leaf"
    for _ in range(10_000):  # deeper than Python's recursion limit: the check must not recurse
        deep = [deep]
    with pytest.raises(StoreError, match="nested more than 64 levels deep"):
        check_json({"a": deep}, "meta")
    with pytest.raises(StoreError, match="lone surrogate"):
        check_json({"ok": [{"k" + SURROGATE: 1}]}, "meta")
    with pytest.raises(StoreError, match="lone surrogate"):
        check_json({"ok": ["v" + SURROGATE]}, "meta")
    assert check_json({"a": [1, {"b": "c"}]}, "meta") == {"a": [1, {"b": "c"}]}


def test_shorten_cuts_and_escapes() -> None:
    assert shorten("x" * 20_000) == "x" * 40 + "…"
    assert shorten(SURROGATE) == "\\ud800"
    assert shorten(2**70) == "1180591620717411303424"


# ---------------------------------------------------------------- the importer


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": ' + SURROGATE_JSON + "}", r"line 2: field 'prompt': character 5 is a lone surrogate"),
        (
            '{"messages": [{"role": "user", "content": ' + SURROGATE_JSON + "}]}",
            r"line 2: field 'messages' item 0 'content': character 5 is a lone surrogate",
        ),
        ('{"prompt": "ok", "id": ' + SURROGATE_JSON + "}", r"line 2: field 'id': character 5 is a lone"),
        ('{"prompt": "ok", "source": {"a": [' + SURROGATE_JSON + "]}}", r"line 2: metadata: text .*lone"),
        ('{"prompt": "ok", "src' + "\\ud800" + '": 1}', r"line 2: metadata: text .*lone surrogate"),
        ('{"prompt": "' + "x" * (MAX_PROMPT_CHARS + 1) + '"}', r"line 2: field 'prompt': 100,001 characters"),
        (
            json.dumps({"messages": [{"role": "user", "content": "y" * 60_000}] * 2}),
            r"line 2: field 'messages': the messages hold over 100,000 characters",
        ),
        ("[" * 10_000 + "]" * 10_000, r"line 2: JSON nested too deep to read"),
        ('{"prompt": "ok", "m": ' + "[" * 100 + "]" * 100 + "}", r"line 2: metadata: nested more than 64"),
    ],
    ids=["prompt", "content", "id", "meta-value", "meta-key", "long", "long-total", "deep", "deep-meta"],
)
def test_jsonl_bad_text_is_named_by_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(PromptFileError, match=message):
        read_prompts(path)


def test_a_line_over_the_record_limit_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("w") as fh:
        fh.write('{"prompt": "fine"}\n')
        fh.write('{"prompt": "ok", "blob": "' + "z" * (MAX_RECORD_BYTES + 10) + '"}\n')
    with pytest.raises(PromptFileError, match=r"big.jsonl line 2: longer than 2,097,152 bytes"):
        read_prompts(path)
    # metadata over the limit from a format without lines
    import pyarrow as pa
    import pyarrow.parquet as pq

    wide = tmp_path / "wide.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "ok", **{f"c{i}": "w" * 120_000 for i in range(20)}}]), wide
    )
    with pytest.raises(PromptFileError, match=r"wide.parquet row 1: the other fields .* over the limit"):
        read_prompts(wide)


def test_csv_cells_too_big_or_too_deep_are_named(tmp_path: Path) -> None:
    big = write(tmp_path, "big.csv", "prompt,note\nhello,ok\nhi," + "n" * 200_000 + "\n")
    with pytest.raises(PromptFileError, match=r"big.csv line 3: not readable as CSV \(field larger"):
        read_prompts(big)
    deep = write(tmp_path, "deep.csv", 'messages\n"' + "[" * 10_000 + "]" * 10_000 + '"\n')
    with pytest.raises(PromptFileError, match=r"deep.csv line 2: field 'messages' is JSON nested too deep"):
        read_prompts(deep)


def test_request_prompts_are_checked_too() -> None:
    with pytest.raises(PromptFileError, match=r"request: field 'prompt': character 1 is a lone surrogate"):
        normalize_messages(SURROGATE, "request", "prompt")
    with pytest.raises(PromptFileError, match=r"request: field 'prompt': 100,001 characters"):
        normalize_messages("p" * (MAX_PROMPT_CHARS + 1), "request", "prompt")


def test_studio_import_of_deep_json_and_surrogates_says_where_without_a_traceback(tmp_path: Path) -> None:
    deep = write(tmp_path, "deep.jsonl", '{"prompt": "ok"}\n' + "[" * 10_000 + "]" * 10_000 + "\n")
    sur = write(tmp_path, "sur.jsonl", '{"prompt": ' + SURROGATE_JSON + "}\n")
    for path, message in (
        (deep, "deep.jsonl line 2: JSON nested too deep"),
        (sur, "sur.jsonl line 1: field"),
    ):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "studio.cli",
                "import",
                str(path),
                "--set",
                "s",
                "--data-dir",
                str(tmp_path / "d"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 1, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- sampling parameters and campaigns


def test_seed_must_fit_a_signed_64_bit_integer() -> None:
    for seed in (2**70, SEED_MAX + 1, SEED_MIN - 1, True, 1.5):
        with pytest.raises(ValueError, match=r"seed=.*: must be a whole number from -9223372036854775808"):
            SamplingParams(seed=seed)  # type: ignore[arg-type]
    assert SamplingParams(seed=SEED_MAX).seed == SEED_MAX and SamplingParams(seed=SEED_MIN).seed == SEED_MIN


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "s.duckdb")
    seed_campaign(s, "c0", prompts=1)
    return s


def test_campaign_settings_that_could_never_sample_or_store_are_refused(store: Store) -> None:
    cases = [
        ({"seed": 2**70}, r"seed=1180591620717411303424: must be a whole number"),
        (
            {"task_timeout_s": 1e12},
            r"task_timeout_s=1000000000000.0: give annotators between 30 s and 604800",
        ),
        ({"task_timeout_s": 5}, r"task_timeout_s=5: give annotators between 30 s"),
        ({"guidelines": "be kind " + SURROGATE}, r"guidelines: character 9 is a lone surrogate"),
        ({"guidelines": "g" * 100_001}, r"guidelines: 100,001 characters"),
        ({"max_tokens": 8192, "max_model_len": 2048}, r"max_tokens=8192: the served model's context is 2048"),
        ({"max_tokens": 2048, "max_model_len": 2048}, r"use a max_tokens below 2048"),
    ]
    for kwargs, message in cases:
        with pytest.raises(StoreError, match=message):
            campaigns.create_campaign(store, "c1", prompt_set="c0-set", **kwargs)
    assert store.count("campaigns") == 1
    made = campaigns.create_campaign(store, "c1", prompt_set="c0-set", max_tokens=512, max_model_len=2048)
    assert made["sampling"]["max_tokens"] == 512


def test_a_surrogate_reaching_the_database_is_a_store_error_not_a_crash(store: Store) -> None:
    with pytest.raises(StoreError, match="lone surrogate"):
        store.query("SELECT * FROM campaigns WHERE name = ?", [SURROGATE])
    with pytest.raises(StoreError, match="lone surrogate"), store.transaction() as cur:
        cur.execute("UPDATE campaigns SET guidelines = ? WHERE name = 'c0'", [SURROGATE])
    assert campaigns.get_campaign(store, "c0")["guidelines"] == ""


# ---------------------------------------------------------------- the serving client


def vllm_like(status: int, body: dict, models: dict | None = None) -> httpx.MockTransport:
    """The replies of vLLM 0.32's OpenAI server (the server is outside this unit test)."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=models or {"data": []})
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handle)


def backend_with(transport: httpx.MockTransport) -> OpenAIChatBackend:
    backend = OpenAIChatBackend("http://vllm.test")
    backend._http = httpx.Client(base_url="http://vllm.test", transport=transport)
    return backend


MODELS = {
    "data": [
        {"id": "base", "max_model_len": 2048, "parent": None},
        {"id": "dpo-1", "max_model_len": None, "parent": "base"},  # a LoRA adapter's card
    ]
}
CONTEXT_400 = {
    "error": {
        "message": "This model's maximum context length is 2048 tokens. However, your prompt contains "
        "3000 input tokens, which exceeds this limit even without any output tokens. "
        "Please reduce the length of the input prompt.",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    }
}


def test_a_vllm_400_is_a_request_error_that_says_what_to_shorten() -> None:
    backend = backend_with(vllm_like(400, CONTEXT_400, MODELS))
    with pytest.raises(BackendRequestError) as err:
        backend.chat("dpo-1", [{"role": "user", "content": "long"}], SamplingParams())
    text = str(err.value)
    assert "maximum context length is 2048" in text and "shorten the prompt or lower max_tokens" in text
    assert "(the model's context is 2048 tokens" in text and err.value.max_model_len == 2048
    other = backend_with(vllm_like(400, {"error": {"message": "bad role 'robot'", "code": 400}}))
    with pytest.raises(BackendRequestError, match="bad role 'robot'; check the prompt"):
        other.chat("base", [{"role": "user", "content": "x"}], SamplingParams())


def test_a_backend_that_is_down_or_broken_stays_a_plain_backend_error() -> None:
    for status in (500, 503, 404):
        backend = backend_with(vllm_like(status, {"error": {"message": "engine dead"}}))
        with pytest.raises(BackendError) as err:
            backend.chat("base", [{"role": "user", "content": "x"}], SamplingParams())
        assert not isinstance(err.value, BackendRequestError)


def test_max_model_len_reads_the_served_models_and_an_adapter_uses_its_parents() -> None:
    backend = backend_with(vllm_like(200, {}, MODELS))
    assert backend.max_model_len("base") == 2048
    assert backend.max_model_len("dpo-1") == 2048
    assert backend.max_model_len(None) == 2048
    assert backend_with(vllm_like(200, {}, {"data": [{"id": "x"}]})).max_model_len("x") is None
    down = OpenAIChatBackend("http://127.0.0.1:9")  # nothing listens on the discard port
    assert down.max_model_len("base") is None


# ---------------------------------------------------------------- the probe's requests over REST


def test_the_probes_rest_requests_get_a_4xx_naming_the_input(tmp_path: Path) -> None:
    """No model server: the checks run before anything is sampled."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from studio.app import create_app
    from studio.config import Settings
    from studio.runtime import Studio
    from tests.helpers import make_users

    settings = Settings(data_dir=tmp_path, ui=False)
    studio = Studio(settings)
    studio.store = Store(settings.db_path)
    seed_campaign(studio.store, "c0", prompts=1)
    token = make_users(studio.store, ("boss", "admin"))["boss"]
    app = create_app(settings, studio)
    campaign = {"name": "c1", "prompt_set": "c0-set"}
    requests = [
        ("/campaigns", {**campaign, "seed": 2**70}, "seed=1180591620717411303424"),
        ("/campaigns", {**campaign, "task_timeout_s": 1e12}, "task_timeout_s=1000000000000"),
        ("/campaigns", {**campaign, "name": "../../evil"}, "campaign name '../../evil'"),
        ("/campaigns", {**campaign, "name": "x" * 20_000}, "campaign name 'xxxxxxxx"),
        ("/campaigns", {**campaign, "guidelines": SURROGATE}, "guidelines: character 1 is a lone surrogate"),
        ("/prompt-sets/s1/prompts", {"records": [{"prompt": SURROGATE}]}, "record 1: field 'prompt'"),
        ("/prompt-sets/s1/prompts", {"records": [{"prompt": "p" * 100_001}]}, "100,001 characters"),
        ("/prompt-sets/%3Cb%3Ebad%20name%3B/prompts", {"records": [{"prompt": "hi"}]}, "prompt set name"),
    ]

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(transport=transport, base_url="http://studio/api/v1") as client:
            # json.dumps escapes a lone surrogate as '\ud800', as the probe sent it
            return [
                await client.post(route, content=json.dumps(body), headers=headers)
                for route, body, _ in requests
            ]

    with ThreadPoolExecutor(1) as pool:  # a loop of its own (see test_labeling's REST test)
        responses = pool.submit(asyncio.run, scenario()).result()
    for (route, _, message), resp in zip(requests, responses, strict=True):
        assert 400 <= resp.status_code < 500, (route, resp.status_code, resp.text[:300])
        assert message in resp.json()["detail"], (route, resp.text[:300])
        assert len(resp.text) < 1_000
    assert studio.store.count("campaigns") == 1 and [s["name"] for s in studio.store.prompt_sets()] == [
        "c0-set"
    ]
    studio.store.close()


# ---------------------------------------------------------------- judgments and guidelines


def test_a_judgment_with_a_lone_surrogate_is_refused_and_the_task_stays_open(tmp_path: Path) -> None:
    from studio import services as svc
    from studio.users import User

    with svc.OfflineContext(tmp_path) as ctx:
        seed_campaign(ctx.store, "c1", prompts=1, n=2, overlap=1)
        ann = User("ann", "annotator")
        task = svc.next_task(ctx, ann, "c1")["task"]
        for field, message in (
            ("rationale", "rationale: character 5 is a lone surrogate"),
            ("edited_text", "edited_text: character 5 is a lone surrogate"),
        ):
            spec = svc.JudgmentSpec(task["assignment_id"], ranks=[1, 2], **{field: "good\ud800"})
            with pytest.raises(StoreError, match=message):
                svc.submit_judgment(ctx, ann, spec)
            with pytest.raises(StoreError, match=message):  # the REST route's two-step form
                svc.begin_judgment(ctx, ann, spec)
        with pytest.raises(StoreError, match="rationale: 10,001 characters"):
            too_long = svc.JudgmentSpec(task["assignment_id"], ranks=[1, 2], rationale="r" * 10_001)
            svc.submit_judgment(ctx, ann, too_long)
        assert ctx.store.count("judgments") == 0
        fine = svc.JudgmentSpec(task["assignment_id"], ranks=[1, 2], rationale="ok")
        done = svc.submit_judgment(ctx, ann, fine)
        assert done["judgment"]["rationale"] == "ok" and ctx.store.count("judgments") == 1


def test_guidelines_are_checked_and_unknown_campaign_messages_stay_short(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    seed_campaign(store, "c0", prompts=1)
    for i in range(30):
        campaigns.create_campaign(store, f"camp-{i:02d}-" + "x" * 50, prompt_set="c0-set")
    with pytest.raises(StoreError, match="guidelines: character 2 is a lone surrogate"):
        campaigns.set_guidelines(store, "c0", "a\ud800")
    with pytest.raises(StoreError, match="guidelines: 100,001 characters"):
        campaigns.set_guidelines(store, "c0", "g" * 100_001)
    assert campaigns.get_campaign(store, "c0")["guidelines"] == ""
    with pytest.raises(StoreError) as err:
        campaigns.get_campaign(store, "y" * 20_000)
    message = str(err.value)
    assert message.startswith("campaign 'yyyyyyyy") and "… (11 more)" in message
    assert len(message) < 1_200
    store.close()
