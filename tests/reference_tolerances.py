"""How close our encoder must come to tensors computed elsewhere (tests/fixtures: Meta's reference,
run on another CPU), and why.

A CPU's matmul and conv kernels add in an order of their own (AVX2 or AVX-512 blocking, FMA or
not, AMX), so the same fp32 model gives slightly different numbers from one CPU to the next. Bit
equality with a fixture is therefore only a property of the machine that wrote it. It stays the
right check where both sides run on the same machine: a checkpoint round trip, or two paths of our
own code (tests/test_checkpoints.py, tests/test_timm_adapter.py).

fp32 (``assert_fp32_close``): max |ours - ref| <= 1e-5 * max |ref|, per tensor.
    fp32 rounds to u = 2^-24 ~ 6e-8. The longest sums here are the patch embedding (3*16*16 = 768
    terms, 4*256 = 1024 with four input channels) and the MLP (256). Reordering an n-term sum
    changes it by about sqrt(n) * u ~ 2e-6 of the operands' scale in practice, n * u ~ 6e-5 at
    worst; four blocks add such errors and the final LayerNorm keeps them relative. 1e-5 lies
    between the two: 27x the 3.7e-7 (1.7e-6 absolute, |ref| <= 6.4) seen between the fixture's CPU
    and an AVX-512/AMX one, 4x the 2.5e-6 of four identical channels against one (1.4e-6 for a
    summed one-channel kernel against the RGB reference). What it cannot see is a LayerNorm eps of
    1e-5 instead of 1e-6 (3.6e-5 absolute, 0.6e-5 relative), so the tests check the eps structurally.

bf16 RoPE (``assert_bf16_rope_close``): mean |ours - ref| <= 1e-3 and max |ours - ref| <= 3e-2.
    MedDINOv3 rounds q and k to bf16 before the rotation: 29,696 values in the fixture's forward
    pass. bf16 keeps 8 significant bits: neighbouring bf16 numbers are 2^-8 to 2^-7 of the value
    apart, so rounding errs by up to half that (2^-9 to 2^-8). Another CPU's fp32 q and k differ by
    ~1e-7 relative (its fp32 outputs differ by 3.7e-7 after four blocks), so a value lying within
    that distance of the midpoint between two bf16 numbers rounds the other way there: probability
    ~ 2 * 1e-7 / 2^-7.5 ~ 4e-5 per value, about 1 flip per forward pass and rarely more than 5
    (Poisson). (The 384 bf16 sin/cos values come from the same bf16 coordinates on every CPU and
    flip only if a vector sin/cos is off by an fp32 ulp at a midpoint: negligible.) One flip moves
    one q or k entry by a whole spacing (up to 2^-7 * 7.0, the largest |q|, = 0.055), and the
    softmax and later blocks carry that to the outputs.
    Flipping single entries by one spacing (1000 random entries, this fixture) moved the
    mean |diff| by 3e-6 (median), 1.7e-4 (99th percentile), 2.9e-4 (max), and the max |diff| by
    8e-4 (median), 7.7e-3 (99th percentile), 1.3e-2 (max). The AVX-512/AMX CPU showed 2.9e-6 mean
    and 2.2e-4 max, from flips in block 2.
    Five flips at the 99th percentile add up to a mean of 8.5e-4, hence 1e-3. That is 4x below the
    4.1e-3 mean by which fp32 RoPE misses the bf16 reference, so the bound still tells the two
    apart. The max |diff| cannot: one unlucky flip (1.3e-2) already exceeds the 1e-2 that separates
    fp32 from bf16 RoPE in max terms. It is kept at half of the full bf16 effect (6.1e-2) as a guard
    against errors confined to a few tokens, which the mean would dilute.
"""
from __future__ import annotations

from typing import Sequence

import torch

FP32_RTOL = 1e-5
BF16_ROPE_MEAN_ATOL = 1e-3
BF16_ROPE_MAX_ATOL = 3e-2


def assert_fp32_close(ours: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], what: str = "") -> None:
    assert len(ours) == len(reference), what
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        diff, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert diff <= FP32_RTOL * scale, f"{what}[{i}]: max |diff| {diff:.3g} > {FP32_RTOL:g} * max |ref| {scale:.3g}"


def assert_bf16_rope_close(ours: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], what: str = "") -> None:
    assert len(ours) == len(reference), what
    assert all(a.shape == b.shape for a, b in zip(ours, reference)), what
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(ours, reference)])
    mean, worst = diff.mean().item(), diff.max().item()
    assert mean <= BF16_ROPE_MEAN_ATOL, f"{what}: mean |diff| {mean:.3g} > {BF16_ROPE_MEAN_ATOL:g}"
    assert worst <= BF16_ROPE_MAX_ATOL, f"{what}: max |diff| {worst:.3g} > {BF16_ROPE_MAX_ATOL:g}"
