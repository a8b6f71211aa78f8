"""Where a step's time goes: the profile figures of docs/benchmarks.md.

``train``: one training step (forward, backward, Adam, memory full) of Expire-Span at controlled
retention and of the Transformer-XL whose window is its average memory size, split into forward,
backward and optimizer time, plus the time inside the policy's ``decide``; with ``--by-function``,
also the time of every tensor operation by the package function that issued it (the backward
of autograd's own functions under "(outside the package)"). ``decode``: tensor
operations per generated token (counted with a ``TorchDispatchMode``), by source line, and the
module calls per token. ``compile``: one layer's feed-forward (with its norm and residual) at the
decoding shape ``[1, 1, d]``, eager against ``torch.compile`` (inductor), CPU microseconds per
call: whether compiling removes the per-operation overhead that dominates a decoded token.

    OMP_NUM_THREADS=1 python benchmarks/profile_costs.py train --span 1024 --retention 0.25
    OMP_NUM_THREADS=1 python benchmarks/profile_costs.py train --span 1024 --retention 0.05 --by-function
    OMP_NUM_THREADS=1 python benchmarks/profile_costs.py decode --memory transformer-xl
    OMP_NUM_THREADS=1 python benchmarks/profile_costs.py compile
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from expire_span import MemoryTransformer, ModelConfig
from expire_span.benchmarking import primed_memory, set_retention
from expire_span.model.generation import generate_stream
from expire_span.policies.base import MemoryPolicy

SHAPE = {"vocab_size": 256, "d_model": 128, "n_layers": 4, "n_heads": 4, "block_len": 64,
         "ramp": 32}
"""The peers benchmarks' small shape."""


