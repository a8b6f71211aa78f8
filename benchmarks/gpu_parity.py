"""Forward and backward parity of the fused attention paths (SDPA and FlexAttention) against the
dense reference on a GPU, for every memory policy, in float32 and under bfloat16 autocast.

    python benchmarks/gpu_parity.py            # needs CUDA; exits 2 without it

The ``parity`` part of ``benchmarks/gpu_check.py`` (which also runs everything else the GPU
should show), alone: one line per (policy, precision, backend) with the largest relative logit
and gradient differences; exits 1 if any exceeds its tolerance. On CPU the same comparison runs
in tests/test_attention_backends.py and tests/test_flex_attention.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import parity_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(parity_main())
