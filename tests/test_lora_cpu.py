"""The grouped LoRA products that replace vLLM's CPU ones: the same numbers as vLLM's ops for
every token with an adapter, none for a token without (vLLM's CPU ops gave it the last slot's)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from studio.serving import lora_cpu

vllm_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
VLLM = {name: getattr(vllm_ops, name) for name in NAMES}  # before any install in this process


@pytest.fixture()
def installed() -> Iterator[object]:
    """Ours in vLLM's modules for one test, vLLM's again after it."""
    from vllm.lora.punica_wrapper import punica_cpu

    saved = [(module, name, getattr(module, name)) for module in (vllm_ops, punica_cpu) for name in NAMES]
    assert lora_cpu.install()
    yield punica_cpu
    for module, name, fn in saved:
        setattr(module, name, fn)


SLOTS, WIDTH, RANK, ROWS = 3, 48, 8, 11


def weights(out: int, inp: int, stacked: bool = True, zero_last: bool = False) -> torch.Tensor:
    torch.manual_seed(out * 31 + inp)
    w = torch.randn(SLOTS, 1, out, inp) if stacked else torch.randn(SLOTS, out, inp)
    if zero_last:
        w[-1] = 0
    return w


@pytest.mark.parametrize(
    "indices",
    [[0] * ROWS, [2] * ROWS, [0, 1, 0, 2, 2, 1, 0, 0, 1, 2, 2], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]],
    ids=["one-adapter", "last-slot", "three-mixed", "two-mixed"],
)
@pytest.mark.parametrize("stacked", [True, False], ids=["4d", "3d"])
def test_the_products_match_vllms_ops(indices: list[int], stacked: bool) -> None:
    idx = torch.tensor(indices)
    x = torch.randn(ROWS, WIDTH)
    a = weights(RANK, WIDTH, stacked)
    ours, theirs = torch.zeros(ROWS, RANK + 4), torch.zeros(ROWS, RANK + 4)
    lora_cpu.bgmv_shrink(x, a, ours, idx, 0.5)
    VLLM["bgmv_shrink"](x, a, theirs, idx, 0.5)
    torch.testing.assert_close(ours, theirs)

    h = torch.randn(ROWS, RANK)
    b = weights(WIDTH, RANK, stacked)
    for add in (True, False):
        start = torch.randn(ROWS, WIDTH + 3)
        ours, theirs = start.clone(), start.clone()
        lora_cpu.bgmv_expand(h, b, ours, idx, add)
        VLLM["bgmv_expand"](h, b, theirs, idx, add)
        torch.testing.assert_close(ours, theirs)

        start = torch.randn(ROWS, 3 * WIDTH)
        ours, theirs = start.clone(), start.clone()
        lora_cpu.bgmv_expand_slice(h, b, ours, idx, WIDTH, WIDTH, add)
        VLLM["bgmv_expand_slice"](h, b, theirs, idx, WIDTH, WIDTH, add)
        torch.testing.assert_close(ours, theirs)


def test_a_single_row_meets_every_row_of_a_taller_output() -> None:
    b = weights(WIDTH, RANK)
    h, idx = torch.randn(1, RANK), torch.tensor([1])
    start = torch.randn(5, WIDTH)
    ours, theirs = start.clone(), start.clone()
    lora_cpu.bgmv_expand(h, b, ours, idx, True)
    VLLM["bgmv_expand"](h, b, theirs, idx, True)
    torch.testing.assert_close(ours, theirs)


def test_a_token_without_an_adapter_gets_no_update() -> None:
    """Index -1 is the base. vLLM's CPU ops read it as the last slot: with an adapter there,
    the base's rows were changed by it. With that slot empty (zeros) both agree."""
    idx = torch.tensor([-1, 0, -1, 2, 1, -1, -1, 0, 2, 1, -1])
    x = torch.randn(ROWS, WIDTH)
    a = weights(RANK, WIDTH)
    ours, theirs = torch.full((ROWS, RANK), 7.0), torch.full((ROWS, RANK), 7.0)
    lora_cpu.bgmv_shrink(x, a, ours, idx, 1.0)
    VLLM["bgmv_shrink"](x, a, theirs, idx, 1.0)
    base = idx == -1
    assert torch.all(ours[base] == 0)  # shrink writes the product: none for the base
    assert not torch.allclose(theirs[base], torch.zeros_like(theirs[base]))  # the last slot's
    torch.testing.assert_close(ours[~base], theirs[~base])

    h, b = torch.randn(ROWS, RANK), weights(WIDTH, RANK, zero_last=True)
    start = torch.randn(ROWS, WIDTH)
    ours, theirs = start.clone(), start.clone()
    lora_cpu.bgmv_expand(h, b, ours, idx, True)
    VLLM["bgmv_expand"](h, b, theirs, idx, True)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours[base], start[base])  # untouched


def test_install_replaces_the_ops_where_vllms_cpu_wrapper_looks_them_up(installed: object) -> None:
    punica_cpu = installed
    assert VLLM["bgmv_shrink"] is not lora_cpu.bgmv_shrink
    assert punica_cpu.bgmv_shrink is lora_cpu.bgmv_shrink
    assert punica_cpu.bgmv_expand is lora_cpu.bgmv_expand
    assert vllm_ops.bgmv_expand_slice is lora_cpu.bgmv_expand_slice


def test_the_prefill_ops_use_ours_once_installed(installed: object) -> None:
    """vLLM's sgmv_* ops explode per-sequence indices and call the bgmv_* ones by name."""
    x, a = torch.randn(ROWS, WIDTH), weights(RANK, WIDTH)
    seq_idx, lengths = torch.tensor([1, -1, 2]), torch.tensor([4, 3, 4])
    via_prefill, direct = torch.ones(ROWS, RANK), torch.ones(ROWS, RANK)
    vllm_ops.sgmv_shrink(x, a, via_prefill, None, lengths, seq_idx, 3, 4, ROWS, 1.0)
    lora_cpu.bgmv_shrink(x, a, direct, torch.repeat_interleave(seq_idx, lengths), 1.0)
    torch.testing.assert_close(via_prefill, direct)
    assert torch.all(via_prefill[4:7] == 0)  # the base's sequence: ours, not the last slot's
