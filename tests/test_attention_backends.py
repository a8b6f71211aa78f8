"""The fused attention path (SDPA) against the dense reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

import expire_span.model.attention as attention_module
from expire_span import available_policies
from expire_span.model.attention import dense_attention
from expire_span.model.ramp_attention import ramp_bias_attention
from expire_span.policies.adaptive_span import AdaptiveSpanPolicy
from expire_span.policies.base import log_mask_bias, selected_columns
from tests.helpers import tiny_model

NORMS = pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])


def run_both(policy: str, train: bool, pre_norm: bool = True):
    tokens = torch.randint(0, 13, (3, 40), generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("dense", "sdpa"):
        model = tiny_model(policy, seed=3, attention=backend, pre_norm=pre_norm).train(train)
        out = model(tokens[:, :24])
        out = model(tokens[:, 24:], out.memory)  # a second call, with memory
        loss = out.logits.square().mean() + out.aux_loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), grads)
    return results


@NORMS
@pytest.mark.parametrize("policy", available_policies())
def test_sdpa_matches_dense_forward_and_backward(policy, pre_norm):
    results = run_both(policy, train=True, pre_norm=pre_norm)
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


# ------------------------------------------------- Expire-Span: bias gradient on ramp columns


def run_expire_span(backend: str, chunks: list[int], noisy: bool, counter: list[int] | None = None,
                    **overrides):
    """Train-mode calls of the given sizes, memory carried, the loss of every call backpropagated
    (memories are detached between calls, so the gradients add up)."""
    model = tiny_model("expire-span", seed=3, attention=backend, noisy=noisy, **overrides).train()
    torch.manual_seed(7)  # the noisy spans' per-block draws
    return train_calls(model, chunks)


def train_calls(model, chunks: list[int]):
    """Logits of train-mode calls of the given sizes on a fixed token stream, memory carried and
    each call's loss backpropagated; the summed gradients and the final memory."""
    tokens = torch.randint(0, 13, (3, sum(chunks)), generator=torch.Generator().manual_seed(4))
    memory, logits, start = None, [], 0
    for size in chunks:
        out = model(tokens[:, start:start + size], memory)
        (out.logits.square().mean() + out.aux_loss).backward()
        logits.append(out.logits.detach())
        memory, start = out.memory, start + size
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits, dim=1), grads, memory


@NORMS
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("chunks", [[8, 8, 8, 8, 8], [5, 13, 3, 11], [1] * 30],
                         ids=["blocks", "uneven", "token-by-token"])
def test_expire_span_ramp_path_matches_dense(monkeypatch, chunks, noisy, pre_norm):
    calls = []
    fused = attention_module.ramp_bias_attention
    monkeypatch.setattr(attention_module, "ramp_bias_attention",
                        lambda *args: calls.append(1) or fused(*args))
    dense_logits, dense_grads, _ = run_expire_span("dense", chunks, noisy, pre_norm=pre_norm)
    assert not calls
    logits, grads, memory = run_expire_span("auto", chunks, noisy, pre_norm=pre_norm)
    assert len(calls) == 2 * sum(-(-size // 8) for size in chunks)  # every layer, every block
    # rows with different memory sizes (post-norm: not in the first layer, whose inputs are
    # the raw embeddings, too small to make spans differ)
    assert any(len(set(sizes.tolist())) > 1 for sizes in memory.sizes)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == dense_grads.keys()
    assert any("span_predictor" in name for name in grads)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_expire_span_without_pruning_matches_dense():
    chunks = [8, 8, 8, 8]
    dense_logits, dense_grads, _ = run_expire_span("dense", chunks, False, prune_expired=False)
    logits, grads, _ = run_expire_span("auto", chunks, False, prune_expired=False)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-4)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("bias_heads", [1, 4])
def test_ramp_bias_attention_gradients(bias_heads):
    """Against the dense reference: output and q, k, v gradients everywhere, the bias gradient on
    the selected columns (rows of the batch selecting different numbers)."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, queries, keys, dim = 2, 4, 6, 11, 8
    q, k, v = (torch.randn(batch, heads, n, dim, generator=generator, requires_grad=True)
               for n in (queries, keys, keys))
    bias = torch.randn(batch, bias_heads, queries, keys, generator=generator)
    bias = bias.masked_fill(torch.rand(bias.shape, generator=generator) < 0.3, float("-inf"))
    bias[..., 0] = 0.0  # every row sees a key
    bias.requires_grad_()
    columns = torch.rand(batch, keys, generator=generator) < 0.4
    columns[0, :] = False
    columns[0, 3] = True
    grad_out = torch.randn(batch, heads, queries, dim, generator=generator)
    expected = dense_attention(q, k, v, bias, 0.0)
    expected_grads = torch.autograd.grad(expected, (q, k, v, bias), grad_out)
    index = selected_columns(columns)
    by_entry = index[:, None, None, :].expand(-1, bias_heads, queries, -1)
    column_bias = bias.detach().gather(3, by_entry).requires_grad_()
    out = ramp_bias_attention(q, k, v, bias.detach(), index, column_bias)
    out_grads = torch.autograd.grad(out, (q, k, v, column_bias), grad_out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    for got, want in zip(out_grads[:3], expected_grads[:3], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the gradient of the columns' values is the bias gradient there (index pads row 0 with
    # unselected columns, whose exact gradient is also returned)
    torch.testing.assert_close(out_grads[3], expected_grads[3].gather(3, by_entry),
                               atol=1e-5, rtol=1e-4)


# ------------------------------------------------ Adaptive-Span: bias gradient on ramp columns


def naive_adaptive_span_bias(policy, age):
    """The reference: ``log m`` over every entry, differentiated everywhere, no columns named."""
    return log_mask_bias(policy.mask(age)), None, None


@pytest.mark.parametrize("chunks", [[8, 8, 8, 8, 8], [5, 13, 3, 11]], ids=["blocks", "uneven"])
def test_adaptive_span_ramp_path_matches_dense(monkeypatch, chunks):
    """Adaptive-Span's per-head bias takes the fused ramp-column path in every layer and block,
    with the logits and every gradient (the spans' through the mask) of dense attention over
    the naive mask."""
    calls = []
    fused = attention_module.ramp_bias_attention
    monkeypatch.setattr(attention_module, "ramp_bias_attention",
                        lambda *args: calls.append(args[3].shape[1]) or fused(*args))
    results = {}
    for backend in ("dense", "auto"):
        with monkeypatch.context() as patch:
            if backend == "dense":
                patch.setattr(AdaptiveSpanPolicy, "_bias", naive_adaptive_span_bias)
            # no L1 loss: the spans' gradients come through the mask alone
            model = tiny_model("adaptive-span", seed=3, attention=backend,
                               adapt_span_loss=0.0).train()
            with torch.no_grad():  # one head whose ramp crosses the window's end L
                for layer in model.layers:
                    layer.policy.span_fraction[0] = 0.95
            results[backend] = train_calls(model, chunks)[:2]
        if backend == "dense":
            assert not calls
    assert calls == [4] * (2 * sum(-(-size // 8) for size in chunks))  # per-head bias, every call
    (dense_logits, dense_grads), (logits, grads) = results["dense"], results["auto"]
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == dense_grads.keys()
    assert all(dense_grads[f"layers.{i}.policy.span_fraction"].abs().min() > 0 for i in (0, 1))
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
