from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from studio.importer import PromptFileError, read_prompts
from studio.store import Store

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def import_file(store: Store, path: Path, **kw) -> object:
    return store.import_prompts("set", read_prompts(path, **kw), source=str(path))


# formats ---------------------------------------------------------------------
def test_jsonl_strings_messages_ids_and_metadata(store: Store, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Hello", "id": "a1", "topic": "greeting", "difficulty": 2},
            {"messages": CHAT},
            {"prompt": CHAT[1:], "id": 7},
        ],
    )
    (tmp_path / "p.jsonl").write_text((tmp_path / "p.jsonl").read_text() + "\n\n")  # blank lines are fine
    result = import_file(store, path)
    assert result.added == 3 and result.duplicates == []
    rows = store.prompts("set")
    assert rows[0]["messages"] == [{"role": "user", "content": "Hello"}]
    assert rows[0]["external_id"] == "a1"
    assert rows[0]["metadata"] == {"topic": "greeting", "difficulty": 2}
    assert rows[1]["messages"] == CHAT and rows[1]["external_id"] is None
    assert rows[2]["external_id"] == "7"
    assert store.prompt_sets()[0]["source"] == str(path)


def test_csv_with_prompt_and_json_messages_columns(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        "id,prompt,messages,lang\n"
        'x1,"Tell me a joke, please",,en\n'
        'x2,,"[{""role"": ""user"", ""content"": ""Bonjour""}]",fr\n'
    )
    assert import_file(store, path).added == 2
    rows = store.prompts("set")
    assert rows[0]["messages"][0]["content"] == "Tell me a joke, please"
    assert rows[0]["metadata"] == {"lang": "en"}
    assert rows[1]["messages"] == [{"role": "user", "content": "Bonjour"}]
    assert rows[1]["external_id"] == "x2"


def test_parquet_with_string_and_message_list_columns(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"messages": CHAT, "source": "a"},
                {"messages": [{"role": "user", "content": "Count to 3"}], "source": "b"},
            ]
        ),
        path,
    )
    assert import_file(store, path).added == 2
    assert store.prompts("set")[0]["messages"] == CHAT
    assert store.prompts("set")[1]["metadata"] == {"source": "b"}


def test_datasets_folder_and_split_choice(store: Store, tmp_path: Path) -> None:
    single = tmp_path / "ds"
    Dataset.from_list([{"prompt": "one", "score": 0.5}, {"prompt": "two", "score": 1.0}]).save_to_disk(single)
    assert import_file(store, single).added == 2
    assert store.prompts("set")[0]["metadata"] == {"score": 0.5}

    multi = tmp_path / "dsd"
    DatasetDict(
        {
            "train": Dataset.from_list([{"prompt": "three"}]),
            "test": Dataset.from_list([{"prompt": "four"}]),
        }
    ).save_to_disk(multi)
    with pytest.raises(PromptFileError, match=r"splits (train, test|test, train); choose one with --split"):
        read_prompts(multi)
    assert import_file(store, multi, split="test").added == 1
    assert store.prompts("set")[-1]["messages"][0]["content"] == "four"


# bad input: the error names the file, the place and the field; nothing is stored -------------
BAD_JSONL = [
    ([{"prompt": "ok"}, {"prompt": 3}], "line 2: field 'prompt' is int"),
    ([{"prompt": "ok"}, {"text": "hi"}], "line 2: field 'prompt' is missing"),
    ([{"prompt": "   "}], "line 1: field 'prompt' is an empty string"),
    ([{"prompt": []}], "line 1: field 'prompt' is an empty list"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "line 1: field 'messages' item 0: role 'robot'"),
    ([{"messages": [{"role": "user"}]}], "item 0: 'content' must be a non-empty string"),
    ([{"messages": ["hi"]}], "item 0 is str"),
    (
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
        "last message is from the assistant",
    ),
    ([{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}], "both 'prompt' and 'messages'"),
    ([{"prompt": "a", "id": [1]}], "field 'id' must be a string or an integer"),
    (["just a string"], "line 1: expected an object"),
]


@pytest.mark.parametrize(("rows", "message"), BAD_JSONL)
def test_bad_jsonl_records(store: Store, tmp_path: Path, rows: list, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PromptFileError) as err:
        import_file(store, path)
    assert str(path) in str(err.value)
    assert message in str(err.value)
    assert store.count("prompts") == 0 and store.count("prompt_sets") == 0


def test_broken_json_line_names_line_and_column(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n')
    with pytest.raises(PromptFileError, match=r"bad.jsonl line 3: not valid JSON .* column"):
        import_file(store, path)
    assert store.count("prompts") == 0


def test_bad_csv_files(store: Store, tmp_path: Path) -> None:
    no_column = tmp_path / "a.csv"
    no_column.write_text("question,answer\nwhat,that\n")
    with pytest.raises(
        PromptFileError,
        match=r"a.csv line 1: the header has no 'prompt' or 'messages' column \(found: question, answer\)",
    ):
        read_prompts(no_column)
    bad_json = tmp_path / "b.csv"
    bad_json.write_text('prompt,messages\nfine,\n,"[{oops"\n')
    with pytest.raises(PromptFileError, match=r"b.csv line 3: field 'messages' is not valid JSON"):
        read_prompts(bad_json)
    extra = tmp_path / "c.csv"
    extra.write_text("prompt\nfine\nnot,fine\n")
    with pytest.raises(PromptFileError, match=r"c.csv line 3: more fields than the header"):
        read_prompts(extra)
    empty_cell = tmp_path / "d.csv"
    empty_cell.write_text("prompt,lang\nhello,en\n,fr\n")
    with pytest.raises(PromptFileError, match=r"d.csv line 3: field 'prompt' is missing"):
        read_prompts(empty_cell)
    assert store.count("prompts") == 0


def test_bad_parquet_row_and_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": None}]), path)
    with pytest.raises(PromptFileError, match=r"p.parquet row 2: field 'prompt' is missing"):
        read_prompts(path)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PromptFileError, match="not a readable Parquet file"):
        read_prompts(broken)


def test_bad_datasets_row(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    Dataset.from_list([{"prompt": "fine"}, {"prompt": ""}]).save_to_disk(folder)
    with pytest.raises(PromptFileError, match=r"ds row 2: field 'prompt' is an empty string"):
        read_prompts(folder)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.txt").write_text("hello")
    with pytest.raises(PromptFileError, match=r"unknown format '.txt'; use .jsonl, .csv, .parquet"):
        read_prompts(tmp_path / "p.txt")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="no prompts found"):
        read_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        read_prompts(tmp_path / "latin.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PromptFileError, match="not one written by datasets' save_to_disk"):
        read_prompts(tmp_path / "folder")
