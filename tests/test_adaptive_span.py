"""Adaptive-Span against hand computations and a naive per-query reference (SPEC.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch

from expire_span import MemoryTransformer
from expire_span.memory import LayerMemory
from expire_span.policies import BlockContext
from expire_span.policies.adaptive_span import AdaptiveSpanPolicy
from tests.helpers import stream, tiny_config, tiny_model

L, R, COEFF = 10, 4, 0.5


def make_policy(fractions=(0.25, 0.6), **overrides) -> AdaptiveSpanPolicy:
    config = tiny_config("adaptive-span", d_model=4, n_heads=2, block_len=2, max_span=L, ramp=R,
                         adapt_span_loss=COEFF, **overrides)
    policy = AdaptiveSpanPolicy(config, layer_index=0)
    with torch.no_grad():
        policy.span_fraction.copy_(torch.tensor(fractions))
    return policy


# Memories at steps 0..6, queries at steps 11 and 12 (the block is steps 11, 12; gaps are fine).
STEPS = [0, 1, 3, 5, 8, 9, 10, 11, 12]
QUERY_STEPS = [11, 12]


def context_for(steps=STEPS, queries=QUERY_STEPS) -> BlockContext:
    steps_t = torch.tensor([steps])
    age = torch.tensor(queries).view(1, -1, 1) - steps_t.unsqueeze(1)
    states = LayerMemory(torch.zeros(1, len(steps), 4), steps_t,
                         torch.ones(1, len(steps), dtype=torch.bool))
    return BlockContext(states, torch.zeros(1, len(steps), 4), age, age >= 0,
                        next_step=queries[-1] + 1)


def hand_mask(span: float, distance: int, max_span: int = L, ramp: int = R) -> float:
    if distance > max_span:
        return 0.0
    return min(max(1 + (span - distance) / ramp, 0.0), 1.0)


def test_mask_matches_hand_computation_per_head():
    policy = make_policy()  # spans z = (2.5, 6.0)
    bias = policy.decide(context_for()).bias
    assert bias.shape == (1, 2, 2, len(STEPS))
    mask = bias.exp()[0]
    for head, span in enumerate((2.5, 6.0)):
        for qi, query in enumerate(QUERY_STEPS):
            for ki, key in enumerate(STEPS):
                if key <= query:
                    expected = hand_mask(span, query - key)
                    assert mask[head, qi, ki].item() == pytest.approx(expected, abs=1e-6)
    # Written out: head 0 (z = 2.5) sees step 8 from step 11 (d = 3) with m = 1 - 0.5/4,
    assert mask[0, 0, 4].item() == pytest.approx(0.875, abs=1e-6)
    # head 1 (z = 6) sees step 3 from step 12 (d = 9) with m = 1 - 3/4, and nothing at d > 10.
    assert mask[1, 1, 2].item() == pytest.approx(0.25, abs=1e-6)
    assert bias[0, 1, 1, 1].item() == -math.inf  # step 1 from step 12: d = 11 > L
    assert not torch.isnan(bias).any()


def test_a_full_span_still_stops_at_max_span():
    policy = make_policy(fractions=(1.0, 1.0))  # z = L: the ramp would reach L + R - 1
    mask = policy.decide(context_for()).bias.exp()[0, :, 1]  # from step 12
    assert mask[:, STEPS.index(1)].tolist() == [0.0, 0.0]  # d = 11
    assert mask[:, STEPS.index(3)].tolist() == [1.0, 1.0]  # d = 9


def test_span_loss_is_coefficient_times_mean_span():
    policy = make_policy()
    aux = policy.decide(context_for()).aux_loss
    assert aux.item() == pytest.approx(COEFF * (2.5 + 6.0) / 2)
    aux.backward()
    # d/df_h of coeff * mean_h(L f_h) = coeff * L / H: descending it shortens every span
    torch.testing.assert_close(policy.span_fraction.grad, torch.full((2,), COEFF * L / 2))


def test_initial_spans_come_from_adapt_span_init():
    policy = AdaptiveSpanPolicy(tiny_config("adaptive-span", adapt_span_init=0.375), 0)
    torch.testing.assert_close(policy.spans(), torch.full((4,), 0.375 * 24))


def test_spans_are_clamped_into_range_after_each_optimizer_step():
    model = tiny_model("adaptive-span").train()
    with torch.no_grad():
        model.layers[0].policy.span_fraction.copy_(torch.tensor([-0.5, 0.3, 1.0, 2.0]))
    model.after_optimizer_step()
    torch.testing.assert_close(model.layers[0].policy.span_fraction.detach(),
                               torch.tensor([0.0, 0.3, 1.0, 1.0]))


def test_keep_is_what_some_head_can_still_see():
    policy = make_policy()  # largest span 6: the next query (13) sees d < 6 + 4
    keep = policy.decide(context_for()).keep[0].tolist()
    assert keep == [13 - step < 10 for step in STEPS]
    assert not all(keep) and any(keep)
    loose = make_policy(prune_expired=False).decide(context_for()).keep[0].tolist()
    assert loose == [13 - step <= L for step in STEPS]


def test_task_loss_trains_the_spans_through_the_ramp():
    model = tiny_model("adaptive-span", adapt_span_loss=0.0).train()
    out = model(torch.randint(0, 13, (2, 40)))
    assert out.aux_loss.item() == 0.0
    out.logits.square().mean().backward()
    for layer in model.layers:
        assert layer.policy.span_fraction.grad.abs().min() > 0


def test_trimming_is_exact_and_follows_the_spans():
    """Eval mode, 25 blocks: dropping what no head can see changes no logit, and the cache holds
    no more than the largest span plus the ramp."""
    tokens = torch.randint(0, 13, (3, 25 * 8), generator=torch.Generator().manual_seed(11))
    results = {}
    for prune in (True, False):
        model = tiny_model("adaptive-span", seed=4, prune_expired=prune, max_span=64, ramp=8)
        for layer in model.layers:
            torch.nn.init.uniform_(layer.policy.span_fraction, 0.0, 0.4)
        with torch.no_grad():
            logits, memory = stream(model, tokens, [8] * 25)
        results[prune] = (logits, memory.sizes, model)
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    trimmed, full = results[True][1], results[False][1]
    assert (full == 64).all()
    model = results[True][2]
    for index, layer in enumerate(model.layers):
        bound = math.ceil(float(layer.policy.spans().detach().max()) + model.config.ramp)
        assert (trimmed[index] <= bound).all() and (trimmed[index] >= bound - 1).all()


def test_one_layer_model_equals_a_naive_per_query_computation():
    """Every query attends every earlier step (no cache), each head scaled by its own mask."""
    torch.manual_seed(3)
    model = MemoryTransformer(tiny_config("adaptive-span", n_layers=1)).eval()
    layer = model.layers[0]
    torch.nn.init.uniform_(layer.policy.span_fraction, 0.0, 0.8)
    tokens = torch.randint(0, 13, (1, 50))
    with torch.no_grad():
        streamed, _ = stream(model, tokens, [5, 1, 20, 8, 16])
        x = model.embedding(tokens)
        spans = layer.policy.spans()
        for t in range(50):
            steps = torch.arange(t + 1)
            config = model.config
            masks = [[hand_mask(float(z), t - s, config.max_span, config.ramp)
                      for s in range(t + 1)] for z in spans]
            bias = torch.tensor(masks).log().view(1, -1, 1, t + 1)
            keys = layer.norm_attention(x[:, : t + 1])
            key_values = layer.attention.keys_values(keys, steps[None])
            h = x[:, t : t + 1] + layer.attention(keys[:, -1:], steps[-1:], key_values, bias)
            h = h + layer.feed_forward(layer.norm_feed_forward(h))
            expected = model.head(model.norm_out(h))[0, 0]
            torch.testing.assert_close(streamed[0, t], expected, atol=1e-5, rtol=0)

