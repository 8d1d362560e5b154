"""One name rule for versions, aliases, prompt sets, campaigns and users (studio/names.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio import arena, campaigns, users
from studio.importer import messages_hash
from studio.names import check_name, is_valid
from studio.runtime import version_name_for
from studio.store import ImportedPrompt, Store, StoreError

BAD = [
    "../../evil",
    "x" * 20_000,
    "<b>bold</b>",
    "a'; DROP TABLE campaigns; --",
    "",
    "-leading-dash",
    ".hidden",
    "has space",
    "trailing-newline\n",
    "slash/inside",
    "caf\u00e9",
    "\ud800",
]


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "s.duckdb")
    s.register_model_version("base", path="/m/base", content_hash="b" * 64, source="test")
    campaigns.ensure_policy_alias(s, "base")
    msgs = [{"role": "user", "content": "hi?"}]
    s.import_prompts("set1", [ImportedPrompt("row 1", msgs, messages_hash(msgs))], source="test")
    return s


def one_prompt() -> list[ImportedPrompt]:
    msgs = [{"role": "user", "content": "hello?"}]
    return [ImportedPrompt("row 1", msgs, messages_hash(msgs))]


@pytest.mark.parametrize("name", BAD)
def test_every_kind_of_name_is_refused_by_the_one_rule_with_a_short_echo(name: str) -> None:
    for kind in ("version", "alias", "prompt set", "campaign", "user"):
        with pytest.raises(StoreError, match=f"{kind} name") as err:
            check_name(kind, name)
        assert len(str(err.value)) < 300  # a 20,000-character name is not echoed whole
        assert "use 1-64 letters" in str(err.value)


def test_good_names_pass_and_user_names_may_hold_an_at_sign() -> None:
    for name in ("base", "dpo-abc123", "v1.2_rc", "A", "9" * 64):
        assert check_name("campaign", name) == name
    assert not is_valid("campaign", "9" * 65)
    assert check_name("user", "ann@example.org") == "ann@example.org"
    assert not is_valid("campaign", "ann@example.org")
    # an external server's own model id keeps its slash, never a path escape
    assert check_name("served model", "meta-llama/Llama-3-8B:instruct")
    for bad in ("../x", "a/../b", "/abs"):
        assert not is_valid("served model", bad)
    with pytest.raises(StoreError, match="expected text"):
        check_name("campaign", 12)


def test_each_entry_point_refuses_a_bad_name_and_stores_nothing(store: Store) -> None:
    before = {t: store.count(t) for t in ("model_versions", "prompt_sets", "campaigns", "aliases", "users")}
    for name in BAD:
        with pytest.raises(StoreError, match="version name"):
            store.register_model_version(name, path="/m/x", content_hash="x" * 64, source="t")
        with pytest.raises(StoreError, match=r"prompt set name|--set"):
            store.import_prompts(name, one_prompt(), source="t")
        with pytest.raises(StoreError, match="campaign name"):
            campaigns.create_campaign(store, name, prompt_set="set1")
        with pytest.raises(StoreError, match="alias name"):
            campaigns.set_alias(store, name, "base")
        with pytest.raises(StoreError, match="user name"):
            users.add_user(store, name, "annotator", "password123")
    store.register_model_version("other", path="/m/o", content_hash="o" * 64, source="t")
    with pytest.raises(StoreError, match="campaign name"):
        arena.create_battle_campaign(store, "../../evil", prompt_set="set1", versions=["base", "other"])
    after = {t: store.count(t) for t in before}
    assert after == {**before, "model_versions": before["model_versions"] + 1}


def test_an_alias_may_not_take_a_versions_name_nor_the_reverse(store: Store) -> None:
    with pytest.raises(StoreError, match="alias 'base' is a version's name"):
        campaigns.set_alias(store, "base", "base")
    with pytest.raises(StoreError, match="version name 'policy' is an alias's name"):
        store.register_model_version("policy", path="/m/p", content_hash="p" * 64, source="t")
    store.register_model_version("v2", path="/m/v2", content_hash="2" * 64, source="t")
    campaigns.set_alias(store, "policy", "v2")  # moving an existing alias still works
    campaigns.set_alias(store, "candidate", "v2")
    assert campaigns.aliases(store) == {"policy": "v2", "candidate": "v2"}


def test_names_stored_before_the_rule_stay_readable_and_usable(store: Store) -> None:
    legacy = "old name with spaces"
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO model_versions (name, kind, path, content_hash, source)"
            " VALUES (?, 'full', '/m/l', ?, 't')",
            [legacy, "l" * 64],
        )
        cur.execute("INSERT INTO prompt_sets (name, source) VALUES (?, 't')", [legacy])
        cur.execute("INSERT INTO aliases (name, version) VALUES (?, 'base')", [legacy])
    # registering the same content again (as every start does for the base) is not refused
    assert (
        store.register_model_version(legacy, path="/m/l", content_hash="l" * 64, source="t")["name"] == legacy
    )
    assert store.import_prompts(legacy, one_prompt(), source="t").added == 1
    campaigns.set_alias(store, legacy, legacy)
    assert campaigns.resolve_model(store, legacy) == legacy
    assert store.model_version(legacy)["name"] == legacy


def test_unknown_names_in_messages_are_cut_short(store: Store) -> None:
    for i in range(30):
        with store.transaction() as cur:  # as an old studio could have stored them
            cur.execute(
                "INSERT INTO model_versions (name, kind, path, content_hash, source)"
                " VALUES (?, 'full', '/m', ?, 't')",
                [f"{i}" + "y" * 5_000, f"{i}" * 64],
            )
    with pytest.raises(StoreError) as err:
        store.model_version("z" * 20_000)
    assert len(str(err.value)) < 2_000 and "more)" in str(err.value)
    with pytest.raises(StoreError) as err:
        campaigns.create_campaign(store, "c1", prompt_set="q" * 20_000)
    assert len(str(err.value)) < 500


def test_version_names_from_folders_follow_the_rule(tmp_path: Path) -> None:
    for folder in ("_private model", "my.model (v2)", "x" * 100, "---"):
        name = version_name_for(tmp_path / folder)
        assert is_valid("version", name), name
