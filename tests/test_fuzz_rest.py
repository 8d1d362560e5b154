"""Property tests (hypothesis) of the main REST routes' bodies against a real studio (real app,
real store, no model server): campaigns, battle campaigns, judgments (rankings, quick mode,
flags, edits), votes, sampling requests, training runs, imports, and the round trip import ->
judge -> export. What must hold is in tests/fuzz_rest.py, which benchmarks/reliability.py
also runs to count the 5xx answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import fuzz_rest
from tests.conftest import NoModelStudio

EXAMPLES = 40


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzz_rest.Env]:
    with NoModelStudio(tmp_path_factory.mktemp("fuzz")) as studio:
        store = studio.studio.store
        tokens = fuzz_rest.prepare(store)
        env = fuzz_rest.Env(studio.url, store, tokens)
        yield env
        env.client.close()


@pytest.mark.parametrize("route", sorted(fuzz_rest.FUZZERS))
def test_any_body_gets_a_4xx_naming_it_or_is_stored_whole(env: fuzz_rest.Env, route: str) -> None:
    recorder = fuzz_rest.Recorder(strict=True)
    fuzz_rest.FUZZERS[route](env, recorder, EXAMPLES)
    assert not recorder.problems
    assert sum(recorder.statuses.values()) >= EXAMPLES // 2


def test_import_judge_export_round_trip(env: fuzz_rest.Env) -> None:
    recorder = fuzz_rest.Recorder(strict=True)
    fuzz_rest.round_trip(env, recorder, 15)
    assert not recorder.problems
