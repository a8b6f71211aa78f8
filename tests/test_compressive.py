"""Compressive Transformer against hand computations and a naive per-query reference."""

from __future__ import annotations

import pytest
import torch

from expire_span import MemoryTransformer
from expire_span.policies.compressive import CompressivePolicy, Compressor
from tests.helpers import stream, tiny_config, tiny_model

# A known sequence: state i is the vector (i, -i, i^2, 1). Two groups of c = 3.
SEQUENCE = torch.tensor([[i, -i, i * i, 1.0] for i in range(6)]).view(1, 2, 3, 4)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("mean", [[1.0, -1.0, 5 / 3, 1.0], [4.0, -4.0, 50 / 3, 1.0]]),
        ("max", [[2.0, 0.0, 4.0, 1.0], [5.0, -3.0, 25.0, 1.0]]),
    ],
)
def test_pooling_compresses_a_known_sequence(kind, expected):
    out = Compressor(kind, d_model=4, rate=3)(SEQUENCE)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_convolution_compresses_a_known_sequence():
    """Kernel c, stride c: out[o] = b[o] + sum_j sum_i W[o, i, j] * x_j[i] within each group."""
    compressor = Compressor("conv", d_model=4, rate=3)
    weight = torch.arange(48, dtype=torch.float32).view(4, 4, 3) / 10
    with torch.no_grad():
        compressor.conv.weight.copy_(weight)
        compressor.conv.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 2.0]))
    out = compressor(SEQUENCE)
    for g in range(2):
        for o in range(4):
            total = compressor.conv.bias[o].item()
            for j in range(3):
                for i in range(4):
                    total += weight[o, i, j].item() * SEQUENCE[0, g, j, i].item()
            assert out[0, g, o].item() == pytest.approx(total, rel=1e-6)


def test_convolution_starts_as_mean_pooling():
    groups = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(Compressor("conv", 4, 3)(groups), groups.mean(dim=2))


