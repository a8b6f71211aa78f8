"""The whole Expire-Span model against a naive dense reference written from SPEC.md's formulas
(tests/expire_span_reference.py): logits, auxiliary losses and the gradient of every parameter,
over several consecutive calls with the memory carried, pruning on, in float64.

Tolerance: relative 1e-9 (absolute 1e-12 for entries near zero). Both sides compute the same
sums in a different order in float64 (round-off ~1e-16), so any difference in the method (a
memory deleted too early, a mask entry off by one step, a wrong loss scale) shows up many
orders of magnitude above it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.expire_span_reference import ReferenceExpireSpan
from tests.helpers import record_uniforms, tiny_model

RTOL, ATOL = 1e-9, 1e-12
CHUNKS = [8, 8, 5, 11, 8, 8, 8]
"""Calls of the stream (blocks of M = 8: the 5 + 11 pair cuts blocks at other places)."""


def run_library(model, tokens, weights):
    """Each call's loss (weighted logits plus auxiliary loss) backpropagated; the memory carried
    (detached between calls, so the gradients add up)."""
    seen = record_uniforms(model)
    memory, logits, aux, start = None, [], [], 0
    for size in CHUNKS:
        out = model(tokens[:, start:start + size], memory)
        ((out.logits * weights[:, start:start + size]).sum() + out.aux_loss).backward()
        logits.append(out.logits.detach())
        aux.append(out.aux_loss.detach())
        memory, start = out.memory, start + size
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits, aux, grads, memory, seen


def run_reference(model, tokens, weights, uniforms: list[float] | None):
    reference = ReferenceExpireSpan(model)
    logits, aux, start, block = [], [], 0, 0
    for size in CHUNKS:
        blocks = -(-size // model.config.block_len)
        draws = None if uniforms is None else uniforms[block:block + blocks]
        call_logits, call_aux = reference(tokens[:, start:start + size], draws)
        ((call_logits * weights[:, start:start + size]).sum() + call_aux).backward()
        logits.append(call_logits.detach())
        aux.append(call_aux.detach())
        start, block = start + size, block + blocks
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits, aux, grads


@pytest.mark.parametrize("attention", ["auto", "dense"])
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("noisy", [False, True], ids=["exact", "noisy"])
def test_library_equals_the_naive_dense_reference(noisy, pre_norm, attention):
    model = tiny_model("expire-span", seed=5, noisy=noisy, pre_norm=pre_norm,
                       attention=attention, alpha=0.5, max_span=24, ramp=4).double().train()
    reference_model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 13, (3, sum(CHUNKS)), generator=generator)
    weights = torch.randn(3, sum(CHUNKS), 13, generator=generator, dtype=torch.float64)

    torch.manual_seed(1)
    logits, aux, grads, memory, seen = run_library(model, tokens, weights)
    blocks = sum(-(-size // 8) for size in CHUNKS)
    uniforms = seen[0] if noisy else None
    if noisy:
        assert all(len(layer) == blocks for layer in seen) and len(set(seen[0])) == blocks
    ref_logits, ref_aux, ref_grads = run_reference(reference_model, tokens, weights, uniforms)

    # The run exercised what it claims: memories were deleted, rows kept different numbers.
    assert int(memory.sizes.max()) < sum(CHUNKS) and len(set(memory.sizes[0].tolist())) > 1
    for got, want in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    for got, want in zip(aux, ref_aux, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert sum(ref_aux) > 0
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=RTOL, atol=ATOL, msg=name)
    for index in range(len(model.layers)):
        assert ref_grads[f"layers.{index}.policy.span_predictor.weight"].abs().min() > 0


@pytest.mark.parametrize("attention", ["auto", "dense"])
def test_grace_probes_equal_the_reference_mask_continued_below_zero(attention):
    """``grace``: the span predictor's gradient equals that of the reference whose mask entries
    expired less than G steps ago are 0 with the derivative of ``1 + r / R`` (the multiplicative
    form's exact derivative at ``m = 0``). The library's probes weigh 1e-12 in its forward,
    hence a tolerance of 1e-10 (still far below the probes' own contribution, checked)."""
    generator = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 13, (3, sum(CHUNKS)), generator=generator)
    weights = torch.randn(3, sum(CHUNKS), 13, generator=generator, dtype=torch.float64)
    grads = {}
    for grace in (0, 6):
        model = tiny_model("expire-span", seed=5, attention=attention, alpha=0.5, max_span=24,
                           ramp=4, grace=grace).double().train()
        reference_model = copy.deepcopy(model)
        logits, aux, grads[grace], memory, _ = run_library(model, tokens, weights)
        ref_logits, ref_aux, ref_grads = run_reference(reference_model, tokens, weights, None)
        for got, want in zip(logits + aux, ref_logits + ref_aux, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for name, want in ref_grads.items():
            torch.testing.assert_close(grads[grace][name], want, rtol=1e-10, atol=1e-10,
                                       msg=name)
    assert int(memory.sizes.max()) < sum(CHUNKS)  # memories were still deleted
    for index in range(2):
        name = f"layers.{index}.policy.span_predictor.weight"
        assert (grads[6][name] - grads[0][name]).abs().max() > 1e-3  # the probes acted
