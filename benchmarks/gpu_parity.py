"""Forward and backward parity of the fused (SDPA) attention path against the dense reference on a
GPU, for every memory policy, in float32 and under bfloat16 autocast.

    python benchmarks/gpu_parity.py            # needs CUDA; exits 2 without it

Prints one line per (policy, precision) with the largest logit and gradient differences, and exits
1 if any exceeds its tolerance. On CPU the same comparison runs in tests/test_attention_backends.py.
"""

from __future__ import annotations

import sys

import torch

from expire_span import MemoryTransformer, ModelConfig, available_policies

TOLERANCE = {"float32": 2e-4, "bfloat16": 5e-2}  # relative to the reference's largest value


def run(policy: str, attention: str, precision: str, tokens: torch.Tensor):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=256, n_layers=3, n_heads=8, block_len=128,
                         max_span=1024, memory=policy, ramp=32, init_percentage=0.3,
                         attention=attention)
    model = MemoryTransformer(config).cuda().train()
    for layer in model.layers:  # varied spans, so memories expire at different times
        predictor = getattr(layer.policy, "span_predictor", None)
        if predictor is not None:
            torch.nn.init.normal_(predictor.weight, std=1.0)
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    memory = None
    with torch.autocast("cuda", dtype=dtype, enabled=precision == "bfloat16"):
        for block in tokens[:, :-128].split(128, dim=1):
            with torch.no_grad():
                memory = model(block, memory).memory
        out = model(tokens[:, -128:], memory)
        loss = out.logits.float().square().mean() + out.aux_loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.float().detach(), grads


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (CPU parity is in the test suite)")
        return 2
    tokens = torch.randint(0, 256, (4, 2048), generator=torch.Generator().manual_seed(1)).cuda()
    failed = False
    for policy in available_policies():
        for precision in ("float32", "bfloat16"):
            ref_logits, ref_grads = run(policy, "dense", precision, tokens)
            logits, grads = run(policy, "sdpa", precision, tokens)
            scale = ref_logits.abs().max().item()
            logit_diff = (logits - ref_logits).abs().max().item() / scale
            grad_diff = max(
                (grads[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                for n, g in ref_grads.items()
            )
            ok = max(logit_diff, grad_diff) <= TOLERANCE[precision]
            failed |= not ok
            print(f"{policy:16s} {precision:9s} logits {logit_diff:.2e} grads {grad_diff:.2e} "
                  f"{'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
