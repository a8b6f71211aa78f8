"""Invariants of the memory Transformer that hold for every policy."""

from __future__ import annotations

import pytest
import torch

from expire_span import Memory, MemoryTransformer, ModelConfig, available_policies
from tests.helpers import stream, tiny_config, tiny_model

POLICIES = available_policies()
ATOL = 1e-5


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 13, (batch, length), generator=generator)


NORMS = pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
"""The invariants hold for both residual layouts (``enwik8-12l`` is post-norm)."""


@NORMS
@pytest.mark.parametrize("policy", POLICIES)
def test_streaming_equals_one_shot(policy, pre_norm):
    """One long call, block calls, token-by-token calls and ragged calls agree."""
    model = tiny_model(policy, pre_norm=pre_norm)
    tokens = random_tokens(3, 100)
    with torch.no_grad():
        reference = model(tokens).logits
        for sizes in ([8] * 12 + [4], [1] * 100, [3, 17, 1, 40, 5, 34], [100]):
            logits, _ = stream(model, tokens, sizes)
            torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_none_memory_equals_empty_memory(policy):
    model = tiny_model(policy)
    tokens = random_tokens(2, 20)
    with torch.no_grad():
        from_none = model(tokens).logits
        from_empty = model(tokens, model.init_memory(2)).logits
        # a memory whose every entry was forgotten is empty too, though it has padding slots
        used = model(random_tokens(2, 30, seed=5)).memory
        forgotten = used.reset(torch.tensor([True, True]))
        forgotten.next_step = 0
        from_forgotten = model(tokens, forgotten).logits
    torch.testing.assert_close(from_empty, from_none, atol=0, rtol=0)
    torch.testing.assert_close(from_forgotten, from_none, atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_each_sample_of_a_batch_is_independent(policy):
    """Samples that keep different numbers of memories (padding) give their solo results."""
    model = tiny_model(policy)
    tokens = random_tokens(4, 120, seed=3)
    with torch.no_grad():
        batched, memory = stream(model, tokens, [8] * 15)
        if policy == "expire-span":
            sizes = memory.sizes
            assert (sizes.max(dim=1).values != sizes.min(dim=1).values).any(), "no ragged batch"
        for row in range(4):
            solo, _ = stream(model, tokens[row : row + 1], [8] * 15)
            torch.testing.assert_close(batched[row : row + 1], solo, atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_reset_forgets_only_the_chosen_samples(policy):
    model = tiny_model(policy)
    history, tokens = random_tokens(2, 40, seed=7), random_tokens(2, 16, seed=8)
    with torch.no_grad():
        memory = model(history).memory
        after_reset = model(tokens, memory.reset(torch.tensor([True, False]))).logits
        kept = model(tokens, memory).logits
        fresh = model(tokens[:1]).logits
    torch.testing.assert_close(after_reset[1:], kept[1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(after_reset[:1], fresh, atol=ATOL, rtol=0)


@NORMS
def test_pruning_is_exact_and_shrinks_memory(pre_norm):
    """Eval mode, 25 blocks: pruning expired memories changes no logit, and memory is smaller."""
    tokens = random_tokens(3, 25 * 8, seed=11)
    results = {}
    for prune in (True, False):
        model = tiny_model("expire-span", seed=4, prune_expired=prune, max_span=64, ramp=8,
                           pre_norm=pre_norm)
        with torch.no_grad():
            logits, memory = stream(model, tokens, [8] * 25)
        results[prune] = (logits, memory.sizes)
    torch.testing.assert_close(results[True][0], results[False][0], atol=ATOL, rtol=0)
    pruned, unpruned = results[True][1], results[False][1]
    assert (pruned <= unpruned).all()
    assert pruned.sum() < 0.8 * unpruned.sum()


def test_expire_span_memory_stays_below_max_span_plus_ramp():
    model = tiny_model("expire-span", init_percentage=0.99)
    with torch.no_grad():
        _, memory = stream(model, random_tokens(2, 160), [8] * 20)
    config = model.config
    assert memory.sizes.max() <= config.max_span + config.ramp
    ages = memory.next_step - memory.layers[0].steps[memory.layers[0].valid]
    assert ages.max() < config.max_span + config.ramp


def test_transformer_xl_keeps_exactly_the_last_max_span_states():
    model = tiny_model("transformer-xl")
    span = model.config.max_span
    with torch.no_grad():
        for sizes in ([8] * 7, [1] * 56, [56], [5, 30, 21]):
            out_logits, memory = stream(model, random_tokens(2, 56), sizes)
            for layer in memory.layers:
                assert layer.valid.all()
                expected = torch.arange(56 - span, 56).expand(2, -1)
                torch.testing.assert_close(layer.steps, expected)
            # in steady state every query attends exactly the max_span steps before it
            last = model(random_tokens(2, 8), memory)
            torch.testing.assert_close(last.memory_size, torch.full((2,), float(span)))


def test_transformer_xl_query_sees_exactly_its_window():
    """With one layer, the last query's output depends on the token max_span steps back and on
    nothing older."""
    model = MemoryTransformer(tiny_config("transformer-xl", n_layers=1)).eval()
    span, last = model.config.max_span, 59
    tokens = random_tokens(1, last + 1)
    older, edge = tokens.clone(), tokens.clone()
    older[0, : last - span] = (older[0, : last - span] + 1) % 13
    edge[0, last - span] = (edge[0, last - span] + 1) % 13
    with torch.no_grad():
        base, with_older, with_edge = (model(t).logits[0, -1] for t in (tokens, older, edge))
    torch.testing.assert_close(with_older, base, atol=0, rtol=0)
    assert (with_edge - base).abs().max() > 1e-4


def test_memory_reports_sizes_per_layer_and_sample():
    model = tiny_model("expire-span")
    out = model(random_tokens(3, 30))
    assert out.memory.sizes.shape == (2, 3)
    assert out.memory_size.shape == (2,)
    assert out.memory.next_step == 30


@pytest.mark.parametrize("policy", POLICIES)
def test_memory_round_trips_through_state_dict(policy):
    model = tiny_model(policy)
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        memory = model(random_tokens(2, 40)).memory.reset(torch.tensor([False, True]))
        restored = model.init_memory(2).load_state_dict(memory.state_dict())
        torch.testing.assert_close(model(tokens, restored).logits, model(tokens, memory).logits)
    assert restored.next_step == memory.next_step



@pytest.mark.parametrize("policy", POLICIES)
def test_memory_splits_into_rows_and_concatenates_back(policy):
    """What processes and micro-batches do with the memory of a global batch: each takes its
    rows (narrower, when its rows keep fewer memories) and a checkpoint stacks them again."""
    model = tiny_model(policy)
    tokens = random_tokens(4, 16)
    with torch.no_grad():
        whole = model(random_tokens(4, 40)).memory
        memory = whole.reset(torch.tensor([False, True, True, False]))
        parts = [memory.rows(slice(0, 1)), memory.rows(slice(1, 3)), memory.rows(slice(3, 4))]
        assert [p.batch_size for p in parts] == [1, 2, 1]
        assert int(parts[1].sizes.max()) == 0 and parts[1].layers[0].width == 0
        reference = model(tokens, memory).logits
        for part, rows in zip(parts, ([0], [1, 2], [3]), strict=True):
            torch.testing.assert_close(model(tokens[rows], part).logits, reference[rows],
                                       atol=ATOL, rtol=0)
        joined = Memory.concat(parts)
        torch.testing.assert_close(model(tokens, joined).logits, reference, atol=ATOL, rtol=0)
        assert torch.equal(joined.sizes, memory.sizes)
        # splitting and stacking gives back the very same entries (padding may differ)
        again = Memory.concat([whole.rows(slice(0, 2)), whole.rows(slice(2, 4))])
    for before, after in zip(whole.layers, again.layers, strict=True):
        width = after.width
        assert not before.valid[:, width:].any()
        assert torch.equal(after.valid, before.valid[:, :width])
        assert torch.equal(after.steps[after.valid], before.steps[before.valid])
        assert torch.equal(after.hidden[after.valid], before.hidden[before.valid])


# ----------------------------------------------------------------------------- bad input


def test_token_ids_outside_vocabulary_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 13\)"):
        model(torch.tensor([[1, 13]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_memory_from_another_model_or_batch_is_rejected():
    model = tiny_model()
    memory = model(random_tokens(2, 10)).memory
    with pytest.raises(ValueError, match="batch of 2"):
        model(random_tokens(3, 4), memory)
    with pytest.raises(ValueError, match="policy"):
        tiny_model("transformer-xl")(random_tokens(2, 4), memory)
    with pytest.raises(ValueError, match="another model"):
        tiny_model(d_model=16)(random_tokens(2, 4), memory)
    with pytest.raises(ValueError, match="layers"):
        tiny_model(n_layers=3)(random_tokens(2, 4), memory)
    with pytest.raises(TypeError, match="Memory"):
        model(random_tokens(2, 4), memory.layers)
    assert isinstance(memory, Memory)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ramp=0), "ramp"),
        (dict(ramp=-3), "ramp"),
        (dict(max_span=4, block_len=8), "max_span"),
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(d_model=12, n_heads=4), "even"),
        (dict(init_percentage=0.0), "init_percentage"),
        (dict(init_percentage=1.0), "init_percentage"),
        (dict(pre_div=0.0), "pre_div"),
        (dict(alpha=-1.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(block_len=0), "block_len"),
        (dict(adapt_span_init=1.5), "adapt_span_init"),
        (dict(adapt_span_loss=-1.0), "adapt_span_loss"),
        (dict(compress_rate=0), "compress_rate"),
        (dict(compress_fn="median"), "compress_fn must be one of conv, max, mean"),
        (dict(compress_loss=-0.1), "compress_loss"),
        (dict(mem_len=0), "mem_len"),
        (dict(cmem_len=2.5), "cmem_len"),
    ],
)
def test_invalid_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_unknown_policy_and_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown memory policy 'lstm'"):
        MemoryTransformer(tiny_config(memory="lstm"))
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"vocab_size": 3, "spam": 1})


