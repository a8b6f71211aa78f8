"""Expire-Span's formulas against hand computations (SPEC.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch

from expire_span.memory import LayerMemory
from expire_span.policies import BlockContext
from expire_span.policies.base import log_mask_bias, ramp_mask
from expire_span.policies.expire_span import ExpireSpanPolicy, ramp_loss
from tests.helpers import tiny_config, tiny_model

L, R, ALPHA = 10, 4, 0.5


def make_policy(**overrides) -> ExpireSpanPolicy:
    config = tiny_config(d_model=4, n_heads=2, block_len=2, max_span=L, ramp=R, alpha=ALPHA,
                         **overrides)
    return ExpireSpanPolicy(config, layer_index=0)


def set_spans_by_first_channel(policy: ExpireSpanPolicy) -> None:
    """w = (1, 0, 0, 0), b = 0: the span of a state is L * sigmoid(h[0] / c)."""
    with torch.no_grad():
        policy.span_predictor.weight.zero_()
        policy.span_predictor.weight[0, 0] = 1.0
        policy.span_predictor.bias.zero_()


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# Memories at steps 0..4, block queries at steps 5 and 6 (the block is steps 5, 6).
STEPS = [0, 1, 2, 3, 4, 5, 6]
SPANS = [2.0, 5.5, 3.0, 9.0, 0.5, 1.0, 7.0]
QUERY_STEPS = [5, 6]


def context_for(policy: ExpireSpanPolicy, spans=SPANS, requires_grad=False) -> BlockContext:
    inputs = torch.zeros(1, len(STEPS), 4)
    inputs[0, :, 0] = torch.tensor([logit(s / L) for s in spans]) * policy.config.pre_div
    inputs.requires_grad_(requires_grad)
    steps = torch.tensor([STEPS])
    age = torch.tensor(QUERY_STEPS).view(1, -1, 1) - steps.unsqueeze(1)
    states = LayerMemory(inputs.detach(), steps, torch.ones(1, len(STEPS), dtype=torch.bool))
    return BlockContext(states, inputs, age, age >= 0, next_step=7)


def hand_mask(span: float, query: int, key: int) -> float:
    remaining = span - (query - key)
    return min(max(1 + remaining / R, 0.0), 1.0)


def test_initial_spans_are_init_percentage_of_max_span():
    policy = make_policy(init_percentage=0.07)
    spans = policy.spans(torch.randn(3, 5, 4))
    torch.testing.assert_close(spans, torch.full((3, 5), 0.07 * L))


def test_pre_division_scales_the_predictor_input():
    policy = make_policy(pre_div=8.0)
    set_spans_by_first_channel(policy)
    h = torch.zeros(1, 1, 4)
    h[0, 0, 0] = 8.0 * logit(0.25)
    torch.testing.assert_close(policy.spans(h), torch.tensor([[0.25 * L]]))


def test_mask_matches_hand_computation():
    policy = make_policy()
    set_spans_by_first_channel(policy)
    decision = policy.decide(context_for(policy))
    mask = decision.bias.exp()[0, 0]  # [T, N]
    for qi, query in enumerate(QUERY_STEPS):
        for ki, key in enumerate(STEPS):
            if key > query:
                continue  # the future is hidden by the layer, not by the policy
            assert mask[qi, ki].item() == pytest.approx(hand_mask(SPANS[ki], query, key), abs=1e-5)
    # Two values written out: memory 0 (span 2) seen from step 5: r = 2 - 5 = -3, m = 1 - 3/4.
    assert mask[0, 0].item() == pytest.approx(0.25, abs=1e-5)
    # memory 4 (span 0.5) seen from step 6: r = 0.5 - 2 = -1.5, m = 1 - 1.5/4 = 0.625.
    assert mask[1, 4].item() == pytest.approx(0.625, abs=1e-5)


def test_fully_expired_entries_get_minus_infinity_not_nan():
    policy = make_policy()
    set_spans_by_first_channel(policy)
    decision = policy.decide(context_for(policy))
    # memory 0 (span 2) from step 6: r = -4 = -R, so m = 0 exactly.
    assert decision.bias[0, 0, 1, 0].item() == float("-inf")
    assert not torch.isnan(decision.bias).any()


def test_aux_loss_matches_hand_computation():
    policy = make_policy()
    set_spans_by_first_channel(policy)
    decision = policy.decide(context_for(policy))
    total = 0.0
    for query in QUERY_STEPS:
        for key, span in zip(STEPS, SPANS, strict=True):
            if key <= query and 0 < hand_mask(span, query, key) < 1:
                total += span - (query - key) + R
    expected = ALPHA * total / (R * len(QUERY_STEPS) * 1)
    assert total > 0
    assert decision.aux_loss.item() == pytest.approx(expected, rel=1e-5)


def test_aux_loss_gradient_touches_only_memories_on_the_ramp():
    policy = make_policy()
    set_spans_by_first_channel(policy)
    context = context_for(policy, requires_grad=True)
    policy.decide(context).aux_loss.backward()
    grad = context.inputs.grad[0, :, 0]
    for ki, (key, span) in enumerate(zip(STEPS, SPANS, strict=True)):
        on_ramp = any(
            key <= q and 0 < hand_mask(span, q, key) < 1 for q in QUERY_STEPS
        )
        assert (grad[ki].abs() > 0).item() == on_ramp, f"memory {ki}"
        if on_ramp:  # descending the loss shortens the span
            assert grad[ki].item() > 0


def test_mask_attention_equals_renormalised_masked_softmax():
    """softmax(s + log m) == m * softmax(s) / sum(m * softmax(s)) (SPEC section 2)."""
    torch.manual_seed(0)
    scores = torch.randn(5, 9)
    mask = torch.rand(5, 9)
    mask[:, 3] = 0.0
    bias = mask.clamp_min(torch.finfo(mask.dtype).tiny).log().masked_fill(mask == 0, -math.inf)
    ours = torch.softmax(scores + bias, dim=-1)
    plain = torch.softmax(scores, dim=-1) * mask
    torch.testing.assert_close(ours, plain / plain.sum(-1, keepdim=True))


def test_noisy_clamps_spans_to_a_fraction_of_max_span_in_training_only():
    policy = make_policy(noisy=True)
    set_spans_by_first_channel(policy)
    context = context_for(policy)
    context.block_uniform = 0.25  # spans clamped to 2.5
    mask = policy.train().decide(context).bias.exp()[0, 0]
    for qi, query in enumerate(QUERY_STEPS):
        for ki, key in enumerate(STEPS):
            if key <= query:
                expected = hand_mask(min(SPANS[ki], 0.25 * L), query, key)
                assert mask[qi, ki].item() == pytest.approx(expected, abs=1e-5)
    eval_mask = policy.eval().decide(context).bias.exp()[0, 0]
    assert eval_mask[0, 3].item() == pytest.approx(hand_mask(SPANS[3], 5, 3), abs=1e-5)


def full_mask_decision(policy: ExpireSpanPolicy, context: BlockContext, limit: float | None):
    """The formulas on every (query, key) pair, differentiated everywhere: the reference for the
    policy, which differentiates only the columns on the ramp."""
    spans = policy.spans(context.inputs)
    if limit is not None:
        spans = spans.clamp(max=limit)
    mask = ramp_mask(spans.unsqueeze(1) - context.age, R)
    aux = ALPHA * ramp_loss(mask, context.states.valid.unsqueeze(1)) / mask.shape[:2].numel()
    return log_mask_bias(mask).unsqueeze(1), aux


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("spans", ["hand", "random"])
def test_ramp_columns_decision_equals_the_full_formulas(spans, noisy):
    """Bias and auxiliary loss, their gradients (softmax attention on the bias, plus the loss),
    with rows of different memory sizes and entries exactly at m = 1 and m = 0 (integer spans)."""
    policy = make_policy(noisy=noisy).train()
    set_spans_by_first_channel(policy)
    generator = torch.Generator().manual_seed(0)
    if spans == "hand":
        context = context_for(policy, requires_grad=True)
    else:
        context = context_for(policy, spans=[L * 0.9] * len(STEPS))
        inputs = torch.randn(3, len(STEPS), 4, generator=generator) * 3
        valid = torch.rand(3, len(STEPS), generator=generator) < 0.7
        valid[:, -len(QUERY_STEPS):] = True
        context.states = LayerMemory(inputs, context.states.steps.expand(3, -1), valid)
        context.inputs = inputs.clone().requires_grad_()
        context.age = context.age.expand(3, -1, -1)
        context.visible = valid.unsqueeze(1) & (context.age >= 0)
    context.block_uniform = 0.35
    limit = 0.35 * L if noisy else None
    hidden = ~context.visible.unsqueeze(1)
    scores = torch.randn(hidden.shape, generator=generator)
    results = []
    for decide in (policy.decide, lambda c: full_mask_decision(policy, c, limit)):
        decision = decide(context)
        bias, aux = (decision.bias, decision.aux_loss) if decide == policy.decide else decision
        probs = torch.softmax(scores + bias.masked_fill(hidden, -math.inf), dim=-1)
        loss = (probs * scores).sum() + aux
        results.append((bias.detach(), aux.detach(), *torch.autograd.grad(loss, context.inputs)))
    (bias, aux, grad), (full_bias, full_aux, full_grad) = results
    assert torch.equal(bias, full_bias)
    torch.testing.assert_close(aux, full_aux)
    torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=1e-5)
    assert full_grad.abs().sum() > 0


@pytest.mark.parametrize("noisy", [False, True])
def test_decision_without_gradients_equals_the_full_formulas(noisy):
    """Inference skips the ramp columns: same bias (exactly) and auxiliary loss."""
    policy = make_policy(noisy=noisy).train()
    set_spans_by_first_channel(policy)
    context = context_for(policy)
    inputs = torch.randn(3, len(STEPS), 4, generator=torch.Generator().manual_seed(1)) * 3
    valid = torch.rand(3, len(STEPS), generator=torch.Generator().manual_seed(2)) < 0.7
    context.states = LayerMemory(inputs, context.states.steps.expand(3, -1), valid)
    context.inputs, context.age = inputs, context.age.expand(3, -1, -1)
    context.block_uniform = 0.35
    with torch.no_grad():
        decision = policy.decide(context)
        bias, aux = full_mask_decision(policy, context, 0.35 * L if noisy else None)
    assert decision.bias_grad_index is None
    assert torch.equal(decision.bias, bias)
    torch.testing.assert_close(decision.aux_loss, aux)


def test_keep_removes_exactly_what_no_future_query_can_see():
    policy = make_policy()
    set_spans_by_first_channel(policy)
    keep = policy.decide(context_for(policy)).keep[0]
    # next query at step 7: kept iff span - (7 - step) > -R
    expected = [span - (7 - step) > -R for step, span in zip(STEPS, SPANS, strict=True)]
    assert keep.tolist() == expected
    assert not all(expected) and any(expected)


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
def test_gradients_reach_span_predictor_through_the_mask(pre_norm):
    model = tiny_model(alpha=0.0, pre_norm=pre_norm).train()
    tokens = torch.randint(0, 13, (2, 40))
    out = model(tokens)
    assert out.aux_loss.item() == 0.0
    out.logits.square().mean().backward()
    for layer in model.layers:
        assert layer.policy.span_predictor.weight.grad.abs().sum() > 0
        assert layer.policy.span_predictor.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
def test_gradients_reach_span_predictor_through_the_aux_loss(pre_norm):
    model = tiny_model(alpha=1.0, pre_norm=pre_norm).train()
    out = model(torch.randint(0, 13, (2, 40)))
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    for layer in model.layers:
        assert layer.policy.span_predictor.weight.grad.abs().sum() > 0
        # descending the auxiliary loss lowers the bias, i.e. shortens every span
        assert layer.policy.span_predictor.bias.grad.item() > 0


def test_gradients_reach_span_predictor_from_memories_of_earlier_calls():
    """Spans of cached memories are recomputed each block, so old memories get gradients too."""
    model = tiny_model(alpha=1.0).train()
    first = model(torch.randint(0, 13, (2, 8)))
    model.zero_grad()
    policy = model.layers[0].policy
    captured = {}
    original = policy.spans

    def spans_with_hook(inputs):
        spans = original(inputs)
        spans.retain_grad()
        captured["spans"] = spans
        return spans

    policy.spans = spans_with_hook
    model(torch.randint(0, 13, (2, 8)), first.memory).aux_loss.backward()
    memory_part = captured["spans"].grad[:, : first.memory.layers[0].width]
    assert memory_part.abs().sum() > 0
