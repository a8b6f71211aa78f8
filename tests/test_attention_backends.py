"""The fused attention path (SDPA) against the dense reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from expire_span import available_policies
from tests.helpers import tiny_model


def run_both(policy: str, train: bool):
    tokens = torch.randint(0, 13, (3, 40), generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("dense", "sdpa"):
        model = tiny_model(policy, seed=3, attention=backend).train(train)
        out = model(tokens[:, :24])
        out = model(tokens[:, 24:], out.memory)  # a second call, with memory
        loss = out.logits.square().mean() + out.aux_loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), grads)
    return results


@pytest.mark.parametrize("policy", available_policies())
def test_sdpa_matches_dense_forward_and_backward(policy):
    results = run_both(policy, train=True)
    dense_logits, dense_grads = results["dense"]
    sdpa_logits, sdpa_grads = results["sdpa"]
    torch.testing.assert_close(sdpa_logits, dense_logits, atol=1e-5, rtol=1e-4)
    assert dense_grads.keys() == sdpa_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sdpa_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_sdpa_gradient_reaches_the_span_predictor_through_the_mask():
    _, grads = run_both("expire-span", train=True)["sdpa"]
    assert any("span_predictor" in name and g.abs().sum() > 0 for name, g in grads.items())


def test_auto_uses_the_fused_path():
    model = tiny_model(attention="auto")
    assert all(layer.attention.fused for layer in model.layers)
    assert not any(layer.attention.fused for layer in tiny_model(attention="dense").layers)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny_model(attention="flash")
