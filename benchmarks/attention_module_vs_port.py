"""The residual attention module against the fixed-size port of ``popular.py`` (issue 13).

The port is not a benchmark peer (it needs the input size when it is built, and adds the
bottom-up feature once more on the way up), so it is timed here: ours, ours with
``checkpoint_mask=True`` and the port, interleaved, 15 rounds; prints peer/candidate
medians (above 1: the candidate is faster). Run with one thread:

    OMP_NUM_THREADS=1 python benchmarks/attention_module_vs_port.py 2x512x7x7 5
    OMP_NUM_THREADS=1 python benchmarks/attention_module_vs_port.py 8x256x28x28 1

(the second argument: calls per sample).
"""

import copy
import statistics
import sys
import time

import torch

from refimpl.residual_attention.popular import FixedSizeAttentionModule
from refimpl.residual_attention.torch_module import AttentionModule


def main(shape_text: str, calls: int) -> None:
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in shape_text.split("x"))
    x, grad = torch.randn(shape), torch.randn(shape)
    ours = AttentionModule(shape[1])
    lean = copy.deepcopy(ours)
    lean.checkpoint_mask = True
    port = FixedSizeAttentionModule(shape[1], size=shape[2:], depth=2)

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
        tasks = {"ours": ours, "ours checkpoint_mask": lean, "port": port}
        tasks = {k: step(m, train) for k, m in tasks.items()}
        for task in tasks.values():
            task()
        times = {k: [] for k in tasks}
        for _ in range(15):
            for k, task in tasks.items():
                start = time.perf_counter()
                for _ in range(calls):
                    task()
                times[k].append(time.perf_counter() - start)
        ratios = {
            k: statistics.median(p / t for p, t in zip(times["port"], v, strict=True))
            for k, v in times.items()
        }
        print(
            "fwd+bwd" if train else "forward",
            shape_text,
            {k: f"{r:.2f}" for k, r in ratios.items()},
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