def naive_keys(t: int, mem_len: int, cmem_len: int, rate: int):
    """What the query at step t attends: compressed groups and raw steps (stream from step 0)."""
    evicted = max(0, (t - mem_len) // rate)
    groups = list(range(max(0, evicted - cmem_len), evicted))
    return groups, list(range(rate * evicted, t + 1))


def one_layer_model(**overrides) -> MemoryTransformer:
    torch.manual_seed(5)
    config = tiny_config("compressive", n_layers=1, block_len=8, mem_len=5, cmem_len=3,
                         compress_rate=3, **overrides)
    model = MemoryTransformer(config).eval()
    if model.layers[0].policy.compressor.kind == "conv":
        torch.nn.init.normal_(model.layers[0].policy.compressor.conv.weight, std=0.3)
    return model


@pytest.mark.parametrize("kind", ["conv", "max"])
def test_one_layer_model_equals_a_naive_per_query_computation(kind):
    """For each query: keys = f(each visible group of raw embeddings) at the group's last step,
    then the raw embeddings of the FIFO, attended with rotary positions and no mask."""
    model = one_layer_model(compress_fn=kind)
    layer, policy = model.layers[0], model.layers[0].policy
    tokens = torch.randint(0, 13, (1, 45))
    with torch.no_grad():
        streamed, _ = stream(model, tokens, [5, 1, 20, 3, 16])
        x = model.embedding(tokens)
        for t in range(45):
            groups, raw = naive_keys(t, 5, 3, 3)
            slots = [policy.compressor(x[:, 3 * g : 3 * g + 3].unsqueeze(1))[:, 0] for g in groups]
            keys = torch.stack(slots + [x[:, s] for s in raw], dim=1)
            steps = torch.tensor([3 * g + 2 for g in groups] + raw)
            bias = torch.zeros(1, 1, 1, len(steps))
            normed = layer.norm_attention(keys)
            key_values = layer.attention.keys_values(normed, steps[None])
            h = x[:, t : t + 1] + layer.attention(normed[:, -1:], steps[-1:], key_values, bias)
            h = h + layer.feed_forward(layer.norm_feed_forward(h))
            expected = model.head(model.norm_out(h))[0, 0]
            torch.testing.assert_close(streamed[0, t], expected, atol=1e-5, rtol=0)


def test_memory_holds_the_fifo_and_the_last_compressed_groups():
    model = one_layer_model(compress_fn="mean")
    with torch.no_grad():
        for sizes in ([40], [1] * 40, [8] * 5, [7, 9, 24]):
            _, memory = stream(model, torch.randint(0, 13, (2, 40)), sizes)
            layer = memory.layers[0]
            groups, raw = naive_keys(40, 5, 3, 3)  # what the next query (step 40) attends
            assert layer.steps.tolist() == [raw[:-1]] * 2
            assert layer.compressed.steps.tolist() == [[3 * g + 2 for g in groups]] * 2
            assert memory.sizes.tolist() == [[len(raw) - 1 + len(groups)] * 2]


def test_average_memory_size_counts_fifo_and_compressed_slots():
    """Steady state: a query attends n_m to n_m + c - 1 raw states and n_cm compressed slots."""
    model = one_layer_model()
    with torch.no_grad():
        out = model(torch.randint(0, 13, (2, 60)))
        sizes = []
        memory = out.memory
        for _ in range(6):
            step = model(torch.randint(0, 13, (2, 1)), memory)
            memory = step.memory
            sizes.append(step.memory_size.item())
    assert sorted(sizes) == [8.0, 8.0, 9.0, 9.0, 10.0, 10.0]  # n_m + {0,1,2} + n_cm = 5 + 3 + ...


def test_default_sizes_split_max_span_between_fifo_and_compressed_memory():
    policy = CompressivePolicy(tiny_config("compressive", max_span=128, compress_rate=3), 0)
    assert (policy.mem_len, policy.cmem_len) == (32, 32)  # n_m + c n_cm = 128
    policy = CompressivePolicy(tiny_config("compressive", mem_len=10, cmem_len=7), 0)
    assert (policy.mem_len, policy.cmem_len) == (10, 7)


def test_reconstruction_loss_trains_the_compression_only():
    """Its gradients reach the convolution and nothing else (not the attention, norms,
    embeddings); the task loss trains the attention and, as in the paper, not the compression."""
    model = tiny_model("compressive", compress_loss=1.0).train()
    tokens = torch.randint(0, 13, (2, 40))
    out = model(tokens)
    assert out.aux_loss.item() > 0
    out.aux_loss.backward(retain_graph=True)
    for name, parameter in model.named_parameters():
        touched = parameter.grad is not None and parameter.grad.abs().sum() > 0
        assert touched == ("compressor" in name), name
    model.zero_grad()
    out.logits.square().mean().backward()
    for layer in model.layers:
        for weight in (layer.attention.query.weight, layer.attention.key_value.weight,
                       layer.attention.out.weight):
            assert weight.requires_grad and weight.grad.abs().sum() > 0
        assert layer.policy.compressor.conv.weight.grad is None
    assert all(p.requires_grad for p in model.parameters())


def test_reconstruction_loss_matches_its_definition():
    """compress_loss * sum ||attn(h, old) - attn(h, f(old))||^2 / (B T D), computed by hand on
    one block whose queries compress exactly one group."""
    model = one_layer_model(compress_loss=0.5)
    layer = model.layers[0]
    tokens = torch.randint(0, 13, (2, 9))
    with torch.no_grad():
        first = model(tokens[:, :8])  # steps 0..7: G(8) = 1, group 0 is compressed here
        x = model.embedding(tokens[:, :8])
        old, new = x[:, :3], layer.policy.compressor(x[:, :3].unsqueeze(1))
        everything = torch.ones(2, 3, dtype=torch.bool)
        target = layer.readout(x, old, everything)
        approx = layer.readout(x, new, everything[:, :1])
        expected = 0.5 * (approx - target).square().sum() / (8 * 2 * 32)
        assert expected > 0
        torch.testing.assert_close(first.aux_loss, expected)
        assert model(tokens[:, 8:], first.memory).aux_loss.item() == 0.0  # nothing new


def test_reconstruction_loss_teaches_the_convolution_to_reconstruct():
    """A few Adam steps on the reconstruction loss alone lower it (attention fixed)."""
    model = one_layer_model()
    tokens = torch.randint(0, 13, (4, 8), generator=torch.Generator().manual_seed(2))
    conv = model.layers[0].policy.compressor.conv
    optimizer = torch.optim.Adam(conv.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(tokens).aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_readout_is_content_attention_with_detached_weights():
    model = one_layer_model()
    layer = model.layers[0]
    queries, keys = torch.randn(1, 2, 32, requires_grad=True), torch.randn(1, 3, 32)
    valid = torch.tensor([[True, False, True]])
    out = layer.readout(queries, keys, valid)
    q = layer.norm_attention(queries) @ layer.attention.query.weight.T
    k, v = (layer.norm_attention(keys) @ layer.attention.key_value.weight.T).chunk(2, dim=-1)
    for head in range(4):
        cut = slice(8 * head, 8 * head + 8)
        scores = q[..., cut] @ k[..., cut].transpose(1, 2) / 8**0.5
        scores[..., 1] = -torch.inf
        torch.testing.assert_close(out[..., cut], scores.softmax(-1) @ v[..., cut])
    out.sum().backward()
    assert queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_reset_restarts_group_alignment_at_the_next_step():
    """A stream reset at step 40 (not a multiple of c) compresses like a fresh one."""
    model = tiny_model("compressive")
    assert 40 % model.layers[0].policy.rate != 0
    with torch.no_grad():
        memory = model(torch.randint(0, 13, (1, 40))).memory.reset(torch.tensor([True]))
        tokens = torch.randint(0, 13, (1, 30))
        after_reset = model(tokens, memory)
        fresh = model(tokens)
    torch.testing.assert_close(after_reset.logits, fresh.logits, atol=1e-5, rtol=0)
    assert after_reset.memory.layers[0].compressed.steps.tolist() == [
        (fresh.memory.layers[0].compressed.steps + 40).tolist()[0]
    ]
