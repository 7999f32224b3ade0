"""``check_invariants`` and ``compare``: any module against a paper's properties and oracle."""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from refimpl.registry import Component, SkipProperty, Variant, get, oracle_options
from refimpl.testing import properties as P
from refimpl.testing.report import Report

KeyMap = Mapping[str, str] | Callable[[str], str]

#: Attribute names under which modules commonly keep their input channel count.
_CHANNEL_ATTRIBUTES = ("channels", "in_channels", "in_planes", "inplanes", "gate_channel")

#: Input shapes of ``compare`` as (N, H, W) and the modes each runs in: odd and
#: non-square, a single position, batch 1; training needs more than one value per channel
#: in every batch norm (three images, for the norms after a global pooling).
COMPARE_CASES: tuple[tuple[tuple[int, int, int], tuple[bool, ...]], ...] = (
    ((3, 7, 5), (False, True)),
    ((2, 6, 9), (False, True)),
    ((1, 1, 1), (False,)),
    ((1, 5, 8), (False,)),
)

#: Finite-difference step of the directional gradient check, relative to the input scale,
#: and its tolerance: central differences in float64 are accurate to ~h^2 (1e-12) plus
#: rounding ~1e-16 / h (1e-10) relative.
FD_STEP = 1e-6
GRAD_RTOL = {torch.float64: 1e-6, torch.float32: 2e-3}


# ---------------------------------------------------------------------------------------
# Shared helpers


def infer_channels(module: nn.Module, n_inputs: int = 1) -> int:
    """The input channel count of ``module``: the first candidate on which it runs, of an
    attribute with a common name, the input width of its first parameter (a weight's
    dimension 1, a norm's length), then every other dimension of its parameters; the
    first candidate if it runs on none (a module built for one input size)."""
    candidates: list[int] = []
    for name in _CHANNEL_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and value >= 1:
            candidates.append(value)
    params = list(module.parameters())
    if params:
        candidates.append(int(params[0].shape[1] if params[0].dim() >= 2 else params[0].shape[0]))
    candidates += sorted({int(d) for p in params for d in p.shape})
    if not candidates:
        raise ValueError(
            f"cannot tell the channel count of {type(module).__name__} (no parameters and "
            f"none of the attributes {_CHANNEL_ATTRIBUTES}): pass channels="
        )
    m = copy.deepcopy(module).eval()
    ref = next(iter([*m.parameters(), *m.buffers()]), torch.zeros(()))
    for c in dict.fromkeys(candidates):
        x = torch.randn(2, c, 5, 7, dtype=ref.dtype, device=ref.device)
        try:
            with torch.no_grad():
                m(*[x] * n_inputs)
        except Exception:
            continue
        return c
    return candidates[0]  # it runs on none of them here (built for one input size?)


def make_inputs(
    comp: Component, shape: tuple[int, int, int, int], seed: int
) -> tuple[torch.Tensor, ...]:
    """``comp.n_inputs`` float64 tensors of ``shape`` from ``seed``: standard normal plus an
    offset per image and channel, so a batch norm after global pooling sees well spread
    values (its batch deviation stays away from 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(comp.n_inputs):
        offsets = rng.standard_normal((shape[0], shape[1], 1, 1))
        out.append(torch.from_numpy(rng.standard_normal(shape) + offsets))
    return tuple(out)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _reference(comp: Component, channels: int, options: Mapping[str, Any]) -> nn.Module:
    try:
        return comp.module(channels, **options).double()
    except TypeError as err:
        raise ValueError(f"{comp.module.__name__}({channels}, **{dict(options)}): {err}") from err


def _run_reference(
    ref: nn.Module, inputs: Sequence[torch.Tensor], training: bool
) -> tuple[torch.Tensor | None, str | None]:
    """refimpl's module on ``inputs`` in this mode: (output, None), or (None, why it is
    not defined there)."""
    ref = copy.deepcopy(ref).train(training)
    try:
        with torch.no_grad():
            return _first(ref(*inputs)), None
    except (ValueError, RuntimeError) as err:
        return None, str(err).splitlines()[0]


def _defined(ref: nn.Module, inputs: Sequence[torch.Tensor], training: bool) -> str | None:
    """None if refimpl's module computes on ``inputs`` in this mode, else why not."""
    return _run_reference(ref, inputs, training)[1]


