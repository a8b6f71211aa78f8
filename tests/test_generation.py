"""Streaming generation: reproducible, equal to block calls, memory bounded."""

from __future__ import annotations

import math

import pytest
import torch

from expire_span import available_policies
from expire_span.model import filter_logits, generate, generate_stream
from tests.helpers import tiny_model

PROMPT = torch.randint(0, 13, (2, 21), generator=torch.Generator().manual_seed(0))


def test_generation_with_a_seed_is_reproducible():
    model = tiny_model()
    first = generate(model, PROMPT, 30, temperature=1.0, seed=7)
    again = generate(model, PROMPT, 30, temperature=1.0, seed=7)
    other = generate(model, PROMPT, 30, temperature=1.0, seed=8)
    assert first.shape == (2, 30)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("policy", available_policies())
def test_token_by_token_generation_gives_the_logits_of_one_block_call(policy):
    model = tiny_model(policy)
    steps = list(generate_stream(model, PROMPT, 40, temperature=0.8, top_k=5, seed=1))
    generated = torch.stack([s.tokens for s in steps], dim=1)
    with torch.no_grad():
        whole = model(torch.cat([PROMPT, generated], dim=1)).logits
    expected = whole[:, PROMPT.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack([s.logits for s in steps], 1), expected,
                               atol=1e-5, rtol=0)


def memory_limits(model) -> list[int]:
    """Per layer, the most memories its policy may hold after a token."""
    config, limits = model.config, []
    for layer in model.layers:
        policy = layer.policy
        if config.memory == "transformer-xl":  # the window
            limits.append(config.max_span)
        elif config.memory == "adaptive-span":  # distances d >= 1 with m(d) > 0: d < z + R
            reach = math.ceil(float(policy.spans().max().detach()) + config.ramp) - 1
            limits.append(min(config.max_span, reach))
        elif config.memory == "compressive":  # FIFO, its incomplete group, compressed slots
            limits.append(policy.mem_len + policy.rate - 1 + policy.cmem_len)
        else:  # expire-span: spans e < L, a memory is seen while e - d > -R: d <= L + R - 1
            limits.append(config.max_span + config.ramp - 1)
    return limits


@pytest.mark.parametrize("policy", available_policies())
def test_generation_never_lets_memory_exceed_what_the_policy_allows(policy):
    """Each policy's own limit, not the maximum span: Adaptive-Span its largest learned span
    plus the ramp, Compressive n_m + c - 1 + n_cm (states leave the FIFO a whole group at a
    time), Transformer-XL L, Expire-Span L + R - 1 (here every span is 0.99 L, about the
    longest one can be). A stream read one token per call visits every phase, so each layer
    reaches its limit exactly."""
    if policy == "expire-span":
        model = tiny_model(policy, init_percentage=0.99, varied_spans=False)
    else:
        model = tiny_model(policy, init_percentage=0.5)
    if policy == "adaptive-span":  # spans well inside L, not at whole steps
        with torch.no_grad():
            for layer, fractions in zip(model.layers, ([0.2, 0.35, 0.1, 0.05],
                                                       [0.3, 0.1, 0.25, 0.4]), strict=True):
                layer.policy.span_fraction.copy_(torch.tensor(fractions))
    limits = memory_limits(model)
    if policy in ("adaptive-span", "compressive"):
        assert max(limits) < model.config.max_span  # far below the maximum span
    largest = torch.zeros(len(limits), dtype=torch.long)
    for step in generate_stream(model, PROMPT, 120, seed=3):
        largest = torch.maximum(largest, step.memory.sizes.max(dim=1).values)
    assert largest.tolist() == limits


def test_banned_tokens_are_never_generated():
    model = tiny_model()
    banned = list(range(12))  # only token 12 is left
    steps = generate_stream(model, PROMPT, 20, seed=0, banned=banned)
    tokens = torch.stack([step.tokens for step in steps], dim=1)
    assert (tokens == 12).all()


def test_greedy_generation_takes_the_argmax():
    model = tiny_model()
    steps = list(generate_stream(model, PROMPT, 5, temperature=0))
    for step in steps:
        torch.testing.assert_close(step.tokens, step.logits.argmax(-1))


def test_top_k_and_top_p_filter_as_defined():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=None)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=None)[0, :2]).all()
    probs = torch.softmax(logits, -1)[0]  # 0.644, 0.237, 0.087, 0.032
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.85)[0])
    assert kept.tolist() == [True, True, False, False]
    assert probs[:2].sum() >= 0.85 > probs[:1].sum()
    assert torch.isfinite(filter_logits(logits, None, top_p=0.01)[0]).tolist() == [
        True, False, False, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=torch.zeros(1, 0, dtype=torch.long)), "at least one token"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(prompt=torch.tensor([[1, 99]])), "token ids"),
    ],
)
def test_bad_generation_arguments_are_rejected(kwargs, message):
    arguments = dict(prompt=PROMPT, max_new_tokens=3)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), **arguments)
