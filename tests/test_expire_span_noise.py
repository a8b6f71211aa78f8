"""Random span shortening (``noisy``): one draw per block, shared by the layers (and by the
micro-batches of a training step), and deletion by the true spans, never the shortened ones."""

from __future__ import annotations

import pytest
import torch

from expire_span.model.transformer import TransformerLayer
from expire_span.training import RunConfig, Trainer
from tests.helpers import record_uniforms, stream, tiny_model

TOKENS = torch.randint(0, 13, (3, 96), generator=torch.Generator().manual_seed(3))


def test_one_noise_draw_per_block_shared_by_every_layer():
    """Calls of 4 blocks then 2 blocks: six draws, each seen by all three layers; in eval mode
    no draw (0.5, ignored)."""
    model = tiny_model(noisy=True, n_layers=3).train()
    seen = record_uniforms(model)
    out = model(TOKENS[:, :32])
    model(TOKENS[:, 32:48], out.memory)
    assert [len(layer) for layer in seen] == [6, 6, 6]
    assert seen[0] == seen[1] == seen[2]
    assert len(set(seen[0])) == 6  # a new draw for every block, not one per call
    assert all(0.0 < u < 1.0 for u in seen[0])
    model.eval()
    with torch.no_grad():
        model(TOKENS[:, :16])
    assert seen[0][6:] == [0.5, 0.5]


def test_micro_batches_of_a_step_see_the_same_draws(tmp_path):
    """With accumulate = 2, the two micro-batches of a step read the same blocks of their rows,
    so they must see the same draws (as one pass over the whole batch would); the next step
    draws again."""
    run = RunConfig.from_dict({
        "task": "copy", "task_options": {"symbols": 2, "gap": 6, "alphabet": 4},
        "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "block_len": 4, "max_span": 16,
                  "ramp": 2, "alpha": 1e-3, "init_percentage": 0.5, "noisy": True},
        "train": {"steps": 2, "batch_size": 4, "accumulate": 2, "seq_len": 8, "warmup": 0,
                  "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2,
                  "tensorboard": False, "aux_hold": 0.0},
    })
    trainer = Trainer(run, tmp_path, progress=False)
    seen = record_uniforms(trainer.model)
    trainer.model.train()
    trainer._train_step(0)
    trainer._train_step(1)
    draws = seen[0]
    assert seen[1] == draws and len(draws) == 2 * 2 * 2  # steps x micro-batches x blocks
    first, second = draws[:4], draws[4:]
    assert first[:2] == first[2:] and second[:2] == second[2:]
    assert len(set(first[:2] + second[:2])) == 4


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
def test_noisy_training_deletes_by_the_true_spans(monkeypatch, pre_norm):
    """Every block drawn at u = 0.05 (spans shortened to 1.2 steps): the first layer (whose
    inputs, the embeddings, noise cannot change) keeps exactly the memories the same model
    keeps without noise, many of them older than any shortened span reaches."""
    forward = TransformerLayer.forward
    monkeypatch.setattr(TransformerLayer, "forward",
                        lambda self, hidden, memory, steps, u, *rest:
                        forward(self, hidden, memory, steps, 0.05, *rest))
    kept = {}
    for noisy in (True, False):
        model = tiny_model(noisy=noisy, pre_norm=pre_norm, init_percentage=0.7).train()
        _, memory = stream(model, TOKENS, [8] * 12)
        layer = memory.layers[0]
        kept[noisy] = [row[valid].tolist() for row, valid in zip(layer.steps, layer.valid,
                                                                 strict=True)]
        if noisy:
            config = model.config
            ages = memory.next_step - layer.steps[layer.valid]
            reach = 0.05 * config.max_span + config.ramp  # no shortened span is seen beyond
            assert int((ages > reach + config.block_len).sum()) > 10
    assert kept[True] == kept[False]


def test_spans_are_shortened_only_while_training():
    """The same draw in eval mode leaves the spans alone (the mask of the full spans)."""
    model = tiny_model(noisy=True, init_percentage=0.7)
    with torch.no_grad():
        noisy_eval, _ = stream(model, TOKENS, [8] * 12)
        plain, _ = stream(tiny_model(init_percentage=0.7), TOKENS, [8] * 12)
    torch.testing.assert_close(noisy_eval, plain, atol=0, rtol=0)