@NORMS
def test_dropout_acts_in_training_only_and_spans_still_learn_through_it(pre_norm):
    """dropout = 0.3 (embeddings, attention weights, residual branches, feed-forward): in eval
    mode the model is exactly the dropout-free one; in train mode the outputs change, are
    reproducible from the random seed, and every parameter (the span predictors through the
    mask too, alpha = 0) gets a finite gradient over calls with memory."""
    plain = tiny_model("expire-span", pre_norm=pre_norm, alpha=0.0)
    model = tiny_model("expire-span", pre_norm=pre_norm, alpha=0.0, dropout=0.3)
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
    tokens = random_tokens(3, 40, seed=2)
    with torch.no_grad():
        reference, _ = stream(plain, tokens, [8, 16, 16])
        evaluated, _ = stream(model, tokens, [8, 16, 16])
    torch.testing.assert_close(evaluated, reference, atol=0, rtol=0)

    model.train()
    runs = []
    for seed in (0, 0, 1):
        model.zero_grad()
        torch.manual_seed(seed)
        memory, logits = None, []
        for part in tokens.split([8, 16, 16], dim=1):
            out = model(part, memory)
            out.logits.square().mean().backward()
            logits.append(out.logits.detach())
            memory = out.memory
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        runs.append((torch.cat(logits, 1), grads))
    (first, grads), (again, grads_again), (other, _) = runs
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert (first - reference).abs().max() > 1e-3 and (other - first).abs().max() > 1e-3
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert torch.equal(grads_again[name], grad), name
    for index in range(len(model.layers)):
        assert grads[f"layers.{index}.policy.span_predictor.weight"].abs().sum() > 0
