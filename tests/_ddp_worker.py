"""One process of the two-process DDP gradient check of tests/test_ddp.py (not a test file).

    python tests/_ddp_worker.py RANK WORLD_SIZE PORT OUT_DIR

For every registered component, builds :func:`build_net` (a small conv net with the
component inside), converts its batch norms with ``nn.SyncBatchNorm.convert_sync_batchnorm``,
wraps it in ``DistributedDataParallel`` (gloo, localhost), trains one step on this
process's share of :func:`batch` and saves the gradients DDP leaves in every parameter to
``OUT_DIR/rank{RANK}.pt``: ``{component: {"grads": {name: tensor}, "error": str | None}}``.

``nn.SyncBatchNorm`` refuses CPU tensors (its statistics kernels are GPU-only, and DDP
rejects it on the CPU), so on the CPU each converted layer becomes a
:class:`CPUSyncBatchNorm`, the same function written with differentiable all-reduces,
still a layer that works only when it is called as a module: a component that bypasses
its batch norm layers (computing ``torch.batch_norm`` with their tensors itself)
normalises with per-process statistics, and its gradients differ from the single-process
ones.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from refimpl.registry import components, get, random_input, randomize_

PER_PROCESS = 3  # batch items per process; the single-process reference sees WORLD x this


class Net(nn.Module):
    """stem conv + BN + ReLU, the component, global average pooling, a linear classifier.

    A fusion component (two inputs) gets the stem's output as X and a second 1x1 conv +
    BN branch of the image as Y.
    """

    def __init__(self, name: str, seed: int = 0) -> None:
        super().__init__()
        comp = get(name)
        example = comp.make_example(seed)
        channels = example.inputs[0].shape[1]
        self.two_inputs = comp.n_inputs == 2
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False, dtype=torch.float64)
        self.bn = nn.BatchNorm2d(channels, dtype=torch.float64)
        if self.two_inputs:
            self.branch = nn.Conv2d(3, channels, 1, bias=False, dtype=torch.float64)
            self.branch_bn = nn.BatchNorm2d(channels, dtype=torch.float64)
        self.component = example.module  # float64, random weights and running statistics
        with torch.no_grad():  # a residual unit may change the channel count
            out_channels = example.module(*example.inputs).shape[1]
        self.fc = nn.Linear(out_channels, 3, dtype=torch.float64)
        randomize_(self, seed + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        if self.two_inputs:
            h = self.component(h, self.branch_bn(self.branch(x)))
        else:
            h = self.component(h)
        return self.fc(h.mean((2, 3)))


def build_net(name: str) -> Net:
    return Net(name).train()


def batch(name: str, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of all processes: images at the component's example size, labels."""
    h, w = get(name).make_example(0).inputs[0].shape[2:]
    n = PER_PROCESS * world_size
    x = random_input((n, 3, h, w), seed=1)
    y = torch.arange(n) % 3
    return x, y


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y)  # mean over this process's items


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """What ``nn.SyncBatchNorm`` computes, on any device: in training, the mean and the
    biased variance over every process's batch (two differentiable all-reduces), the
    running statistics updated with the unbiased variance, as ``F.batch_norm`` does.

    Not a subclass of ``nn.SyncBatchNorm``: DDP refuses those on the CPU.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return nn.functional.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        n = dist_fn.all_reduce(count)
        mean = dist_fn.all_reduce(x.sum(dims)) / n
        var = dist_fn.all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape)


def sync_batch_norm(model: nn.Module) -> tuple[nn.Module, int]:
    """``nn.SyncBatchNorm.convert_sync_batchnorm``; on the CPU each converted layer then
    becomes a :class:`CPUSyncBatchNorm` (the same parameters and buffers). Returns the
    model and the number of converted layers."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    for m in layers:
        if m.weight.device.type == "cpu":
            m.__class__ = CPUSyncBatchNorm
    return model, len(layers)


def main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    results = {}
    for name in components():
        try:
            model, _ = sync_batch_norm(build_net(name))
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            x, y = batch(name, world_size)
            mine = slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS)
            loss_fn(ddp(x[mine]), y[mine]).backward()
            grads = {
                k: None if p.grad is None else p.grad.detach().clone()
                for k, p in model.named_parameters()
            }
            results[name] = {"grads": grads, "error": None}
        except Exception as e:  # noqa: BLE001 - reported per component by the test
            results[name] = {"grads": {}, "error": f"{type(e).__name__}: {e}"}
        dist.barrier()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    # Results are saved; leave before gloo's threads can abort the process in their C++
    # destructors at interpreter exit (see examples/train_ddp.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
