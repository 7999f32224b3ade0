"""Time every registered module against the copy floor and its peers; count saved bytes.

For each component, input shape and device the benchmark builds a set of *candidates*:

- ours, ``component.module(channels, **options)``, once with default options and once
  more for every distinct ``ours_options`` a peer asks for (so each peer is compared with
  ours doing the same arithmetic, e.g. without biases);
- the peers of :mod:`refimpl.bench.peers` that import here, with our weights copied in
  and their output checked against ours;
- the floor ``x.clone()``: one read and one write of the input, the least any module
  returning a new (N, C, H, W) tensor can cost.

Two modes are timed: *forward* (``eval()``, ``torch.no_grad()``) and *forward+backward*
(``train()``, input with ``requires_grad``, ``out.backward(grad)`` with one fixed
``grad`` of the output's shape, e.g. (N, C, 1, 1) for a global context branch; every
gradient is set to ``None`` before each step, so each step allocates its
gradients as a training step does). The floor of forward+backward is ``x.clone()``
forward and backward: the incoming gradient is copied into ``x.grad``, one more read and
write.

Timing: within one mode, candidates run in rounds; each round visits every candidate
once, in a freshly shuffled order, and times a *sample* of back-to-back calls (as many as
fill about ``sample_ms``). The reported time is the median over rounds of the per-call
time; a ratio is the median over rounds of the per-round ratio, so a load spike that
slows one round slows both sides of its ratios. Garbage collection is off while timing;
torch uses its default number of threads.

Verdicts: a target is ``met`` only when the whole interquartile range of the per-round
ratios is on the right side of it and there are at least :data:`MIN_ROUNDS_FOR_VERDICT`
rounds; ``missed`` when the whole range is on the wrong side; otherwise ``noisy``, with
the quartiles, so a short or disturbed run never reads as a result.

Memory: :func:`saved_bytes` runs one training forward under
:func:`torch.autograd.graph.saved_tensors_hooks` and adds up the bytes of the distinct
storages that autograd saves for backward; a view (a broadcast ``expand``, a transpose)
shares its base's storage and is counted once, with the base. The input and the
parameters count when they are saved. The table gives it per byte of ONE input X (a
fusion module's X and Y together are 2.0), so the issues' targets read directly.

Operations: :func:`count_ops` counts the ATen operations dispatched by one forward
(eval, no grad) and by one backward, views included, ``detach`` excluded (an artefact of
saving tensors). At small shapes each operation costs a few microseconds of overhead
whatever its size, so the count explains much of the time there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refimpl.bench.peers import Peer, hidden_width, peers_for, targets_for
from refimpl.registry import Component, components, get

Shape = tuple[int, ...]

#: Three ResNet-50 stages: a middle one, an early wide-spatial one, a late one.
DEFAULT_SHAPES: tuple[Shape, ...] = ((8, 256, 28, 28), (32, 64, 56, 56), (2, 512, 7, 7))
#: One tiny shape for smoke tests (``--quick``).
QUICK_SHAPES: tuple[Shape, ...] = ((2, 32, 8, 8),)
#: The only dtype the benchmark uses.
DTYPE = torch.float32
DEFAULT_REPEATS = 100
QUICK_REPEATS = 3
DEFAULT_SAMPLE_MS = 2.0
QUICK_SAMPLE_MS = 1.0
#: Fewer rounds than this give no verdict ("noisy"): quartiles of a handful of rounds say
#: little about the spread.
MIN_ROUNDS_FOR_VERDICT = 10

FLOOR = "x.clone() floor"

#: The columns of the results table, in order.
COLUMNS: tuple[str, ...] = (
    "component",
    "candidate",
    "shape",
    "device",
    "fwd ms",
    "fwd / clone",
    "fwd / ours",
    "fwd+bwd ms",
    "fwd+bwd / clone",
    "fwd+bwd / ours",
    "saved / input",
    "saved w/o params / input",
    "ops fwd, bwd",
)


# ---------------------------------------------------------------------------------------
# Measurement primitives


def saved_bytes(
    fn: Callable[..., Any], *inputs: torch.Tensor, exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes autograd saves for backward while ``fn(*inputs)`` runs, each storage once.

    Every tensor autograd saves is packed through a
    :func:`torch.autograd.graph.saved_tensors_hooks` hook, which records the storage it
    lives in; the result is the sum of ``nbytes()`` over the distinct storages. A view
    (``expand``, ``t()``, ``[:, :, None, None]``) shares the storage of its base, so a
    broadcast of a small tensor costs the small tensor's bytes, and a tensor saved twice
    counts once. The whole storage counts even if only a view of it is saved: that is what
    stays alive. Inputs and parameters count when they are saved.

    Gradient mode must be on and something must require grad for anything to be saved;
    the caller sets the module to ``train()`` and the inputs to ``requires_grad``.

    Args:
        fn: the computation, e.g. a module.
        inputs: its positional arguments.
        exclude: tensors whose storages are not counted (e.g. the module's parameters,
            which exist whether or not autograd saves them).

    Returns:
        The number of bytes.
    """
    skip = {(str(t.device), t.untyped_storage().data_ptr()) for t in exclude}
    storages: dict[tuple[str, int], int] = {}
    kept: list[torch.Tensor] = []  # keep every storage alive, so no address is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in skip:
            storages[key] = storage.nbytes()
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn(*inputs)
    del out
    kept.clear()
    return sum(storages.values())


