"""Distributed and deterministic training with every registered component.

- Two processes (gloo, localhost, a free port, bounded time) train a small network holding
  each component, batch norms converted to SyncBatchNorm, one DDP step each on half the
  batch; the gradients equal one process's on the whole batch (float64). A component that
  couples the items of a batch other than through its batch norm layers, or that computes
  its batch norm without calling the layer (so the conversion does not take effect), fails.
- ``examples/train_ddp.py`` runs under ``torchrun --nproc-per-node 2`` and learns.
- ``torch.use_deterministic_algorithms(True)``: every component runs forward and backward
  under it, and two runs are bitwise identical.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ddp_worker import PER_PROCESS, batch, build_net, loss_fn

from refimpl.registry import components

ROOT = Path(__file__).resolve().parent.parent
NAMES = list(components())
WORLD = 2
TIMEOUT_S = 300  # the whole two-process run; measured ~20 s on 2 loaded CPU cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run tests/_ddp_worker.py in WORLD processes once; the results of every rank."""
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    worker = Path(__file__).with_name("_ddp_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(WORLD), str(port), str(out)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-3000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", NAMES)
def test_ddp_gradients_equal_one_process(name: str, ddp_results: list[dict]) -> None:
    for r, results in enumerate(ddp_results):
        assert results[name]["error"] is None, f"rank {r}: {results[name]['error']}"
    # The reference: one process, the whole batch, plain batch norm (its statistics are
    # those of the whole batch, what SyncBatchNorm computes across the processes).
    model = build_net(name)
    x, y = batch(name, WORLD)
    assert len(y) == WORLD * PER_PROCESS
    loss_fn(model(x), y).backward()  # mean over all items = DDP's average of the means
    expected = dict(model.named_parameters())
    for r, results in enumerate(ddp_results):
        grads = results[name]["grads"]
        assert set(grads) == set(expected), f"rank {r}: parameters differ"
        for key, p in expected.items():
            got = grads[key]
            assert (got is None) == (p.grad is None), f"rank {r}, {key}: gradient presence"
            if got is None:
                continue
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(
                got,
                p.grad,
                rtol=1e-9,
                atol=1e-12 * max(scale, 1.0),
                msg=lambda m, key=key, r=r: f"{name}, rank {r}, {key}: {m}",
            )


@pytest.mark.slow
def test_train_ddp_example_with_torchrun() -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        str(ROOT / "examples" / "train_ddp.py"),
    ]
    done = subprocess.run(
        cmd, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    last = [line for line in done.stdout.splitlines() if line.startswith("test accuracy")]
    assert len(last) == 1, log[-3000:]  # rank 0 alone reports
    accuracy = float(last[0].split()[-1])
    assert accuracy >= 0.7, f"the example did not learn: test accuracy {accuracy}\n{log}"


# ---------------------------------------------------------------------------------------
# Deterministic algorithms


def run_once(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Forward and backward in training mode: output, input gradients, parameter gradients."""
    module = copy.deepcopy(module).train()
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = module(*leaves)
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    out.backward(grad)
    params = [p.grad for p in module.parameters() if p.grad is not None]
    return [out.detach(), *(x.grad for x in leaves), *params]


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_algorithms(name: str, device: str, monkeypatch) -> None:
    if device == "cuda":  # cuBLAS needs a fixed workspace to be deterministic
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    example = components()[name].make_example(3)
    module = example.module.to(device)
    inputs = tuple(x.to(device) for x in example.inputs)
    for dtype in (torch.float32, torch.float64):
        m = module.to(dtype)
        xs = tuple(x.to(dtype) for x in inputs)
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            first, second = run_once(m, xs), run_once(m, xs)
        finally:
            torch.use_deterministic_algorithms(before)
        assert len(first) == len(second)
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            assert torch.equal(a, b), f"{name}, {dtype}: result {i} differs between two runs"
