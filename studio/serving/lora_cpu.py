"""Runtime-LoRA products for vLLM on the CPU: one matmul per adapter in the batch.

vLLM's CPU path (`vllm/lora/ops/torch_ops`, used by `PunicaWrapperCPU`) computes a LoRA layer's
product by first gathering, for every token, a copy of its adapter's matrices
(`weights[indices]`: tokens x out x in) and then a batched matrix-vector product. That copy
grows with tokens x rank x width for every LoRA layer, and with the 49k-token vocabulary for
the logits layer: measured on the 2-core CPU, requests cost 2.5-3.5x as much on a server with
runtime LoRA as without it (benchmarks/README.md, evaluation.py). Here the rows of each adapter
are gathered instead, and multiplied by its matrices once.

A token without an adapter has index -1. vLLM's CPU ops index with it too, which selects the
last slot, so a base request batched beside a second adapter got that adapter's update; here a
row with index -1 gets none, as on a GPU (the Triton kernels skip it).

`install()` puts these in place of vLLM's in the running process; `studio.serving.vllm_launcher`
calls it in vLLM's processes.
"""

from __future__ import annotations

from typing import Any

import torch


def lora_product(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Row b of `inputs` times the transpose of `weights[indices[b]]`: (rows x in) -> (rows x out),
    in `dtype`. `weights` is (slots x out x in), or (slots x 1 x out x in) as vLLM stacks it.
    Rows with index -1 (no adapter) are 0."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    out = torch.zeros((x.shape[0], weights.shape[1]), dtype=dtype, device=x.device)
    slots = torch.unique(indices).tolist()
    for slot in slots:
        if slot < 0:
            continue
        w = weights[slot].to(dtype)
        if len(slots) == 1:  # the common case: one adapter (or the base) for the whole batch
            return torch.mm(x, w.t(), out=out)
        rows = (indices == slot).nonzero().squeeze(1)
        out.index_copy_(0, rows, torch.mm(x.index_select(0, rows), w.t()))
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """output[:, :rank] = scaling * (x A^T), per row's adapter."""
    product = lora_product(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : product.shape[1]] = scaling * product


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """output (+)= x B^T, per row's adapter. The adapter and the model may pad their widths
    differently: the common width is written. A single row of products meets every row of a
    taller output (broadcast), as vLLM's op does."""
    product = lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    rows = 1 if product.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    width = min(product.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :width] += product[:rows, :width]
    else:
        output_tensor[:, :width] = product[:rows, :width]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """output[:, offset:offset + size] (+)= x B^T, per row's adapter (one slice of a fused
    projection such as q/k/v)."""
    product = lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += product
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = product


def install() -> bool:
    """Use these in this process's vLLM: in its torch ops module (whose sgmv_* prefill ops call
    the bgmv_* ones by name) and in the CPU punica wrapper, which imported them by name. False,
    leaving vLLM as it is, when the installed vLLM has not these modules (a GPU build, another
    version)."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    ours: dict[str, Any] = {
        "bgmv_shrink": bgmv_shrink,
        "bgmv_expand": bgmv_expand,
        "bgmv_expand_slice": bgmv_expand_slice,
    }
    for module in (lora_ops, punica_cpu):
        for name, fn in ours.items():
            if hasattr(module, name):
                setattr(module, name, fn)
    return True
