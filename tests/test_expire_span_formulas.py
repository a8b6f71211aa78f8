"""Expire-Span's formulas against hand computations (SPEC.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch

from expire_span.memory import LayerMemory
from expire_span.model.attention import MultiHeadAttention
from expire_span.policies import BlockContext
from expire_span.policies.base import log_mask_bias, ramp_mask, scatter_columns
from expire_span.policies.expire_span import ExpireSpanPolicy, ramp_loss
from tests import expire_span_reference as reference
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


@pytest.mark.parametrize("attention", ["dense", "auto"])
def test_mask_attention_equals_renormalised_masked_softmax(attention):
    """The library's mask (the policy's decision, ramp columns and all) through its attention
    layer gives SPEC's ``a = m softmax(s) / sum_j m softmax(s)``, computed here from the hand
    formulas (tests/expire_span_reference.py): outputs and the gradient through keys, values and
    spans, in float64 (tolerance 1e-10). Entries of the mask are 1, strictly between, and 0."""
    policy = make_policy(attention=attention).double().train()
    set_spans_by_first_channel(policy)
    torch.manual_seed(0)
    attention_layer = MultiHeadAttention(policy.config).double()
    inputs = torch.randn(1, len(STEPS), 4, dtype=torch.float64)
    inputs[0, :, 0] = torch.tensor([logit(span / L) for span in SPANS])
    inputs.requires_grad_()
    context = context_for(policy)
    context.inputs = inputs
    context.states = LayerMemory(inputs.detach(), context.states.steps, context.states.valid)
    decision = policy.decide(context)
    bias, columns = decision.hide(~context.visible.unsqueeze(1), torch.float64)
    steps, queries = torch.tensor(STEPS), torch.tensor(QUERY_STEPS)
    key_values = attention_layer.keys_values(inputs, steps.unsqueeze(0))
    out = attention_layer(inputs[:, -2:], queries, key_values, bias, decision.bias_grad_index,
                          columns)

    spans = L * torch.sigmoid(inputs[:, :, 0])  # w = (1, 0, 0, 0), b = 0, c = 1
    age = queries[:, None] - steps[None, :]
    mask = reference.soft_mask(spans, age, R)
    assert {0.0, 1.0} <= set(mask[0][age >= 0].tolist()) and ((mask > 0) & (mask < 1)).any()
    heads = 2
    q = reference.split_heads(inputs[:, -2:] @ attention_layer.query.weight.T, heads)
    keys, values = (inputs @ attention_layer.key_value.weight.T).chunk(2, dim=-1)
    q = reference.rotate(q, queries, policy.config.rope_base).transpose(1, 2)
    k = reference.rotate(reference.split_heads(keys, heads), steps, policy.config.rope_base)
    v = reference.split_heads(values, heads).transpose(1, 2)
    expected = reference.masked_attention(q, k.transpose(1, 2), v, mask, age >= 0)
    expected = expected.transpose(1, 2).reshape(1, 2, 4) @ attention_layer.out.weight.T
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    weights = torch.randn(out.shape, dtype=torch.float64)
    grad, = torch.autograd.grad((out * weights).sum(), inputs)
    expected_grad, = torch.autograd.grad((expected * weights).sum(), inputs, retain_graph=True)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    # and part of that gradient comes through the mask, i.e. the spans
    fixed = reference.masked_attention(q, k.transpose(1, 2), v, mask.detach(), age >= 0)
    fixed = fixed.transpose(1, 2).reshape(1, 2, 4) @ attention_layer.out.weight.T
    without_mask, = torch.autograd.grad((fixed * weights).sum(), inputs)
    assert (expected_grad - without_mask).abs().max() > 1e-3


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
        bias, aux = ((scatter_columns(decision.bias, decision.bias_grad_index,
                                      decision.bias_columns), decision.aux_loss)
                     if decide == policy.decide else decision)
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


def seen_by_future_queries(policy: ExpireSpanPolicy, context: BlockContext) -> torch.Tensor:
    """``[B, N]`` brute force: which of the context's states some query after the block gives a
    nonzero attention weight, asking the policy's mask at every later step until L + R past
    the newest state (spans are a function of the states, so they stay what they are)."""
    steps = context.states.steps
    seen = torch.zeros_like(context.states.valid)
    last = int(steps.max()) + policy.config.max_span + policy.config.ramp + 1
    for query in range(context.next_step, last + 1):
        age = (query - steps).unsqueeze(1)  # [B, 1, N]
        future = BlockContext(context.states, context.inputs, age, age >= 0, next_step=query + 1)
        seen |= (policy.decide(future).bias[:, 0, 0] > float("-inf")) & context.states.valid
    return seen


@pytest.mark.parametrize("prune", [True, False], ids=["prune", "no-prune"])
def test_keep_removes_exactly_what_no_future_query_can_see(prune):
    """The memory kept after a block is exactly (pruning) or at least (no pruning: everything
    younger than L + R) the set of states a later query attends to, found by running the later
    queries: the hand spans, and 64 rows of random ones over 20 steps (so that some states are
    older than L + R; rows with padding), noise off."""
    policy = make_policy(prune_expired=prune)
    set_spans_by_first_channel(policy)
    hand = context_for(policy)
    generator = torch.Generator().manual_seed(3)
    rows, width = 64, 20
    inputs = torch.randn(rows, width, 4, generator=generator) * 3
    valid = torch.rand(rows, width, generator=generator) < 0.8
    valid[:, -2:] = True
    steps = torch.arange(width).expand(rows, -1)
    age = torch.tensor([18, 19]).view(1, 2, 1) - steps.unsqueeze(1)
    random_rows = BlockContext(LayerMemory(inputs, steps, valid), inputs, age,
                               valid.unsqueeze(1) & (age >= 0), next_step=width)
    for context in (hand, random_rows):
        keep = policy.decide(context).keep & context.states.valid
        seen = seen_by_future_queries(policy, context)
        assert seen.any() and (~seen & context.states.valid).any()
        if prune:
            assert torch.equal(keep, seen)
        else:  # nothing a query could see is lost, and nothing is kept past L + R
            assert (keep >= seen).all()
            assert not (keep & (context.next_step - context.states.steps >= L + R)).any()
    # by hand: only memory 0 (span 2) goes; step 5 saw it (r = -3), step 7 cannot (r = -5)
    assert policy.decide(hand).keep[0].tolist() == [not prune] + [True] * 6


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
