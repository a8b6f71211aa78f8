"""``attention="flex"`` against the dense reference: forward values on CPU (FlexAttention has no
CPU backward), forward and every gradient on CUDA."""

from __future__ import annotations

import pytest
import torch

import expire_span.model.attention as attention_module
import expire_span.model.flex_attention as flex_module
from expire_span import available_policies
from tests.helpers import tiny_model

CHUNKS = [8, 8, 8, 5, 11, 8]  # blocks with memory, an uneven cut and a short last block
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="FlexAttention's backward runs on CUDA only")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 4 x 4, so that blocks of 8 queries over up to ~40 keys have skipped, partial and
    full tiles (128 would make a single tile)."""
    monkeypatch.setattr(flex_module, "BLOCK_SIZE", 4)


def stream(policy: str, backend: str, train: bool, device: str = "cpu", grad: bool = False,
           **overrides):
    """Calls of ``CHUNKS`` sizes, memory carried; logits, memory sizes, aux losses (and the
    summed gradients when ``grad``)."""
    tokens = torch.randint(0, 13, (3, sum(CHUNKS)), generator=torch.Generator().manual_seed(4))
    model = tiny_model(policy, seed=3, attention=backend, **overrides).to(device).train(train)
    torch.manual_seed(7)  # noisy spans draw one number per block
    memory, logits, sizes, aux, start = None, [], [], [], 0
    with torch.set_grad_enabled(grad):
        for size in CHUNKS:
            out = model(tokens[:, start:start + size].to(device), memory)
            if grad:
                (out.logits.square().mean() + out.aux_loss).backward()
            logits.append(out.logits.detach())
            sizes.append(out.memory_size)
            aux.append(out.aux_loss.detach())
            memory, start = out.memory, start + size
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits, dim=1), torch.stack(sizes), torch.stack(aux), grads


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("policy", available_policies())
def test_flex_forward_matches_dense_on_cpu(policy, train):
    """Values, memory sizes and auxiliary losses; train mode draws noisy spans (Expire-Span)."""
    dense = stream(policy, "dense", train, noisy=True)
    flex = stream(policy, "flex", train, noisy=True)
    torch.testing.assert_close(flex[0], dense[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(flex[1], dense[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flex[2], dense[2], atol=1e-9, rtol=1e-5)


def test_expire_span_without_pruning_matches_dense_on_cpu():
    dense = stream("expire-span", "dense", False, prune_expired=False)
    flex = stream("expire-span", "flex", False, prune_expired=False)
    torch.testing.assert_close(flex[0], dense[0], atol=1e-5, rtol=1e-4)


def record(monkeypatch, policy: str, backend: str) -> list:
    """The bias (dense) or the plan (flex) of every attention call."""
    seen = []
    forward = attention_module.MultiHeadAttention.forward

    def spy(self, query_inputs, query_steps, key_values, bias, bias_grad_index=None,
            bias_columns=None, query_rotation=None, flex=None):
        seen.append(flex if flex is not None else bias)
        return forward(self, query_inputs, query_steps, key_values, bias, bias_grad_index,
                       bias_columns, query_rotation, flex)

    monkeypatch.setattr(attention_module.MultiHeadAttention, "forward", spy)
    stream(policy, backend, False)
    monkeypatch.setattr(attention_module.MultiHeadAttention, "forward", forward)
    return seen


def tiles_of(visible: torch.Tensor, block: int, pad: bool) -> torch.Tensor:
    """``[B, Hm, T, N]`` -> ``[B, Hm, Tq, Tk]``: whether any (``pad`` False) or every (``pad``
    True) entry of each tile is visible; absent queries and keys count as ``pad``."""
    queries, keys = visible.shape[-2:]
    padded = torch.nn.functional.pad(visible, (0, -keys % block, 0, -queries % block), value=pad)
    tiles = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))
    return tiles.all(dim=(3, 5)) if pad else tiles.any(dim=(3, 5))


@pytest.mark.parametrize("policy", available_policies())
def test_block_mask_computes_every_visible_tile_and_skips_hidden_ones(monkeypatch, policy):
    """Tiles listed (partial or full) cover every visible entry of the dense reference, those
    called full hold visible entries only, and tiles of hidden entries alone are skipped: the
    computed tiles are exactly those holding a visible entry, up to the one-query margin the
    span policies keep on each side of an expiry."""
    biases, plans = record(monkeypatch, policy, "dense"), record(monkeypatch, policy, "flex")
    assert len(biases) == len(plans)
    skipped = 0
    for bias, plan in zip(biases, plans, strict=True):
        visible = bias > float("-inf")  # [B, 1 or H, T, N]
        block, keys = plan.block, visible.shape[-1]
        some, every = (tiles_of(visible, block, value) for value in (False, True))
        every &= keys % block == 0 or torch.arange(every.shape[-1]) < keys // block
        listed = plan.partial | plan.full
        heads = max(listed.shape[1], some.shape[1])
        some, every = some.expand(-1, heads, -1, -1), every.expand(-1, heads, -1, -1)
        listed, full = listed.expand(-1, heads, -1, -1), plan.full.expand(-1, heads, -1, -1)
        assert not (some & ~listed).any(), "a tile with a visible entry is skipped"
        assert not (full & ~every).any(), "a tile called full holds a hidden entry"
        skipped += int((~listed).sum())
        if policy in ("transformer-xl", "compressive"):  # exact: no rounding margin
            assert torch.equal(listed, some)
    assert skipped > 0


def test_flex_on_cpu_refuses_to_train_in_one_line():
    model = tiny_model("expire-span", attention="flex").train()
    tokens = torch.randint(0, 13, (2, 8))
    with pytest.raises(RuntimeError, match="cannot train on CPU") as error:
        model(tokens)
    assert "\n" not in str(error.value)


def test_flex_is_an_attention_backend_and_policies_without_a_description_use_sdpa(monkeypatch):
    """A policy that describes no flex mask (here: one whose decisions drop it) falls back to the
    bias path, through SDPA."""
    from expire_span.policies.transformer_xl import TransformerXLPolicy

    decide = TransformerXLPolicy.decide

    def without_flex(self, context):
        decision = decide(self, context.__class__(**{**vars(context), "flex": False}))
        return decision

    monkeypatch.setattr(TransformerXLPolicy, "decide", without_flex)
    calls = []
    sdpa = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        tiny_model("transformer-xl", attention="flex")(torch.randint(0, 13, (2, 16)))
    assert calls


# ------------------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("policy", available_policies())
def test_flex_matches_dense_forward_and_backward_on_cuda(policy, monkeypatch):
    """Compiled FlexAttention (tiles of 128, the default) against dense, every gradient."""
    monkeypatch.setattr(flex_module, "BLOCK_SIZE", 128)
    dense = stream(policy, "dense", True, device="cuda", grad=True, noisy=True)
    flex = stream(policy, "flex", True, device="cuda", grad=True, noisy=True)
    torch.testing.assert_close(flex[0], dense[0], atol=1e-4, rtol=1e-3)
    assert flex[3].keys() == dense[3].keys()
    for name, grad in dense[3].items():
        torch.testing.assert_close(flex[3][name], grad, atol=1e-4, rtol=1e-2, msg=name)


@needs_cuda
def test_flex_gradient_reaches_the_span_predictor_on_cuda():
    flex = stream("expire-span", "flex", True, device="cuda", grad=True)
    grads = [g for n, g in flex[3].items() if "span_predictor" in n]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
