"""Property tests (hypothesis): names, and the importer in every format.

Whatever the input, the answer is a value or an error naming the input (StoreError,
PromptFileError), never another exception; what the importer accepts, the store takes and gives
back unchanged; what it refuses stores nothing.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from studio.importer import PromptFileError, read_prompts
from studio.names import KINDS, check_name
from studio.store import Store, StoreError
from studio.textcheck import unencodable

FUZZ = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# text as an attacker sends it: any code point, lone surrogates included, and nasty shapes
any_text = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=40),
    st.text(alphabet=st.sampled_from(["a", " ", "\ud800", "\udfff", "\U0001f600", "\x00"]), max_size=10),
    st.sampled_from(["../../evil", "<script>x</script>", "a'; DROP TABLE t; --", "\ud800", "x" * 5000, " "]),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_text)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant"]), any_text), "content": json_leaf}
)
good_prompt = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20).filter(str.strip)})
record = st.one_of(
    st.fixed_dictionaries({"prompt": any_text}, optional={"id": json_leaf, "source": json_value}),
    st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=4)}, optional={"id": json_leaf, "tag": json_value}
    ),
    st.dictionaries(st.text(max_size=10), json_value, max_size=4),
)


@FUZZ
@given(kind=st.sampled_from(KINDS), value=st.one_of(any_text, json_leaf))
def test_a_name_is_accepted_as_it_is_or_refused_with_a_short_message(kind: str, value: Any) -> None:
    try:
        name = check_name(kind, value)
    except StoreError as exc:
        assert len(str(exc)) < 300 and f"{kind} name" in str(exc)
        return
    assert name == value and 1 <= len(name) <= 128 and unencodable(name) is None
    assert not set(name) & set(" <>'\"\\;\n") and ".." not in name.split("/")


def import_all(path: Path, **kw: Any) -> tuple[list[Any] | None, str | None]:
    try:
        return read_prompts(path, **kw), None
    except PromptFileError as exc:
        return None, str(exc)


def check_round_trip(path: Path, prompts: list[Any] | None, error: str | None) -> None:
    """Accepted: stored whole and read back unchanged. Refused: the message names the file."""
    if prompts is None:
        assert error is not None and str(path.name) in error
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s.duckdb")
        try:
            result = store.import_prompts("fuzz", prompts, source=str(path))
            stored = store.prompts("fuzz")
            assert result.added == len(stored) == len({p.content_hash for p in prompts})
            first = {}
            for p in prompts:
                first.setdefault(p.content_hash, p)
            assert [s["messages"] for s in stored] == [p.messages for p in first.values()]
        finally:
            store.close()


# the probe's inputs, always tried; good records first, so that reading gets to the bad one
PROBES = [
    [{"prompt": "\ud800"}],
    [{"prompt": "ok"}, {"messages": [{"role": "user", "content": "hi \ud800"}]}],
    [{"prompt": "ok", "id": "\udfff"}],
    [{"prompt": "ok", "meta": {"k\ud800": [1]}}],
    [{"prompt": "x" * 200_000}],
]


def probe_examples(test: Any) -> Any:
    for records in PROBES:
        test = example(records=records)(test)
    return test


@FUZZ
@probe_examples
@given(records=st.lists(st.one_of(good_prompt, record, json_value), min_size=1, max_size=5))
def test_jsonl_any_records(records: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        # ensure_ascii: a lone surrogate arrives as the '\ud800' escape, as in the probe
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        check_round_trip(path, *import_all(path))


@FUZZ
@probe_examples
@given(records=st.lists(st.one_of(good_prompt, record), min_size=1, max_size=5))
def test_csv_any_records(records: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.csv"
        columns = sorted({k for r in records for k in r if k} | {"prompt"})
        with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for r in records:
                cells = [r.get(c) for c in columns]
                writer.writerow(
                    ["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in cells]
                )
        check_round_trip(path, *import_all(path))


def encodable(value: Any) -> bool:
    return unencodable(json.dumps(value, ensure_ascii=False)) is None


table_record = st.fixed_dictionaries(
    {
        "prompt": st.one_of(st.none(), any_text),
        "messages": st.one_of(
            st.none(), st.lists(message.map(lambda m: {**m, "content": str(m["content"])}))
        ),
        "note": st.one_of(st.none(), any_text),
    }
).filter(encodable)  # Arrow cannot even hold a lone surrogate


@FUZZ
@given(rows=st.lists(table_record, min_size=1, max_size=5))
def test_parquet_any_rows(rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        check_round_trip(path, *import_all(path))


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(table_record, min_size=1, max_size=4))
def test_datasets_folder_any_rows(rows: list[dict[str, Any]]) -> None:
    from datasets import Dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ds"
        Dataset.from_list(rows).save_to_disk(str(path))
        check_round_trip(path, *import_all(path))


@pytest.mark.parametrize("depth", [70, 999, 10_000])
def test_any_nesting_depth_in_jsonl_is_an_error_naming_the_line(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "ok", "meta": ' + "[" * depth + "]" * depth + "}\n")
    prompts, error = import_all(path)
    assert prompts is None and error is not None and "deep.jsonl line 1" in error