def _needs_missing(module: nn.Module, needs: Sequence[str]) -> str | None:
    if "maps" in needs:
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "return_maps" not in params:
            return "needs forward(..., return_maps=True), which this module does not take"
    if "mask_hook" in needs and not hasattr(module, "force_mask"):
        return "needs a mask hook (a force_mask attribute), which this module does not have"
    return None


# ---------------------------------------------------------------------------------------
# check_invariants


def check_invariants(
    module: nn.Module,
    name: str,
    *,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    examples: int = 20,
    channels: int | None = None,
) -> Report:
    """Run the implementation-independent properties of component ``name`` on ``module``.

    Works on any ``nn.Module`` with the component's call signature (``m(x)``, or
    ``m(x, y)`` for the fusion modules): the output shape (that of refimpl's module with
    the same ``options``), input not modified, channels_last gives the same result, batch
    items independent in eval mode, and each paper's own properties that need only
    outputs (``refimpl.<paper>.registry``). A property that needs what the module cannot
    give (maps, a mask hook) is skipped with the reason. The module is copied, moved to
    float64 and put in eval mode; the original is not touched.

    Args:
        module: the implementation to check.
        name: the registered component it implements (``"cbam"``, ``"se"``, ``"aff"``).
        options: refimpl constructor options it implements (``{"factor_two": True}``),
            where properties depend on them; also used to build refimpl's module for the
            output shape.
        seed: first seed of the random inputs.
        examples: how many random inputs (shapes from 1x1 to 11x11, batches of 1 to 3).
        channels: the input channel count (default: read from the module).

    Returns:
        A :class:`~refimpl.testing.Report`; ``report.assert_ok()`` raises if any failed.
    """
    comp = get(name)
    options = dict(options or {})
    channels = channels or infer_channels(module, comp.n_inputs)
    module = copy.deepcopy(module).double().eval()
    device = device_of(module)
    ref = _reference(comp, channels, options).to(device).eval()
    report = Report(f"{type(module).__name__} against the properties of {comp.name}")

    def shape_property(m: nn.Module, inputs: P.Inputs, opts: dict) -> tuple[bool, str]:
        got = tuple(P.output(m, inputs).shape)
        want = tuple(P.output(ref, inputs).shape)
        return got == want, f"{got}" if got == want else f"got {got}, expected {want}"

    props = [
        P.property_(f"output shape as refimpl's {comp.module.__name__}", shape_property),
        P.input_not_modified(),
        P.channels_last_same(),
        P.batch_independent(),
        *comp.properties,
    ]
    rng = np.random.default_rng(seed)
    cases: list[tuple[torch.Tensor, ...]] = []
    for attempt in range(20 * examples):
        if len(cases) == examples:
            break
        n = 2 if len(cases) < examples // 2 else int(rng.integers(1, 4))  # half test batches
        shape = (n, channels, int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        inputs = tuple(x.to(device) for x in make_inputs(comp, shape, seed + attempt + 1))
        if _defined(ref, inputs, False) is None:
            cases.append(inputs)
    if not cases:
        raise ValueError(f"refimpl's {comp.name} is defined on none of the sizes drawn")
    for prop in props:
        _run_property(report, prop, module, cases, options)
    return report


def _run_property(report: Report, prop: Any, module: nn.Module, cases: list, options: dict) -> None:
    if reason := _needs_missing(module, prop.needs):
        report.add(prop.name, "skipped", reason)
        return
    m = module.train() if "train" in prop.needs else module.eval()
    failures, skips, passes = [], [], []
    for inputs in cases:
        shape = tuple(inputs[0].shape)
        try:
            ok, detail = prop.check(m, inputs, options)
        except SkipProperty as why:
            skips.append(f"{why}")
            continue
        except Exception as err:  # the module itself failed: that is a finding
            ok, detail = False, f"raised {type(err).__name__}: {str(err).splitlines()[0]}"
        (passes if ok else failures).append(f"input {shape}: {detail}")
    module.eval()
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        report.add(prop.name, "failed", failures[0] + more)
    elif passes:
        report.add(prop.name, "passed", f"{len(passes)} inputs")
    else:
        report.add(prop.name, "skipped", skips[0] if skips else "no input")


# ---------------------------------------------------------------------------------------
# compare: mapping the user's weights onto refimpl's keys


def _weights(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors that carry a function: all but batch norms' step counters."""
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def _shape_of(v: Any) -> tuple[int, ...]:
    """The shape for matching: a 1x1 convolution's (out, in, 1, 1) weight counts as the
    (out, in) weight of the linear layer it equals (trailing 1s dropped past two axes)."""
    shape = tuple(np.shape(v.detach().cpu() if isinstance(v, torch.Tensor) else v))
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _match_by_shapes(
    user: Mapping[str, Any], ref: Mapping[str, Any], strict: bool
) -> tuple[dict[str, str], list[str]]:
    """refimpl key -> user key by shapes. In order when every shape agrees in order;
    otherwise tensors of the same shape pair up in the order they come. ``strict``:
    an unequal count of some shape is an error (ValueError listing the candidates);
    otherwise the first ones pair up and the rest of the user's are left out."""
    u_keys, r_keys = list(user), list(ref)
    u_shapes = [_shape_of(user[k]) for k in u_keys]
    r_shapes = [_shape_of(ref[k]) for k in r_keys]
    if u_shapes == r_shapes:
        return dict(zip(r_keys, u_keys, strict=True)), []
    notes, problems, mapping = [], [], {}
    for shape in dict.fromkeys(r_shapes):
        rs = [k for k, s in zip(r_keys, r_shapes, strict=True) if s == shape]
        us = [k for k, s in zip(u_keys, u_shapes, strict=True) if s == shape]
        if len(us) < len(rs) or (strict and len(us) != len(rs)):
            kind = "missing" if len(us) < len(rs) else "ambiguous"
            problems.append(
                f"  shape {shape} ({kind}): refimpl keys {rs}; candidates in the module: "
                f"{us or 'none'}"
            )
            continue
        mapping.update(zip(rs, us[: len(rs)], strict=True))
        if len(rs) > 1:
            notes.append(f"{len(rs)} tensors of shape {shape} paired in order")
    if problems:
        raise ValueError(
            "cannot match the module's tensors to refimpl's by shape:\n"
            + "\n".join(problems)
            + "\npass key_map={refimpl key: your key} (or a callable), or converter="
        )
    return mapping, notes


def _apply_key_map(key_map: KeyMap, ref: Mapping[str, Any]) -> dict[str, str]:
    if callable(key_map):
        return {k: key_map(k) for k in ref}
    return {k: key_map.get(k, k) for k in ref}


def _convert(comp: Component, converter: str | Callable, user_sd: dict) -> tuple[dict, dict]:
    """The user's state dict through a refimpl converter; returns (state dict, options
    the converted weights need, if the converter says)."""
    if callable(converter):
        fn = converter
    else:
        mod = importlib.import_module(f"refimpl.{comp.paper}.convert")
        fn = getattr(mod, f"convert_{converter}_state_dict", None)
        if fn is None:
            known = [
                n[8:-11] for n in dir(mod) if n.startswith("convert_") and n.endswith("_state_dict")
            ]
            raise ValueError(
                f"no converter {converter!r} for {comp.paper}; refimpl has: {known or 'none'}"
            )
    kwargs = {"warn": False} if "warn" in inspect.signature(fn).parameters else {}
    out = fn(user_sd, **kwargs)  # renaming is all compare needs: the form is checked after
    if isinstance(out, tuple):  # (state dict, options)
        return dict(out[0]), dict(out[1])
    return dict(out), {}


def map_params(
    user_sd: Mapping[str, Any],
    ref: nn.Module,
    *,
    key_map: KeyMap | None = None,
    strict: bool = True,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The NumPy ``params`` of refimpl's module ``ref`` filled with the user's weights.

    Returns the params (float64 arrays, refimpl's keys; batch-norm step counters taken
    from ``ref``) and notes on how they were matched.

    Raises:
        KeyError: a key the key map names is not in the user's state dict.
        ValueError: a shape differs, or matching by shapes is ambiguous or impossible.
    """
    ref_sd = ref.state_dict()
    ref_w, user_w = _weights(ref_sd), _weights(user_sd)
    notes: list[str] = []
    if key_map is not None:
        mapping = _apply_key_map(key_map, ref_w)
    elif set(ref_w) <= set(user_w) and all(
        _shape_of(user_w[k]) == _shape_of(v) for k, v in ref_w.items()
    ):
        mapping = {k: k for k in ref_w}
    else:
        mapping, notes = _match_by_shapes(user_w, ref_w, strict)
    params = {}
    for rk, uk in mapping.items():
        if uk not in user_sd:
            raise KeyError(f"key_map sends {rk!r} to {uk!r}, which the module does not have")
        value = user_sd[uk]
        if _shape_of(value) != _shape_of(ref_sd[rk]):
            raise ValueError(
                f"{uk!r} has shape {_shape_of(value)}; refimpl's {rk!r} needs "
                f"{_shape_of(ref_sd[rk])}"
            )
        params[rk] = _to_numpy(value).reshape(tuple(ref_sd[rk].shape))
    for k, v in ref_sd.items():
        if k.endswith("num_batches_tracked"):
            params[k] = v.cpu().numpy()
    if strict and key_map is None:
        unused = sorted(set(user_w) - set(mapping.values()))
        if unused:
            notes.append(f"not used by refimpl's form: {unused}")
    return params, notes


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.to(torch.float64).numpy() if v.is_floating_point() else v.numpy()
    return np.asarray(v, dtype=np.float64)


#: Constructor options that only set widths: read from the weights when not given.
WIDTH_OPTIONS = ("hidden_channels", "m", "n")


def _fits(comp, channels, opts, user_sd, key_map) -> bool | str:
    """True if the user's weights map onto refimpl's module built with ``opts``; else the
    reason (a string)."""
    try:
        map_params(user_sd, _reference(comp, channels, opts), key_map=key_map)
    except (KeyError, ValueError, TypeError) as err:
        return str(err)
    return True


def fit_widths(
    comp: Component,
    channels: int,
    options: dict[str, Any],
    user_sd: Mapping[str, Any],
    key_map: KeyMap | None,
) -> tuple[dict[str, Any], list[str]] | None:
    """``options`` completed with the widths (hidden width, A^2's m and n) that the
    user's weights have, where refimpl's defaults would not fit them; with a note. None if
    no widths make the weights fit. Widths the caller gave (``reduction``,
    ``hidden_channels``, ``m``, ``n``) are never replaced."""
    if _fits(comp, channels, options, user_sd, key_map) is True:
        return options, []
    accepted = inspect.signature(comp.module).parameters
    if "reduction" in options:  # a width the caller chose: check it, do not replace it
        return None
    free = [k for k in WIDTH_OPTIONS if k in accepted and k not in options]
    dims = sorted({d for v in _weights(user_sd).values() for d in _shape_of(v)})
    candidates: list[dict[str, Any]] = [{}]
    for k in free:
        candidates = [{**c, k: d} for c in candidates for d in dims]
    ambiguous = None
    for c in candidates if free else []:
        fits = _fits(comp, channels, {**options, **c}, user_sd, key_map)
        said = ", ".join(f"{k}={v}" for k, v in c.items())
        if fits is True:
            return {**options, **c}, [f"widths read from the weights: {said}"]
        if ambiguous is None and "(ambiguous)" in fits and "(missing)" not in fits:
            ambiguous = {**options, **c}
    if ambiguous is not None:  # the right widths, but the tensors need a key map
        return ambiguous, []
    return None


def fit_form(
    comp: Component,
    channels: int,
    options: dict[str, Any],
    user_sd: Mapping[str, Any],
    key_map: KeyMap | None,
) -> tuple[dict[str, Any], list[str], Variant | None]:
    """The form whose weights the user's state dict has: the requested ``options`` (widths
    read from the weights where needed), else the first catalogue variant whose key set
    and shapes it has. Returns (options, notes, the variant or None); the requested
    options unchanged if nothing fits (mapping them then raises a clear error)."""
    fitted = fit_widths(comp, channels, options, user_sd, key_map)
    if fitted is not None:
        opts, notes = fitted
        for v in comp.variants:  # a width rule of the catalogue (timm's rounding)
            v_opts = {**options, **v.options_for(channels)}
            if v.numpy_forward is None and v_opts != options and v_opts == opts:
                notes = [*notes, f"the widths are those of variant {v.name!r}"]
                return opts, notes, v
        return opts, notes, None
    for v in comp.variants:
        if v.numpy_forward is not None:
            continue
        try:
            fitted = fit_widths(
                comp, channels, {**options, **v.options_for(channels)}, user_sd, key_map
            )
        except (TypeError, ValueError):
            continue
        if fitted is not None:
            return fitted[0], fitted[1], v
    return options, [], None


# ---------------------------------------------------------------------------------------
# compare


class _Oracle:
    """The NumPy forward of a component (or of a variant) with fixed params and options."""

    def __init__(self, comp: Component, ref: nn.Module, params: dict, variant: Variant | None):
        self.forward = (variant.numpy_forward if variant else None) or comp.numpy_forward
        self.params = params
        self.options = oracle_options(comp, ref)

    def __call__(self, inputs: Sequence[np.ndarray], training: bool) -> np.ndarray:
        return np.asarray(self.forward(*inputs, self.params, training=training, **self.options))


def device_of(module: nn.Module) -> torch.device:
    """Where the module's tensors are (the CPU for a module without any)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _user_forward(module: nn.Module, inputs: Sequence[torch.Tensor], training: bool, dtype):
    m = copy.deepcopy(module).train(training)
    device = device_of(m)
    xs = [x.to(device=device, dtype=dtype).detach().requires_grad_(True) for x in inputs]
    out = _first(m(*xs))
    return out, xs


def _worst(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> tuple[float, str]:
    """max |a - e| / (atol + rtol |e|) and a description of where it is largest."""
    if actual.shape != expected.shape:
        return np.inf, f"output shape {actual.shape}, oracle {expected.shape}"
    if not np.isfinite(actual).all():
        return np.inf, f"{int((~np.isfinite(actual)).sum())} non-finite outputs"
    diff = np.abs(actual - expected)
    ratio = diff / (atol + rtol * np.abs(expected))
    i = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    where = tuple(int(j) for j in i)
    return float(ratio[i]), (
        f"max |diff| {diff.max():.2e}; worst at {where}: {actual[i]:.6g}, oracle {expected[i]:.6g}"
    )


#: The catalogue search adds one input whose sizes halve evenly down to 2x2 (16x16): code
#: that only works there (upsampling by a fixed factor 2) is compared on it.
SEARCH_CASES = (*COMPARE_CASES, ((1, 16, 16), (False,)))


def _case_inputs(comp: Component, channels: int, seed: int, cases=COMPARE_CASES):
    for k, ((n, h, w), modes) in enumerate(cases):
        yield (n, channels, h, w), modes, make_inputs(comp, (n, channels, h, w), seed + k)


def compare(
    module: nn.Module,
    name: str,
    *,
    key_map: KeyMap | None = None,
    converter: str | Callable | None = None,
    options: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float64,
    channels: int | None = None,
    seed: int = 0,
    max_combined: int = 3,
) -> Report:
    """Compare ``module`` with refimpl's NumPy oracle of component ``name``.

    The module's weights are given to the oracle (no weights of refimpl's), then both
    run on seeded inputs (odd and non-square, 1x1, batch 1; eval mode, and train mode
    where batch norm is defined): outputs, and input gradients checked against central
    differences of the oracle along random directions. When outputs differ, the paper's
    catalogue of known variants (``refimpl.registry.Variant``) is searched and the report
    names the variants the module matches instead, or says it matches none.

    Args:
        module: the implementation to check (copied; the original is not touched).
        name: the registered component it implements (``"cbam"``, ``"se"``, ...).
        key_map: refimpl key -> the module's key (a mapping; keys not in it keep their
            name), or a callable doing the same. Default: the same keys if the module has
            them, else matching by shapes in order (an ambiguous or impossible match is a
            ValueError listing the candidates).
        converter: the name of one of refimpl's converters for this paper
            (``"official"`` -> ``refimpl.<paper>.convert.convert_official_state_dict``) or a
            callable ``state_dict -> state_dict`` (or ``-> (state_dict, options)``).
        options: refimpl constructor options of the form the module is meant to implement
            (``{"reduction": 8}``, ``{"variant": "official"}``); they fix the oracle's
            key set and options.
        dtype: the module's computing dtype (float64 compares to ~1e-10, float32 to ~1e-5).
        channels: the input channel count (default: read from the module).
        seed: seed of the inputs, the gradient weights and directions.
        max_combined: how many catalogue variants the search combines at most (code
            often departs from the paper in several places at once).

    Returns:
        A :class:`~refimpl.testing.Report`; ``report.matches`` names the variants.
    """
    comp = get(name)
    options = dict(options or {})
    user_sd = dict(module.state_dict())
    module = copy.deepcopy(module).to(dtype)
    if converter is not None:
        user_sd, needed = _convert(comp, converter, user_sd)
        options = {**needed, **options}
    channels = channels or infer_channels(module, comp.n_inputs)
    options, fit_notes, form = fit_form(comp, channels, options, user_sd, key_map)
    ref = _reference(comp, channels, options)
    params, notes = map_params(user_sd, ref, key_map=key_map)
    notes = fit_notes + notes
    dtype_name = str(dtype).removeprefix("torch.")
    rtol, atol = comp.tolerances[dtype_name]
    report = Report(f"{type(module).__name__} against refimpl's {comp.name} oracle ({dtype_name})")
    for note in notes:
        report.add("weights", "note", note)
    if form is not None:
        said = f"{form.name}: {form.description} ({form.where})"
        changed = form.options_for(channels)
        if any(k not in WIDTH_OPTIONS for k in changed):  # another function, not a width
            report.add(
                "form",
                "failed",
                f"the weights do not fit the requested form; they fit variant {said}. The "
                f"rows below compare against it (to check that form: options={changed})",
            )
        else:
            report.matches.append(form.name)
            report.add("form", "note", f"widths of variant {said}")
    oracle = _Oracle(comp, ref, params, None)
    rng = np.random.default_rng(seed)
    output_failed = False
    for shape, modes, inputs in _case_inputs(comp, channels, seed):
        for training in modes:
            mode = "train" if training else "eval"
            if (why := _defined(ref, inputs, training)) is not None:
                report.add(f"{mode} {shape}", "skipped", f"not defined here: {why}")
                continue
            failed = _compare_case(report, module, oracle, inputs, training, dtype, rtol, atol, rng)
            output_failed |= failed
    if form is not None and not output_failed and form.name not in report.matches:
        report.matches.append(form.name)
    if output_failed:
        _search_catalogue(
            report, comp, module, user_sd, channels, options, key_map, dtype, max_combined
        )
    return report


def _compare_case(report, module, oracle, inputs, training, dtype, rtol, atol, rng) -> bool:
    """Output and input-gradient rows of one input in one mode; True if the output failed."""
    mode = "train" if training else "eval"
    shape = tuple(inputs[0].shape)
    try:
        out, xs = _user_forward(module, inputs, training, dtype)
    except Exception as err:
        report.add(f"output, {mode}, input {shape}", "failed", _raised(err))
        return True
    np_inputs = [x.detach().to(torch.float64).cpu().numpy() for x in xs]  # rounded inputs
    expected = oracle(np_inputs, training)
    actual = out.detach().to(torch.float64).cpu().numpy()
    worst, where = _worst(actual, expected, rtol, atol)
    ok = worst <= 1.0
    report.add(
        f"output, {mode}, input {shape}",
        "passed" if ok else "failed",
        f"{worst:.3g} of tolerance; {where}",
    )
    if not ok:
        return True
    # Input gradients: <w, J v> by central differences of the oracle, against <J^T w, v>.
    w = rng.standard_normal(actual.shape)
    grads = torch.autograd.grad(out, xs, torch.from_numpy(w).to(out), allow_unused=True)
    gtol = GRAD_RTOL.get(dtype, 2e-2)
    scale = FD_STEP * max(1.0, max(float(np.abs(x).max()) for x in np_inputs))

    def directional(v: list[np.ndarray], h: float) -> float:
        plus = oracle([x + h * d for x, d in zip(np_inputs, v, strict=True)], training)
        minus = oracle([x - h * d for x, d in zip(np_inputs, v, strict=True)], training)
        return float((w * (plus - minus)).sum() / (2 * h))

    worst_rel, detail, used, kinks = 0.0, "", 0, 0
    for _ in range(6):  # two smooth directions; a kink (max, ReLU, f2 near 0) is passed over
        if used == 2:
            break
        v = [rng.standard_normal(x.shape) for x in np_inputs]
        fd, fd_half = directional(v, scale), directional(v, scale / 4)
        if abs(fd - fd_half) > 0.1 * gtol * max(abs(fd), abs(fd_half), 1e-12):
            kinks += 1  # the oracle is not smooth enough along v for central differences
            continue
        used += 1
        an = sum(
            float((g.detach().double().cpu().numpy() * d).sum())
            for g, d in zip(grads, v, strict=True)
            if g is not None
        )
        rel = abs(fd - an) / max(abs(fd), abs(an), 1e-12)
        if rel >= worst_rel:
            worst_rel, detail = rel, f"directional derivative {an:.8g}, oracle {fd:.8g}"
    name = f"input gradient, {mode}, input {shape}"
    if not used:
        report.add(name, "skipped", f"the oracle has a kink along all {kinks} directions tried")
        return False
    report.add(
        name,
        "passed" if worst_rel <= gtol else "failed",
        f"relative error {worst_rel:.2e} (tolerance {gtol:g}); {detail}",
    )
    return False


def _raised(err: Exception) -> str:
    return f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def combine_variants(variants: Sequence[Variant], channels: int) -> Variant | None:
    """One variant doing all of ``variants`` at once (their options merged, at most one
    NumPy forward of their own), or None where they contradict each other."""
    options: dict[str, Any] = {}
    forwards = [v.numpy_forward for v in variants if v.numpy_forward is not None]
    if len(forwards) > 1:
        return None
    for v in variants:
        for k, value in v.options_for(channels).items():
            if k in options and options[k] != value:
                return None
            options[k] = value
    if len(variants) == 1:
        return variants[0]
    return Variant(
        name=" + ".join(v.name for v in variants),
        description="; ".join(v.description for v in variants),
        where="; ".join(dict.fromkeys(v.where for v in variants)),
        options=options,
        numpy_forward=forwards[0] if forwards else None,
        batch_coupled=any(v.batch_coupled for v in variants),
    )


def _redundant(group: Sequence[Variant], combined: Variant, channels: int) -> bool:
    """Whether one member of ``group`` already does what the combination does."""
    merged = combined.options_for(channels)
    return any(
        v.options_for(channels) == merged and v.numpy_forward is combined.numpy_forward
        for v in group
    )


def _search_catalogue(
    report, comp, module, user_sd, channels, options, key_map, dtype, max_combined
) -> None:
    """Rows naming the catalogue variants whose oracle the module matches (eval mode):
    single variants first, then pairs, ... up to ``max_combined`` at once; the search
    stops at the first size that matches."""
    dtype_name = str(dtype).removeprefix("torch.")
    rtol, atol = comp.tolerances[dtype_name]
    matched: list[Variant] = []
    for size in range(1, max_combined + 1):
        for group in itertools.combinations(comp.variants, size):
            variant = combine_variants(group, channels)
            if variant is None or (size > 1 and _redundant(group, variant, channels)):
                continue
            try:
                opts = {**options, **variant.options_for(channels)}
                ref = _reference(comp, channels, opts)
                params, _ = map_params(user_sd, ref, key_map=key_map, strict=False)
            except (KeyError, ValueError, TypeError):
                continue  # the module's weights cannot be this variant's
            oracle = _Oracle(comp, ref, params, variant)
            if _variant_matches(comp, module, oracle, ref, channels, dtype, rtol, atol):
                matched.append(variant)
        if matched:
            break
    if matched:
        for v in matched:
            report.matches.append(v.name)
            report.add("matches", "note", f"{v.name}: {v.description} ({v.where})")
    else:
        names = ", ".join(v.name for v in comp.variants) or "none catalogued"
        report.add(
            "matches",
            "note",
            f"no known variant of {comp.name}, nor up to {max_combined} of them combined "
            f"(searched: {names})",
        )


def _variant_matches(comp, module, oracle, ref, channels, dtype, rtol, atol) -> bool:
    """Whether the module computes the variant's oracle on every input where both run
    (eval mode), on one input at least. Where the variant is not defined the module must
    fail too (the official BAM pooling); where the module alone fails (code built for one
    input size), the input is passed over."""
    tried = 0
    for _shape, _modes, inputs in _case_inputs(comp, channels, 1000, SEARCH_CASES):
        ref_out, why = _run_reference(ref, inputs, False)
        if why is not None:
            continue
        want = tuple(ref_out.shape)
        np_inputs = [x.to(dtype).double().numpy() for x in inputs]
        try:
            expected = oracle(np_inputs, False)
        except ValueError:
            expected = None
        try:
            with torch.no_grad():
                m = copy.deepcopy(module).eval()
                out = _first(m(*[x.to(device=device_of(m), dtype=dtype) for x in inputs]))
            actual = out.detach().double().cpu().numpy()
        except Exception:
            actual = None
        if actual is not None and actual.shape != want:
            actual = None  # a wrong shape is a failure of the module's, as an exception is
        if expected is None and actual is None:
            continue
        if expected is None:
            return False
        if actual is None or actual.shape != expected.shape:
            continue  # code built for one input size fails on others: compare where it runs
        worst, _ = _worst(actual, expected, rtol, atol)
        if worst > 1.0:
            return False
        tried += 1
    return tried > 0
