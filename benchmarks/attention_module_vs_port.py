"""The residual attention module against the ports of ``popular.py`` (issue 13).

The ports are not benchmark peers (they need the input size when they are built, and add
the bottom-up feature once more on the way up), so they are timed here: ours, ours with
``checkpoint_mask=True``, the fixed-size port (the same function) and, on even sizes, the
seeds' one-level fixed-factor port, interleaved, 15 rounds. Prints, per candidate, the
median and quartiles of the per-round ratios port time / candidate time (above 1: the
candidate is faster than the fixed-size port), and the bytes saved for backward per byte
of x (parameters excluded). Run with one thread:

    OMP_NUM_THREADS=1 python benchmarks/attention_module_vs_port.py 2x512x7x7 5
    OMP_NUM_THREADS=1 python benchmarks/attention_module_vs_port.py 8x256x28x28 1

(the second argument: calls per sample).
"""

import copy
import statistics
import sys
import time

import torch

from refimpl.bench import saved_bytes
from refimpl.residual_attention.popular import (
    FixedFactorAttentionModule,
    FixedSizeAttentionModule,
)
from refimpl.residual_attention.torch_module import AttentionModule


def main(shape_text: str, calls: int) -> None:
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in shape_text.split("x"))
    x, grad = torch.randn(shape), torch.randn(shape)
    ours = AttentionModule(shape[1])
    lean = copy.deepcopy(ours)
    lean.checkpoint_mask = True
    modules = {"ours": ours, "ours checkpoint_mask": lean}
    modules["port"] = FixedSizeAttentionModule(shape[1], size=shape[2:], depth=2)
    if shape[2] % 2 == 0 and shape[3] % 2 == 0:  # the seeds' port halves sizes exactly
        modules["seeds' port"] = FixedFactorAttentionModule(shape[1], encoder_depth=1)

    xs = x.detach().requires_grad_()
    saved = {}
    for k, m in modules.items():
        m.train()
        saved[k] = saved_bytes(m, xs, exclude=list(m.parameters())) / (x.numel() * 4)
    print("saved per x", shape_text, {k: f"{v:.2f}" for k, v in saved.items()})

    def step(module, train):
        def run():
            if train:
                module.train()
                module(x.detach().requires_grad_()).backward(grad)
            else:
                module.eval()
                with torch.no_grad():
                    module(x)

        return run

    for train in (False, True):
        tasks = {k: step(m, train) for k, m in modules.items()}
        for task in tasks.values():
            task()
        times = {k: [] for k in tasks}
        for _ in range(15):
            for k, task in tasks.items():
                start = time.perf_counter()
                for _ in range(calls):
                    task()
                times[k].append(time.perf_counter() - start)
        summary = {}
        for k, v in times.items():
            ratios = [p / t for p, t in zip(times["port"], v, strict=True)]
            q1, med, q3 = statistics.quantiles(ratios, n=4)
            summary[k] = f"{med:.2f} [{q1:.2f}-{q3:.2f}]"
        print("fwd+bwd" if train else "forward", shape_text, summary)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
