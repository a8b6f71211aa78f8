"""The one-token decode step equals the general path: logits, kept memories, frozen memories."""

from __future__ import annotations

import pytest
import torch

from expire_span.model import generate_stream
from expire_span.model.decoding import Decoder
from tests.helpers import tiny_model

RULED = ["transformer-xl", "expire-span", "adaptive-span"]
TOKENS = torch.randint(0, 13, (3, 150), generator=torch.Generator().manual_seed(1))


def kept_steps(memory) -> list[list[set[int]]]:
    """Per layer and row, the steps a memory holds (padding and dropped entries excluded)."""
    return [[set(layer.steps[row][layer.valid[row]].tolist()) for row in range(layer.batch_size)]
            for layer in memory.layers]


def decode_beside_general(model, prompt: int = 30, memory=None, reset_at: int | None = None):
    """Read TOKENS after ``prompt`` one token at a time, through the decoder and through the
    model's general path, checking logits at every token and the kept memories at the end;
    ``memory``: read before the prompt (alone when ``prompt`` is 0); ``reset_at``: row 1's
    memory is forgotten after that many tokens (the decoder is rebuilt from the general path's
    memory, as a caller continuing a stream would)."""
    with torch.no_grad():
        reference = model(TOKENS[:, :prompt], memory).memory if prompt else memory
        if reset_at is not None:
            out = model(TOKENS[:, prompt:reset_at], reference)
            reference = out.memory.reset(torch.tensor([False, True, False]))
            prompt = reset_at
        decoder = Decoder.build(model, reference)
        assert decoder is not None
        for index in range(prompt, TOKENS.shape[1]):
            general = model(TOKENS[:, index:index + 1], reference)
            reference = general.memory
            torch.testing.assert_close(decoder.step(TOKENS[:, index]), general.logits[:, 0],
                                       atol=2e-6, rtol=0)
        assert kept_steps(decoder.memory()) == kept_steps(reference)
        return decoder


@pytest.mark.parametrize("policy", RULED)
def test_the_decoder_gives_the_general_paths_logits_and_memory(policy):
    """120 tokens: every layer's buffers are packed several times on the way (asserted)."""
    model = tiny_model(policy)
    decoder = decode_beside_general(model)
    assert all(layer.slots.capacity < 120 for layer in decoder.layers)


@pytest.mark.parametrize("policy", RULED)
def test_the_decoder_handles_rows_of_different_memories(policy):
    """A row whose memory was reset: padding (and, for the window, rows that no longer hold
    consecutive steps) must be hidden exactly as the general path hides it."""
    decode_beside_general(tiny_model(policy), reset_at=50)


@pytest.mark.parametrize("policy", ["expire-span", "adaptive-span"])
def test_the_decoder_without_pruning(policy):
    decode_beside_general(tiny_model(policy, prune_expired=False))


@pytest.mark.parametrize("overrides", [{"pre_norm": False}, {"attention": "dense"},
                                       {"block_len": 1}])
def test_the_decoder_follows_the_layer_options(overrides):
    decode_beside_general(tiny_model("expire-span", **overrides))


def test_the_transformer_xl_window_reads_exactly_the_last_l_steps():
    """A bias-free window: an off-by-one there changes the logits (the window is the mask)."""
    model = tiny_model("transformer-xl", max_span=10)
    decoder = decode_beside_general(model, prompt=12)
    assert all(layer.slots.consecutive for layer in decoder.layers)  # the sliced path was taken


def test_there_is_no_decoder_where_the_step_does_not_apply():
    model = tiny_model("expire-span")
    with torch.no_grad():
        memory = model(TOKENS[:, :10]).memory
        assert Decoder.build(tiny_model("compressive"),
                             tiny_model("compressive")(TOKENS[:, :10]).memory) is None
        model.train()
        assert Decoder.build(model, memory) is None
        model.eval()
        assert Decoder.build(model, memory) is not None
    assert Decoder.build(model, memory) is None  # gradients enabled


@pytest.mark.parametrize("policy", RULED)
def test_a_generated_tokens_memory_is_the_memory_of_its_moment(policy):
    """Read after 60 more tokens, the memory handed out with token 10 still continues the
    stream as the memory of that moment does."""
    model = tiny_model(policy)
    prompt = TOKENS[:, :20]
    steps = list(generate_stream(model, prompt, 70, temperature=1.0, seed=4))
    generated = torch.stack([s.tokens for s in steps], dim=1)
    with torch.no_grad():
        # steps[10].memory has read the prompt and generated[:, :10]
        at_ten = model(torch.cat([prompt, generated[:, :10]], dim=1)).memory
        follow = generated[:, 10:20]
        expected = model(follow, at_ten).logits
        torch.testing.assert_close(model(follow, steps[10].memory).logits, expected,
                                   atol=2e-6, rtol=0)
    assert kept_steps(steps[10].memory) == kept_steps(at_ten)


def test_the_decoder_reads_a_window_with_a_gap_in_its_steps():
    """Every row without step 25 (no padding): Transformer-XL's window can no longer be read as
    the last slots, and the decoder must see it."""
    model = tiny_model("transformer-xl")
    with torch.no_grad():
        memory = model(TOKENS[:, :30]).memory
    layers = [layer.select(layer.steps != 25) for layer in memory.layers]
    assert all(bool(layer.valid.all()) for layer in layers)
    decode_beside_general(model, prompt=0, memory=type(memory)(layers, 30, memory.policy))


@pytest.mark.parametrize("policy", RULED)
def test_the_decoder_starts_alike_from_a_memory_with_or_without_its_cache(policy):
    """The decoder reuses the memory's inference cache (keys, values, normalised inputs) when it
    is valid and computes them otherwise (a moved memory has none)."""
    model = tiny_model(policy)
    with torch.no_grad():
        memory = model(TOKENS[:, :30]).memory
    assert all(layer.kv is not None for layer in memory.layers)
    bare = memory.to("cpu")
    assert all(layer.kv is None for layer in bare.layers)
    decode_beside_general(model, prompt=0, memory=bare)
    decode_beside_general(model, prompt=0, memory=memory)
