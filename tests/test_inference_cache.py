"""The inference key/value cache: used only in eval mode without gradients, never stale."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import stream, tiny_model

TOKENS = torch.randint(0, 13, (3, 70), generator=torch.Generator().manual_seed(4))
SIZES = [8] * 5 + [1] * 10 + [20]


@pytest.mark.parametrize("policy", ["expire-span", "transformer-xl", "adaptive-span"])
def test_cached_inference_equals_recomputation(policy):
    model = tiny_model(policy, adapt_span_init=0.5)
    with torch.no_grad():
        cached, memory = stream(model, TOKENS, SIZES)
    assert all(layer.kv is not None and layer.kv.shape[1] == layer.width
               for layer in memory.layers)
    with torch.enable_grad():  # gradients on: no cache is made or read
        recomputed, fresh = stream(model, TOKENS, SIZES)
    assert all(layer.kv is None for layer in fresh.layers)
    torch.testing.assert_close(cached, recomputed.detach(), atol=1e-5, rtol=0)


def test_a_cache_made_with_other_parameters_is_ignored():
    model = tiny_model()
    with torch.no_grad():
        memory = model(TOKENS[:, :40]).memory
        model.layers[0].attention.key_value.weight.mul_(1.5)  # what an optimizer step does
        after = model(TOKENS[:, 40:], memory).logits
        cleared = model.init_memory(3).load_state_dict(memory.state_dict())  # drops caches
        expected = model(TOKENS[:, 40:], cleared).logits
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)


def test_training_makes_no_cache_and_saving_leaves_it_out():
    model = tiny_model().train()
    memory = model(TOKENS).memory
    assert all(layer.kv is None for layer in memory.layers)
    with torch.no_grad():
        cached = model.eval()(TOKENS).memory
    assert not any("kv" in name for name in cached.state_dict())


@pytest.mark.parametrize("policy", ["expire-span", "transformer-xl"])
def test_a_memory_continued_twice_is_changed_by_neither_continuation(policy):
    """Inference memories grow into shared buffers: the second continuation of one memory must
    not write into the slots the first one wrote."""
    model = tiny_model(policy)
    with torch.no_grad():
        memory = model(TOKENS[:, :40]).memory
        first = model(TOKENS[:, 40:41], memory).memory
        model(TOKENS[:, 50:51], memory)  # another continuation of the same memory
        after = model(TOKENS[:, 41:43], first).logits
    with torch.enable_grad():  # no buffers, no caches
        expected = model(TOKENS[:, :43]).logits[:, 41:]
    torch.testing.assert_close(after, expected.detach(), atol=1e-5, rtol=0)