def count_ops(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad: torch.Tensor,
    module: nn.Module | None = None,
) -> tuple[int, int] | None:
    """ATen operations of one forward (eval, no grad) and of one backward of ``fn``.

    Counts every operation that reaches the dispatcher, views included, ``aten.detach``
    excluded. ``module`` (if given) is put in eval mode for the forward and train mode for
    the backward, and left in train mode.

    Args:
        fn: the computation.
        inputs: leaf tensors; they are cloned with ``requires_grad`` for the backward.
        grad: the gradient of the output.
        module: the module behind ``fn``, for its mode.

    Returns:
        ``(forward_ops, backward_ops)``, or ``None`` when this torch has no dispatch modes.
    """
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:
        return None

    class _Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(
            self,
            func: Any,
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            if func.overloadpacket is not torch.ops.aten.detach:
                self.count += 1
            return func(*args, **(kwargs or {}))

    if module is not None:
        module.eval()
    with torch.no_grad(), _Counter() as forward:
        fn(*inputs)
    if module is not None:
        module.train()
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    if module is not None:
        for p in module.parameters():
            p.grad = None  # as in a timed step: gradients are allocated, not accumulated
    out = fn(*leaves)
    with _Counter() as backward:
        out.backward(grad)
    return forward.count, backward.count


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def interleaved_times(
    tasks: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    sample_s: float,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-call seconds of each task, one sample per round, rounds interleaved.

    Each task is warmed up, then calibrated: a sample is as many back-to-back calls as fill
    about ``sample_s``. Each of ``repeats`` rounds times one sample of every task, in a
    shuffled order (seeded). Garbage collection is off while timing.

    Returns:
        For each task, ``repeats`` per-call times in seconds, in round order.
    """
    sync = _synchronizer(device)
    inner: dict[str, int] = {}
    for name, task in tasks.items():
        warm_until = time.perf_counter() + 3 * sample_s
        task()
        while time.perf_counter() < warm_until:
            task()
        sync()
        one = []
        for _ in range(3):
            start = time.perf_counter()
            task()
            sync()
            one.append(time.perf_counter() - start)
        inner[name] = max(1, min(100_000, round(sample_s / max(min(one), 1e-9))))
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in tasks}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            order = list(tasks)
            rng.shuffle(order)
            for name in order:
                task, n = tasks[name], inner[name]
                sync()
                start = time.perf_counter()
                for _ in range(n):
                    task()
                sync()
                samples[name].append((time.perf_counter() - start) / n)
    finally:
        if was_enabled:
            gc.enable()
    return samples


@dataclass(frozen=True)
class Ratio:
    """The median and quartiles of ``rounds`` per-round ratios a / b."""

    median: float
    low: float
    high: float
    rounds: int = 1

    @staticmethod
    def of(a: Sequence[float], b: Sequence[float]) -> Ratio:
        """Ratio of two equally long series of per-round times."""
        per_round = sorted(x / y for x, y in zip(a, b, strict=True))
        if len(per_round) < 2:
            return Ratio(per_round[0], per_round[0], per_round[0], len(per_round))
        q1, _, q3 = statistics.quantiles(per_round, n=4, method="inclusive")
        return Ratio(statistics.median(per_round), q1, q3, len(per_round))

    def spread(self) -> str:
        """``"quartiles 0.91-1.12 of 100 rounds"``."""
        return f"quartiles {self.low:.2f}-{self.high:.2f} of {self.rounds} rounds"


# ---------------------------------------------------------------------------------------
# Candidates and results


@dataclass
class Candidate:
    """One thing timed: our module, a peer or the floor.

    Attributes:
        label: the name in the table.
        kind: ``"ours"``, ``"peer"`` or ``"floor"``.
        fn: called with the inputs, returns the output.
        module: the module behind ``fn`` (``None`` for the floor).
        reference: label of the candidate in the "/ ours" columns' denominator: for a
            peer, ours built with the peer's ``ours_options``; for a variant of ours, ours
            with default options; ``None`` for ours by default and for the floor.
    """

    label: str
    kind: str
    fn: Callable[..., torch.Tensor]
    module: nn.Module | None = None
    reference: str | None = None


@dataclass
class Row:
    """One line of the results table: one candidate on one shape and device."""

    component: str
    candidate: str
    kind: str
    shape: Shape
    device: str
    forward_ms: float
    forward_vs_floor: Ratio
    forward_vs_ours: Ratio | None
    train_ms: float
    train_vs_floor: Ratio
    train_vs_ours: Ratio | None
    saved_ratio: float
    saved_activation_ratio: float
    ops: tuple[int, int] | None
    reference: str | None = None

    def cells(self) -> list[str]:
        """The row as table cells, in the order of :data:`COLUMNS`."""

        def ratio(r: Ratio | None) -> str:
            return "—" if r is None else f"{r.median:.2f}"

        return [
            self.component,
            self.candidate,
            format_shape(self.shape),
            self.device,
            _format_ms(self.forward_ms),
            ratio(self.forward_vs_floor),
            ratio(self.forward_vs_ours),
            _format_ms(self.train_ms),
            ratio(self.train_vs_floor),
            ratio(self.train_vs_ours),
            f"{self.saved_ratio:.2f}",
            f"{self.saved_activation_ratio:.2f}",
            "—" if self.ops is None else f"{self.ops[0]}, {self.ops[1]}",
        ]


@dataclass
class Report:
    """Everything one benchmark run found: environment, rows, notes, target checks."""

    environment: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def format_shape(shape: Shape) -> str:
    """``(8, 256, 28, 28)`` -> ``"8x256x28x28"``."""
    return "x".join(str(s) for s in shape)


def parse_shape(text: str) -> Shape:
    """``"8x256x28x28"`` -> ``(8, 256, 28, 28)``; raises ValueError if not 4 positive ints."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(
            f"a shape is NxCxHxW with positive integers, e.g. 8x256x28x28; got {text!r}"
        )
    return shape


def _format_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _options_label(options: dict[str, Any]) -> str:
    if not options:
        return "refimpl"
    return "refimpl (" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"


def _ours_variants(comp: Component) -> list[dict[str, Any]]:
    """Our option sets: the defaults first, then each distinct one a peer asks for."""
    variants: list[dict[str, Any]] = [{}]
    for peer in peers_for(comp.name):
        options = dict(peer.ours_options)
        if options not in variants:
            variants.append(options)
    return variants


def _build_candidates(
    comp: Component,
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    notes: list[str],
) -> list[Candidate]:
    """Ours (each option set), the peers that import and agree with ours, and the floor."""
    channels = inputs[0].shape[1]
    ours: dict[str, nn.Module] = {}
    candidates = []
    for options in _ours_variants(comp):
        label = _options_label(options)
        module = comp.module(channels, **options).to(device=device, dtype=DTYPE)
        ours[label] = module
        reference = None if not options else _options_label({})
        candidates.append(Candidate(label, "ours", module, module, reference))
    for peer in peers_for(comp.name):
        candidate = _build_peer(comp, peer, ours[_options_label(dict(peer.ours_options))], inputs)
        if isinstance(candidate, str):
            if candidate not in notes:
                notes.append(candidate)
        else:
            candidates.append(candidate)
    candidates.append(Candidate(FLOOR, "floor", lambda x, *rest: x.clone()))
    return candidates


def _build_peer(
    comp: Component, peer: Peer, ours: nn.Module, inputs: Sequence[torch.Tensor]
) -> Candidate | str:
    """The peer as a candidate, or a note saying why it is skipped."""
    channels = inputs[0].shape[1]
    try:
        module = peer.build(channels, hidden_width(ours, channels))
        module = module.to(device=inputs[0].device, dtype=DTYPE)
        if peer.load is not None:
            peer.load(module, ours)
    except ImportError as err:
        return f"{comp.name}: peer {peer.name!r} skipped, it does not import here: {err}"
    except Exception as err:  # a peer that cannot be built must not stop the run
        return f"{comp.name}: peer {peer.name!r} skipped, building it failed: {err!r}"
    if peer.load is not None:
        ours.eval()
        module.eval()
        with torch.no_grad():
            want, got = ours(*inputs), module(*inputs)
        err = (want - got).abs().max().item()
        scale = want.abs().max().item() or 1.0
        if not err <= 1e-4 * scale:
            return (
                f"{comp.name}: peer {peer.name!r} skipped, with our weights it differs from "
                f"ours by {err:.3g} (max |ours| = {scale:.3g}): not the same function"
            )
    return Candidate(peer.name, "peer", module, module, _options_label(dict(peer.ours_options)))


def _train_step(
    candidate: Candidate, inputs: Sequence[torch.Tensor], grad: torch.Tensor
) -> Callable[[], None]:
    """One training step of the candidate: gradients cleared, forward, backward with grad."""
    params = [] if candidate.module is None else list(candidate.module.parameters())
    leaves = [*inputs, *params]
    fn = candidate.fn

    def step() -> None:
        for t in leaves:
            t.grad = None
        fn(*inputs).backward(grad)

    return step


def bench_component(
    comp: Component,
    shape: Shape,
    device: torch.device,
    repeats: int,
    sample_s: float,
    seed: int = 0,
    notes: list[str] | None = None,
) -> list[Row]:
    """Time every candidate of one component on one shape and device; one row each.

    Args:
        comp: the registered component.
        shape: (N, C, H, W) of each input; ours is built with C channels.
        device: where everything runs.
        repeats: rounds of interleaved samples per mode.
        sample_s: seconds of back-to-back calls per sample.
        seed: seeds the inputs, the gradient and the order of each round.
        notes: skipped peers are reported here.

    Returns:
        The rows, ours first, the floor last.
    """
    notes = [] if notes is None else notes
    gen = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn(shape, generator=gen, dtype=DTYPE).to(device) for _ in range(comp.n_inputs)
    ]
    candidates = _build_candidates(comp, inputs, device, notes)
    # One fixed gradient per output shape: a candidate's output need not have the input's
    # shape (a global context branch returns (N, C, 1, 1)), the floor's always has.
    grads: dict[torch.Size, torch.Tensor] = {}
    grad_of: dict[str, torch.Tensor] = {}
    for c in candidates:
        with torch.no_grad():
            out_shape = c.fn(*inputs).shape
        if out_shape not in grads:
            grads[out_shape] = torch.randn(out_shape, generator=gen, dtype=DTYPE).to(device)
        grad_of[c.label] = grads[out_shape]

    for c in candidates:
        if c.module is not None:
            c.module.eval()
    with torch.no_grad():
        tasks = {c.label: (lambda c=c: c.fn(*inputs)) for c in candidates}
        forward = interleaved_times(tasks, device, repeats, sample_s, seed)

    for c in candidates:
        if c.module is not None:
            c.module.train()
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    tasks = {c.label: _train_step(c, leaves, grad_of[c.label]) for c in candidates}
    train = interleaved_times(tasks, device, repeats, sample_s, seed + 1)

    input_bytes = inputs[0].numel() * inputs[0].element_size()  # per X, not per X and Y
    rows = []
    for c in candidates:
        if c.module is not None:
            c.module.train()
        params = [] if c.module is None else list(c.module.parameters())
        saved = saved_bytes(c.fn, *[x.detach().clone().requires_grad_() for x in inputs])
        saved_activations = saved_bytes(
            c.fn, *[x.detach().clone().requires_grad_() for x in inputs], exclude=params
        )
        ops = count_ops(c.fn, inputs, grad_of[c.label], c.module)
        ref = c.reference
        rows.append(
            Row(
                component=comp.name,
                candidate=c.label,
                kind=c.kind,
                shape=tuple(shape),
                device=str(device),
                forward_ms=statistics.median(forward[c.label]),
                forward_vs_floor=Ratio.of(forward[c.label], forward[FLOOR]),
                forward_vs_ours=None if ref is None else Ratio.of(forward[c.label], forward[ref]),
                train_ms=statistics.median(train[c.label]),
                train_vs_floor=Ratio.of(train[c.label], train[FLOOR]),
                train_vs_ours=None if ref is None else Ratio.of(train[c.label], train[ref]),
                saved_ratio=saved / input_bytes,
                saved_activation_ratio=saved_activations / input_bytes,
                ops=ops,
                reference=ref,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------
# Checks against the targets and the report


def verdict(ratio: Ratio, limit: float, at_most: bool) -> str:
    """Whether the per-round ratios keep to ``limit``: ``met``, ``missed`` or ``noisy``.

    ``met`` when the whole interquartile range keeps to the limit (``ratio <= limit`` if
    ``at_most``, else ``ratio >= limit``); ``missed`` when the whole range breaks it;
    ``noisy`` when the range straddles the limit, or when there are fewer than
    :data:`MIN_ROUNDS_FOR_VERDICT` rounds: the run cannot tell.
    """
    if ratio.rounds < MIN_ROUNDS_FOR_VERDICT:
        return f"noisy (only {ratio.rounds} rounds; a verdict needs {MIN_ROUNDS_FOR_VERDICT})"
    good, bad = (ratio.high, ratio.low) if at_most else (ratio.low, ratio.high)
    keeps = (lambda v: v <= limit) if at_most else (lambda v: v >= limit)
    if keeps(good):
        return "met"
    if not keeps(bad):
        return "missed"
    return "noisy (the quartiles straddle the target)"


def checks(rows: Sequence[Row]) -> list[str]:
    """One line per component, shape and device: ours against the floor, peers, targets.

    Each line gives ours' forward and forward+backward in multiples of the floor and, where
    :data:`refimpl.bench.peers.TARGETS` sets them, checks the component's targets: forward
    within a multiple of ``x.clone()`` at a shape, no slower than the fastest peer (each peer
    against ours built with the same options) and at most so many bytes saved for backward
    per byte of one input X (checked without the parameters' storages, which exist
    whether saved or not; the count with them is reported).
    """
    lines = []
    groups: dict[tuple[str, Shape, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.component, row.shape, row.device), []).append(row)
    for (component, shape, device), group in groups.items():
        target = targets_for(component)
        ours = next(r for r in group if r.kind == "ours" and r.reference is None)
        forward = ours.forward_vs_floor
        parts = [f"forward {forward.median:.2f}x clone [{forward.spread()}]"]
        if shape in target.forward_vs_clone:
            limit = target.forward_vs_clone[shape]
            parts[0] += f" (<= {limit:g}) {verdict(forward, limit, at_most=True)}"
        parts.append(
            f"fwd+bwd {ours.train_vs_floor.median:.2f}x clone [{ours.train_vs_floor.spread()}]"
        )
        peers = [r for r in group if r.kind == "peer"]
        for mode, time_of, ratio_of in (
            ("forward", lambda r: r.forward_ms, lambda r: r.forward_vs_ours),
            ("fwd+bwd", lambda r: r.train_ms, lambda r: r.train_vs_ours),
        ):
            if not peers:
                continue
            fastest = min(peers, key=time_of)
            ratio = ratio_of(fastest)
            said = (
                f" (>= 1) {verdict(ratio, 1.0, at_most=False)}"
                if target.no_slower_than_peers
                else ""
            )
            parts.append(
                f"{mode} vs fastest peer ({fastest.candidate}): peer/ours {ratio.median:.2f} "
                f"[{ratio.spread()}]{said}"
            )
        for what, value in (
            ("saved", ours.saved_ratio),
            ("saved w/o params", ours.saved_activation_ratio),
        ):
            if target.max_saved is None or what == "saved":
                parts.append(f"{what} {value:.3f}x input")
            else:  # bytes are counted, not timed: no noise
                met = "met" if value <= target.max_saved else "missed"
                parts.append(f"{what} {value:.3f}x input (<= {target.max_saved:g}) {met}")
        lines.append(f"{component} {format_shape(shape)} {device}: " + "; ".join(parts))
    return lines


def _cpu_info() -> dict[str, str]:
    info = {"model": platform.processor() or platform.machine(), "cache": "?", "virtual": "?"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model"] = value
        elif key == "cache size":
            info["cache"] = value
        elif key == "flags":
            info["virtual"] = "yes (hypervisor flag)" if "hypervisor" in value.split() else "no"
    return info


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "?"


def environment(command: str) -> dict[str, str]:
    """The machine and software a run measures, as label -> value."""
    cpu = _cpu_info()
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "CPU": f"{cpu['model']}, {os.cpu_count()} logical CPUs, cache {cpu['cache']}, "
        f"virtualised: {cpu['virtual']}",
        "CPU capability used by torch": torch.backends.cpu.get_cpu_capability(),
        "memory": _memory(),
        "OS": platform.platform(),
        "Python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        "torch threads": f"{torch.get_num_threads()} intra-op, "
        f"{torch.get_num_interop_threads()} inter-op",
    }
    if torch.cuda.is_available():
        env["GPU"] = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
    try:
        import timm

        env["timm"] = timm.__version__
    except Exception as err:  # timm may fail to import for reasons other than absence
        env["timm"] = f"not importable ({type(err).__name__})"
    if hasattr(os, "getloadavg"):
        env["load average at start"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return env


def format_markdown(report: Report) -> str:
    """The report as markdown: environment, results table, checks, notes, legend."""
    lines = ["# refimpl benchmark", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.environment.items()]
    lines += ["", "## Results", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    lines += ["| " + " | ".join(row.cells()) + " |" for row in report.rows]
    lines += [
        "",
        "Times are medians over interleaved rounds of the per-call time; ratios are medians "
        "of per-round ratios. `/ clone`: against `x.clone()` of the same input (forward) and "
        "`x.clone()` forward and backward (fwd+bwd). `/ ours`: a peer against ours built with "
        "the same options (so the same arithmetic), a variant of ours against ours with "
        "default options; above 1 means ours is faster. `saved / input`: bytes saved for "
        "backward per byte of ONE input X (a fusion's X and Y together are 2.0), each "
        "storage once, parameters and input included when "
        "saved; `saved w/o params`: the same without the parameters' storages (they exist "
        "whether saved or not). `ops`: ATen operations of one forward (no grad) and one "
        "backward, `detach` excluded.",
    ]
    if report.failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {line}" for line in report.failures]
    if report.checks:
        lines += ["", "## Checks", ""]
        lines += [f"- {line}" for line in report.checks]
    if report.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {line}" for line in report.notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Command line


DESCRIPTION = (
    "Time forward (eval, no grad) and forward+backward (train) of every registered module "
    "against x.clone() and other implementations, interleaved and repeated; report medians, "
    "ratios with their quartiles, and bytes saved for backward as a markdown table. Exit "
    "status 1 if a component could not be benchmarked, 2 for a bad argument."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, on ``parser`` (its own, or ``refimpl bench``'s subparser)."""
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="benchmark only this component (name or alias, any case); repeatable",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="NxCxHxW",
        help="input shapes, e.g. 8x256x28x28 2x512x7x7 (default: "
        + " ".join(format_shape(s) for s in DEFAULT_SHAPES)
        + ")",
    )
    parser.add_argument(
        "--device",
        action="append",
        metavar="DEVICE",
        help="torch device; repeatable (default: cpu, and cuda when available)",
    )
    parser.add_argument(
        "--repeats", type=int, metavar="N", help=f"interleaved rounds (default {DEFAULT_REPEATS})"
    )
    parser.add_argument(
        "--sample-ms",
        type=float,
        metavar="MS",
        help=f"milliseconds of back-to-back calls per sample (default {DEFAULT_SAMPLE_MS:g})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: shape {format_shape(QUICK_SHAPES[0])}, {QUICK_REPEATS} rounds "
        "(too few for verdicts: they read noisy)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch intra-op threads for the run (default: torch's default, the core count)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds inputs and round orders")
    parser.add_argument("--output", metavar="FILE", help="also write the markdown to FILE")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refimpl bench", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def run(
    names: Sequence[str] | None = None,
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    devices: Sequence[str | torch.device] | None = None,
    repeats: int = DEFAULT_REPEATS,
    sample_ms: float = DEFAULT_SAMPLE_MS,
    seed: int = 0,
    command: str = "",
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Benchmark components and return the report (see :func:`main` for the options).

    Args:
        names: component names or aliases; ``None`` for every registered component.
        shapes: (N, C, H, W) input shapes.
        devices: devices; ``None`` for the CPU and, when available, CUDA.
        repeats: interleaved rounds per mode.
        sample_ms: milliseconds of back-to-back calls per sample.
        seed: seeds the inputs and round orders.
        command: the command line, recorded in the environment table.
        progress: called with a line before each component, shape and device.
    """
    comps = list(components().values()) if names is None else [get(n) for n in names]
    comps = list({c.name: c for c in comps}.values())
    if devices is None:
        devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    report = Report(environment(command))
    for comp in comps:
        for device in devices:
            for shape in shapes:
                if progress is not None:
                    progress(f"{comp.name} {format_shape(shape)} {device}")
                try:
                    rows = bench_component(
                        comp,
                        shape,
                        torch.device(device),
                        repeats,
                        sample_ms / 1e3,
                        seed,
                        report.notes,
                    )
                except (TypeError, ValueError, RuntimeError) as err:
                    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    report.failures.append(
                        f"{comp.name} {format_shape(shape)} {device}: not benchmarked, "
                        f"building or running it failed: {type(err).__name__}: {first_line}"
                    )
                    continue
                report.rows += rows
    report.checks = checks(report.rows)
    return report


def _command_line(argv: Sequence[str] | None) -> str:
    """The command that ran the benchmark, as typed, when ``argv`` came from it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    invoked = getattr(sys, "orig_argv", None)  # Python >= 3.10: the interpreter's own argv
    if invoked and (not argv or invoked[-len(argv) :] == argv):
        return shlex.join(invoked)
    return f"refimpl.bench.main({argv!r})"


def main(argv: list[str] | None = None) -> int:
    """``python -m refimpl bench``: run the benchmark, print the markdown, maybe save it.

    Returns:
        0 on success, 1 if a component could not be benchmarked, 2 for a bad argument
        (unknown component, shape or device).
    """
    parser = _parser()
    return run_command(parser.parse_args(argv), prog=parser.prog, argv=argv)


def run_command(
    args: argparse.Namespace, prog: str = "python -m refimpl bench", argv: list[str] | None = None
) -> int:
    """Run the benchmark for parsed options (see :func:`add_arguments`); the exit status.

    Args:
        args: the parsed options.
        prog: the command's name, for error messages.
        argv: the arguments as given, recorded in the report (default: ``sys.argv``).
    """
    from refimpl.check import require_device

    shapes: Sequence[Shape] = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    try:
        if args.shapes:
            shapes = [parse_shape(s) for text in args.shapes for s in text.split(",") if s]
        for name in args.only or []:
            get(name)
        for device in args.device or []:
            require_device(device)
    except (ValueError, KeyError) as err:
        print(f"{prog}: error: {err.args[0]}", file=sys.stderr)
        return 2
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    sample_ms = args.sample_ms or (QUICK_SAMPLE_MS if args.quick else DEFAULT_SAMPLE_MS)
    if repeats < 1 or sample_ms <= 0 or (args.threads is not None and args.threads < 1):
        message = "--repeats, --sample-ms and --threads must be positive"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = _command_line(argv)
    start = time.perf_counter()
    try:
        report = run(
            args.only,
            shapes,
            args.device,
            repeats,
            sample_ms,
            args.seed,
            command,
            progress=lambda line: print(f"bench: {line}", file=sys.stderr, flush=True),
        )
    finally:
        torch.set_num_threads(threads)
    report.environment["duration"] = f"{time.perf_counter() - start:.0f} s"
    if hasattr(os, "getloadavg"):
        report.environment["load average at end"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = format_markdown(report)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text)
    for failure in report.failures:
        print(f"{prog}: FAILED: {failure}", file=sys.stderr)
    return 1 if report.failures else 0