def training_step(memory: str, span: int, retention: float | None, timers: dict[str, float]
                  ) -> tuple[Callable[[], None], list[float]]:
    """A training step (batch 16) adding its forward/backward/optimizer times to ``timers``."""
    torch.manual_seed(0)
    model = MemoryTransformer(ModelConfig(max_span=span, memory=memory, **SHAPE))
    if retention is not None:
        set_retention(model, retention, 0)
    generator = torch.Generator().manual_seed(1)
    state = {"memory": primed_memory(model, 16, generator)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    sizes: list[float] = []

    def step() -> None:
        batch = torch.randint(0, 256, (16, SHAPE["block_len"] + 1), generator=generator)
        start = time.process_time()
        out = model(batch[:, :-1], state["memory"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        forward = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        backward = time.process_time()
        optimizer.step()
        model.after_optimizer_step()
        for name, value in (("forward", forward - start), ("backward", backward - forward),
                            ("optimizer", time.process_time() - backward)):
            timers[name] += value
        state["memory"] = out.memory
        sizes.append(float(out.memory_size.mean()))

    return step, sizes


def issuer(by_line: bool = True) -> str:
    """The package file and line (or function) whose code issued the tensor operation being
    dispatched."""
    ours = [f for f in traceback.extract_stack() if "/expire_span/" in f.filename]
    if not ours:
        return "(outside the package)"
    name = ours[-1].filename.split("expire_span/")[-1]
    return f"{name}:{ours[-1].lineno}" if by_line else f"{name} {ours[-1].name}"


class TimeByFunction(TorchDispatchMode):
    """Adds each tensor operation's CPU time to ``totals[package function that issued it]``."""

    def __init__(self, totals: collections.Counter[str]) -> None:
        super().__init__()
        self.totals = totals

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = issuer(by_line=False)
        started = time.process_time()
        result = func(*args, **(kwargs or {}))
        self.totals[where] += time.process_time() - started
        return result


def profile_training(span: int, retention: float, steps: int, by_function: bool = False) -> None:
    timers = {"es": collections.Counter(), "xl": collections.Counter()}
    decide = MemoryPolicy.__subclasses__()
    originals = {cls: cls.decide for cls in decide}
    current = {"key": "es"}

    def timed(cls):
        def wrapper(self, context):
            start = time.process_time()
            result = originals[cls](self, context)
            timers[current["key"]]["decide"] += time.process_time() - start
            return result
        return wrapper

    for cls in decide:
        cls.decide = timed(cls)
    es, sizes = training_step("expire-span", span, retention, timers["es"])
    for _ in range(3):
        es()
    window = round(sum(sizes) / len(sizes))
    xl, _ = training_step("transformer-xl", window, None, timers["xl"])
    xl()
    for counter in timers.values():
        counter.clear()
    for _ in range(steps):
        current["key"] = "es"
        es()
        current["key"] = "xl"
        xl()
    print(f"L = {span}, retention {retention}: XL window {window}; CPU ms per step")
    for key, name in (("es", "expire-span"), ("xl", f"transformer-xl({window})")):
        parts = {k: round(1000 * v / steps, 1) for k, v in timers[key].items()}
        total = parts["forward"] + parts["backward"] + parts["optimizer"]
        print(f"  {name}: total {total:.1f} {parts}")
    if not by_function:
        return
    functions = {"es": collections.Counter(), "xl": collections.Counter()}
    for _ in range(steps):
        for key, step in (("es", es), ("xl", xl)):
            with TimeByFunction(functions[key]):
                step()
    print("CPU ms per step inside tensor operations, by the function that issued them "
          "(expire-span / transformer-xl):")
    for where in sorted(set(functions["es"]) | set(functions["xl"])):
        print(f"  {where}: {1000 * functions['es'][where] / steps:.1f} / "
              f"{1000 * functions['xl'][where] / steps:.1f}")
    print(f"  total: {1000 * sum(functions['es'].values()) / steps:.1f} / "
          f"{1000 * sum(functions['xl'].values()) / steps:.1f}")


def count_decode_ops(memory: str, tokens: int) -> None:
    torch.manual_seed(0)
    model = MemoryTransformer(ModelConfig(max_span=1024, memory=memory, **SHAPE)).eval()
    stream = generate_stream(model, torch.randint(0, 256, (1, 1024)), tokens + 20, seed=0)
    for _ in range(20):
        next(stream)
    counts: collections.Counter[str] = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[issuer()] += 1
            return func(*args, **(kwargs or {}))

    modules: collections.Counter[str] = collections.Counter()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, inputs: modules.update([type(module).__name__]))
    try:
        with Count():
            for _ in range(tokens):
                next(stream)
    finally:
        hook.remove()
    print(f"{memory}: {sum(counts.values()) / tokens:.1f} tensor operations per token")
    for where, count in counts.most_common(25):
        print(f"  {count / tokens:6.1f}  {where}")
    print(f"{sum(modules.values()) / tokens:.1f} module calls per token: "
          + ", ".join(f"{name} {count / tokens:g}" for name, count in modules.most_common()))


def compare_compiled_feed_forward(calls: int = 5000) -> None:
    """Eager against compiled: a layer's ``x + FF(norm(x))`` at the decoding shape."""
    torch.manual_seed(0)
    layer = MemoryTransformer(ModelConfig(max_span=1024, **SHAPE)).eval().layers[0]

    def feed_forward(x):
        return x + layer.feed_forward(layer.norm_feed_forward(x))

    compiled = torch.compile(feed_forward)
    x = torch.randn(1, 1, SHAPE["d_model"])
    with torch.no_grad():
        started = time.perf_counter()
        compiled(x)
        print(f"compiling took {time.perf_counter() - started:.0f} s")
        for name, function in (("eager", feed_forward), ("compiled", compiled)):
            for _ in range(calls // 10):
                function(x)
            started = time.process_time()
            for _ in range(calls):
                function(x)
            print(f"{name}: {(time.process_time() - started) / calls * 1e6:.1f} us per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train")
    train.add_argument("--span", type=int, default=1024)
    train.add_argument("--retention", type=float, default=0.25)
    train.add_argument("--steps", type=int, default=10)
    train.add_argument("--by-function", action="store_true",
                       help="also time tensor operations by the package function issuing them")
    decode = sub.add_parser("decode")
    decode.add_argument("--memory", default="transformer-xl")
    decode.add_argument("--tokens", type=int, default=20)
    sub.add_parser("compile")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "train":
        profile_training(args.span, args.retention, args.steps, args.by_function)
    elif args.what == "decode":
        count_decode_ops(args.memory, args.tokens)
    else:
        compare_compiled_feed_forward()


if __name__ == "__main__":
    main()
