"""Expire-Span's read floor (``ModelConfig.read_floor``): a memory read on its ramp with at least
kappa times the uniform weight is pushed up, against the span loss's push down."""

from __future__ import annotations

import pytest
import torch

from expire_span.model import MemoryTransformer
from expire_span.model.attention import MultiHeadAttention
from tests.helpers import tiny_config
from tests.test_expire_span_formulas import (
    ALPHA,
    QUERY_STEPS,
    SPANS,
    STEPS,
    L,
    R,
    context_for,
    hand_mask,
    make_policy,
    set_spans_by_first_channel,
)

KAPPA = 2.0


def floor_decision(probs_seed: int = 0):
    policy = make_policy(read_floor=KAPPA)
    set_spans_by_first_channel(policy)
    context = context_for(policy, requires_grad=True)
    decision = policy.decide(context)
    columns = decision.bias_grad_index
    probs = torch.rand(1, len(QUERY_STEPS), columns.shape[1],
                       generator=torch.Generator().manual_seed(probs_seed))
    return context, decision, columns[0].tolist(), probs


def seen_by(query: int) -> int:
    """Keys query ``query`` sees with a nonzero weight (itself included)."""
    return sum(key <= query and hand_mask(span, query, key) > 0
               for key, span in zip(STEPS, SPANS, strict=True))


def test_read_floor_value_and_gradient_match_hand_computation():
    context, decision, columns, probs = floor_decision()
    loss = decision.read_loss(probs)
    loss.backward()
    total, grads, reads, unread = 0.0, [0.0] * len(STEPS), 0, 0
    for qi, query in enumerate(QUERY_STEPS):
        for ci, key in enumerate(columns):
            span, p = SPANS[key], probs[0, qi, ci].item()
            m = hand_mask(span, query, key)
            if not (key <= query and 0 < m < 1):
                continue
            if p * seen_by(query) < KAPPA:
                unread += 1
                continue
            reads += 1
            total += 1 - m
            s = span / L  # d e / d h0 = L s (1 - s); d (1 - m) / d e = -1 / R
            grads[key] -= 1 / R * L * s * (1 - s)
    assert reads >= 2 and unread >= 1  # the random weights fall both sides of kappa
    assert loss.item() == pytest.approx(ALPHA * R * total, rel=1e-5)
    torch.testing.assert_close(context.inputs.grad[0, :, 0], ALPHA * R * torch.tensor(grads))


@pytest.mark.parametrize("ratio, held", [(0.99, False), (1.01, True)])
def test_only_memories_read_above_kappa_times_uniform_are_pushed_up(ratio, held):
    # Every ramp pair read at ratio * kappa / n: just below kappa nothing changes (the span loss
    # shortens every ramp memory); just above, each read pushes its memory up by alpha, more
    # than the span loss's alpha / (R T B) per pair.
    context, decision, columns, probs = floor_decision()
    weights = torch.tensor([[ratio * KAPPA / seen_by(q)] for q in QUERY_STEPS]).expand_as(probs)
    (decision.aux_loss + decision.read_loss(weights)).backward()
    grad = context.inputs.grad[0, :, 0]
    # (A pair exactly at m = 0 is hidden, read with p = 0, yet the clamp passes the ramp loss's
    # gradient there: memories with such a pair are left out.)
    masks = {k: [hand_mask(SPANS[k], q, k) for q in QUERY_STEPS if k <= q] for k in columns}
    on_ramp = [k for k, ms in masks.items() if any(0 < m < 1 for m in ms) and 0.0 not in ms]
    assert on_ramp
    for key in on_ramp:  # descending the loss shortens the span where the gradient is > 0
        assert (grad[key].item() < 0) == held, f"memory {key}"


def test_no_read_floor_without_kappa_or_alpha():
    for overrides in ({}, {"read_floor": KAPPA, "alpha": 0.0}):
        config = tiny_config(**overrides)
        policy = MemoryTransformer(config).layers[0].policy
        context = context_for_policy(policy)
        assert policy.decide(context).read_loss is None


def context_for_policy(policy):
    from expire_span.memory import LayerMemory
    from expire_span.policies import BlockContext

    inputs = torch.randn(1, 6, policy.config.d_model, requires_grad=True)
    steps = torch.arange(6).unsqueeze(0)
    age = torch.arange(3, 6).view(1, -1, 1) - steps.unsqueeze(1)
    states = LayerMemory(inputs.detach(), steps, torch.ones(1, 6, dtype=torch.bool))
    return BlockContext(states, inputs, age, age >= 0, next_step=6)


def test_column_probs_are_the_weights_the_attention_reads_with():
    # One head and an identity output projection: probabilities on every column times the
    # values must give the attention's own output (rotation, scaling, bias and normaliser).
    config = tiny_config(d_model=8, n_heads=1)
    attention = MultiHeadAttention(config).eval()
    with torch.no_grad():
        attention.out.weight.copy_(torch.eye(8))
    torch.manual_seed(0)
    batch, queries, keys = 2, 3, 7
    key_steps = torch.arange(keys).expand(batch, -1)
    query_steps = torch.arange(keys - queries, keys)
    key_values = attention.keys_values(torch.randn(batch, keys, 8), key_steps)
    bias = torch.randn(batch, 1, queries, keys)
    bias[0, 0, :, 1] = float("-inf")
    query_inputs = torch.randn(batch, queries, 8)
    rotation = attention.rotary.tables(query_steps, query_inputs.dtype)
    every_column = torch.arange(keys).expand(batch, -1)
    probs = attention.column_probs(query_inputs, rotation, key_values, bias, every_column)
    values = key_values.chunk(2, dim=-1)[1]
    expected = attention(query_inputs, query_steps, key_values, bias.clone())
    torch.testing.assert_close(probs @ values, expected)
    assert probs[0, :, 1].abs().max().item() == 0.0


def test_the_layer_adds_the_read_floor_to_the_auxiliary_loss():
    # Same weights with and without the floor: the floor adds a positive term whose gradient
    # lengthens spans (descending it raises the span predictors' biases).
    torch.manual_seed(0)
    tokens = torch.randint(0, 13, (2, 40))
    grads, aux = [], []
    for kappa in (0.0, 1.0):
        torch.manual_seed(1)
        model = MemoryTransformer(tiny_config(read_floor=kappa, alpha=1.0, init_percentage=0.2))
        model.train()
        out = model(tokens)
        out.aux_loss.backward()
        aux.append(out.aux_loss.item())
        grads.append(sum(layer.policy.span_predictor.bias.grad.item() for layer in model.layers))
    assert aux[1] > aux[0] > 0
    assert grads[1] < grads[0]


@pytest.mark.parametrize("overrides, message", [
    ({"read_floor": -1.0}, "read_floor must be 0"),
    ({"read_floor": 0.5}, "read_floor must be 0"),
    ({"read_floor": 2.0, "attention": "flex"}, "attention='flex'"),
])
def test_bad_read_floor_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
