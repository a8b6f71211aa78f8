"""``grace``: expired memories probed for G steps past their ramp (docs/expire-span.md, "A
gradient past the ramp"), against hand computations; the forward and the memory count unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from expire_span import ModelConfig
from expire_span.model.attention import dense_attention
from expire_span.model.ramp_attention import ramp_bias_attention
from expire_span.policies.base import log_mask_bias, ramp_mask
from expire_span.policies.expire_span import probe_expired
from tests.helpers import stream, tiny_model

R, G = 4, 8


def one_query(grace: int, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One query, two keys: A fully alive (span 10, age 1), B expired (span 1, age 7: r = -6,
    u = 1 + r / R = -0.5, within a grace of 8 steps = 2 R). Scores 0 and ln 2, values 1 and 3
    (first channel); the loss is the output's first channel. Returns (loss, dL/de)."""
    spans = torch.tensor([10.0, 1.0], dtype=torch.float64, requires_grad=True)
    remaining = (spans - torch.tensor([1.0, 7.0], dtype=torch.float64)).view(1, 1, 2)
    bias = log_mask_bias(ramp_mask(remaining, R))
    if grace:
        bias = probe_expired(bias, remaining, R, grace)
    bias = bias.unsqueeze(1)  # [B, 1, T, N]
    q = torch.tensor([math.sqrt(2), 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    k = torch.tensor([[0.0, 0.0], [math.log(2), 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
    if fused:
        index = torch.tensor([[0, 1]])
        out = ramp_bias_attention(q, k, v, bias.detach(), index, bias)
    else:
        out = dense_attention(q, k, v, bias, 0.0)
    loss = out[0, 0, 0, 0]
    loss.backward()
    return loss.detach(), spans.grad


@pytest.mark.parametrize("fused", [False, True], ids=["dense", "fused-columns"])
def test_probe_gradient_by_hand(fused):
    """dL/du_B = exp(s_B - lse) (v_B - out) = exp(ln 2 - 0) (3 - 1) = 4, so dL/de_B = 4 / R = 1;
    A is clamped at 1 (r = 9 > 0): no gradient. The output stays 1 (B weighs 2e-12)."""
    loss, grad = one_query(G, fused)
    assert abs(float(loss) - 1.0) < 1e-11
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.0], dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)
    loss, grad = one_query(0, fused)  # without grace the clamp stops it
    assert float(loss) == 1.0 and grad.abs().max() == 0


def test_probe_window_is_g_steps_past_the_ramp():
    """u = 1 + r / R: on the ramp (0, 1] the bias is log u; probes in (-G / R, 0]; beyond, -inf."""
    remaining = torch.tensor([-2.0, -4.0, -7.9, -12.0, -12.1], dtype=torch.float64)  # u: .5 0 ...
    bias = probe_expired(log_mask_bias(ramp_mask(remaining, R)), remaining, R, G)
    probe = math.log(1e-12)
    want = [math.log(0.5), probe, probe, float("-inf"), float("-inf")]
    assert bias.tolist() == pytest.approx(want)


def test_grace_changes_no_output_and_no_memory_count():
    """Training mode, float64: the same logits (to the probes' 1e-12 weight) and the same
    attended-memory count with and without grace, while the cache holds more (the probed
    memories); evaluation: the same logits and the same cache (nothing is kept for probes)."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 13, (3, 56), generator=generator)
    results = {}
    for grace in (0, 6):
        model = tiny_model("expire-span", seed=5, max_span=24, ramp=4, grace=grace).double()
        model.train()
        memory, logits, sizes, caches = None, [], [], []
        for chunk in tokens.split(8, dim=1):
            out = model(chunk, memory)
            memory = out.memory
            logits.append(out.logits.detach())
            sizes.append(out.memory_size)
            caches.append(int(memory.sizes.sum()))
        model.eval()
        with torch.no_grad():
            evaluated, kept = stream(model, tokens, [8] * 7)
        results[grace] = logits, sizes, caches, evaluated, kept.sizes
    for got, want in zip(results[6][0], results[0][0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for got, want in zip(results[6][1], results[0][1], strict=True):
        assert torch.equal(got, want)
    assert all(a >= b for a, b in zip(results[6][2], results[0][2], strict=True))
    assert sum(results[6][2]) > sum(results[0][2])
    torch.testing.assert_close(results[6][3], results[0][3], rtol=1e-12, atol=1e-12)
    assert torch.equal(results[6][4], results[0][4])


@pytest.mark.parametrize("bad", [{"grace": -1}, {"grace": 2.5}, {"grace": True},
                                 {"grace": 4, "attention": "flex"}])
def test_bad_grace_is_refused(bad):
    with pytest.raises(ValueError, match="grace"):
        ModelConfig(vocab_size=8, d_model=8, n_heads=2, block_len=4, max_span=16, **bad)


def span_gradients(aux_weight: float, grace: int = 6) -> dict[str, torch.Tensor]:
    """The span predictor's gradients of a float64 training stream with the policies' weight
    set as the trainer's gate sets it. One layer: in a stack a lower layer's probes are scaled
    by the weight times a gradient that already holds the upper layers' probes (second order)."""
    model = tiny_model("expire-span", seed=5, max_span=24, ramp=4, grace=grace,
                       n_layers=1).double().train()
    for layer in model.layers:
        layer.policy.aux_weight = aux_weight
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 13, (3, 56), generator=generator)
    memory = None
    for chunk in tokens.split(8, dim=1):
        out = model(chunk, memory)
        (out.logits.sum() + out.aux_loss).backward()
        memory = out.memory
    return {name: p.grad.clone() for name, p in model.named_parameters() if "span" in name}


def test_probes_act_as_strongly_as_the_span_loss():
    """The probes' share of the span gradient is proportional to the gate's weight: none while
    the span loss is held (the run equals one without grace), half of it at weight 0.5."""
    off, full, half, held = (span_gradients(0.0, grace=0), span_gradients(1.0),
                             span_gradients(0.5), span_gradients(0.0))
    for name in off:
        probes = full[name] - off[name]
        assert probes.abs().max() > 1e-3
        torch.testing.assert_close(held[name], off[name], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(half[name] - off[name], 0.5 * probes, rtol=1e-6, atol=1e-9)


def test_held_keeps_nothing_for_probes():
    """While the span loss is held the run is the one without grace, bit for bit: the same
    logits and the same cache (no probed memories kept, which would reorder sums)."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 13, (3, 56), generator=generator)
    runs = {}
    for grace in (0, 6):
        model = tiny_model("expire-span", seed=5, max_span=24, ramp=4, grace=grace).train()
        for layer in model.layers:
            layer.policy.aux_weight = 0.0
        memory, outputs = None, []
        for chunk in tokens.split(8, dim=1):
            out = model(chunk, memory)
            memory = out.memory
            outputs.append((out.logits.detach(), memory.sizes.clone()))
        runs[grace] = outputs
    for (logits, sizes), (want_logits, want_sizes) in zip(runs[6], runs[0], strict=True):
        assert torch.equal(sizes, want_sizes)
        assert torch.equal(logits, want_logits)


def test_the_gate_gives_its_weight_to_every_policy():
    from expire_span.training.aux_gate import AuxiliaryGate

    model = tiny_model("expire-span", grace=6)
    gate = AuxiliaryGate(hold=0.5, release_step=10, ramp=4)
    assert gate.apply(model, 0) == 0.0
    assert all(layer.policy.aux_weight == 0.0 for layer in model.layers)
    gate.opened_at = 6  # released at step 6, ramp of 4 steps
    assert gate.apply(model, 7) == 0.5
    assert all(layer.policy.aux_weight == 0.5 for layer in model.layers)
