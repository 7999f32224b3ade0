"""The oracle is strict: every NumPy forward takes exactly its module's state_dict() keys.

For every registered component, starting from ``state_dict_numpy(example.module)`` (which
must pass): a key removed, an extra key, a misspelled key, every key ``module.``-prefixed,
a key of the wrong shape, each raises a KeyError (missing, unexpected) or a ValueError
(shape) whose message names the FULL key, and the shapes where they matter (DESIGN.md,
"The oracle is strict"). The NumPy side also imports and runs with torch blocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refimpl.registry import Example, components, state_dict_numpy

COMPONENTS = components()
NAMES = list(COMPONENTS)
#: Optional groups selected by their keys (the docstrings say so), as {key: the other
#: keys of its group}: removing a key whose group has no other key present leaves the
#: params of a smaller, valid module.
ALONE = {
    "spatial_attention": {"conv.bias": ()},
    "cbam": {"spatial.conv.bias": ()},
    "double_attention": {"expand.weight": ("expand.bias",)},  # the output convolution
}
OPTIONAL_SUFFIX = ".num_batches_tracked"


@cache
def _example(name: str, seed: int) -> Example:
    return COMPONENTS[name].make_example(seed)


def params_of(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    return state_dict_numpy(_example(name, seed).module)


def run(name: str, params: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    ex = _example(name, seed)
    inputs = [x.detach().numpy() for x in ex.inputs]
    return COMPONENTS[name].numpy_forward(*inputs, params, training=False, **ex.options)


def sample_keys(params: dict[str, np.ndarray], limit: int = 12) -> list[str]:
    """The first and the last key, every bias, and an even spread of the rest."""
    keys = [k for k in params if not k.endswith(OPTIONAL_SUFFIX)]
    picked = {keys[0], keys[-1], *(k for k in keys if k.endswith(".bias"))}
    step = max(1, len(keys) // limit)
    picked.update(keys[::step])
    return [k for k in keys if k in picked]


def misspell(key: str) -> str:
    """``key`` with the last two letters of its last part swapped (``bias`` -> ``biss``...)."""
    head, _, last = key.rpartition(".")
    last = last[:-2] + last[-1] + last[-2] if last[-1] != last[-2] else last + "x"
    return f"{head}.{last}" if head else last


def without(params: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in params.items() if k != key}


def misshaped(value: np.ndarray) -> np.ndarray:
    """One more entry along the first axis (a 0-d value becomes shape (2,))."""
    value = np.asarray(value)
    if value.ndim == 0:
        return np.stack([value, value])
    return np.concatenate([value, value[:1]], axis=0)


def message(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------------------------------
# The contract: the module's own state dict passes, whatever the component


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_passes(name):
    out = run(name, params_of(name))
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("name", NAMES)
def test_num_batches_tracked_is_optional(name):
    params = params_of(name)
    tracked = [k for k in params if k.endswith(OPTIONAL_SUFFIX)]
    if not tracked:
        pytest.skip(f"{name} has no batch norm")
    full = run(name, params)
    np.testing.assert_array_equal(
        run(name, {k: v for k, v in params.items() if k not in tracked}), full
    )


# ---------------------------------------------------------------------------------------
# (a) a key removed


def check_missing(name: str, params: dict[str, np.ndarray], key: str, seed: int = 0) -> None:
    group = ALONE.get(name, {})
    if key in group and not any(k in params for k in group[key]):
        try:  # a whole optional group removed: the params of a smaller module
            run(name, without(params, key), seed)
        except ValueError as e:  # that smaller module may not fit the options
            assert "residual" in str(e), str(e)
        return
    with pytest.raises(KeyError) as excinfo:
        run(name, without(params, key), seed)
    assert f"missing '{key}'" in message(excinfo), message(excinfo)


@pytest.mark.parametrize("name", NAMES)
def test_each_key_removed(name):
    params = params_of(name)
    for key in sample_keys(params):
        check_missing(name, params, key)


# ---------------------------------------------------------------------------------------
# (b) an extra key, (c) a misspelled key, (d) the DataParallel prefix


@pytest.mark.parametrize("name", NAMES)
def test_an_extra_key(name):
    params = params_of(name)
    last = list(params)[-1]
    for extra in ("extra", last.rsplit(".", 1)[0] + ".extra" if "." in last else "x.extra"):
        with pytest.raises(KeyError) as excinfo:
            run(name, {**params, extra: np.zeros(3)})
        assert f"unexpected '{extra}' (shape (3,))" in message(excinfo), message(excinfo)


def check_misspelled(name: str, params: dict[str, np.ndarray], key: str, seed: int = 0) -> None:
    wrong = misspell(key)
    renamed = {(wrong if k == key else k): v for k, v in params.items()}
    with pytest.raises(KeyError) as excinfo:
        run(name, renamed, seed)
    text = message(excinfo)
    assert f"unexpected '{wrong}'" in text, text
    assert f"missing '{key}'" in text or f"did you mean '{key}'" in text, text


@pytest.mark.parametrize("name", NAMES)
def test_a_misspelled_key(name):
    params = params_of(name)
    for key in sample_keys(params, limit=6):
        check_misspelled(name, params, key)


@pytest.mark.parametrize("name", NAMES)
def test_module_prefix(name):
    params = params_of(name)
    with pytest.raises(KeyError) as excinfo:
        run(name, {f"module.{k}": v for k, v in params.items()})
    text = message(excinfo)
    assert "strip the 'module.' prefix" in text, text
    assert "unexpected 'module." in text, text


# ---------------------------------------------------------------------------------------
# (e) a key of the wrong shape


def check_misshaped(name: str, params: dict[str, np.ndarray], key: str, seed: int = 0) -> None:
    bad = misshaped(params[key])
    with pytest.raises(ValueError) as excinfo:
        run(name, {**params, key: bad}, seed)
    text = message(excinfo)
    assert f"'{key}'" in text and str(bad.shape) in text, text
    # the expected shape is named, or (a width read from this very key) where it came from
    assert str(np.shape(params[key])) in text or "widths read from" in text, text


@pytest.mark.parametrize("name", NAMES)
def test_a_misshaped_key(name):
    params = params_of(name)
    for key in sample_keys(params, limit=6):
        check_misshaped(name, params, key)


# ---------------------------------------------------------------------------------------
# Random components, keys and mutations; the two bugs this strictness fixed as examples


def seed_with(name: str, key: str) -> int:
    """The first example seed of ``name`` whose state dict has ``key``."""
    for seed in range(40):
        if key in params_of(name, seed):
            return seed
    raise AssertionError(f"no example of {name} in 40 seeds has {key}")


MUTATIONS = {"remove": check_missing, "misspell": check_misspelled, "misshape": check_misshaped}


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    seed=st.integers(0, 5),
    index=st.integers(0, 10**6),
    mutation=st.sampled_from(sorted(MUTATIONS)),
)
# A misspelled bias silently dropped the term before the oracle was strict.
@example(name="squeeze_excitation", seed=-1, index=-1, mutation="misspell")
@example(name="cbam", seed=-1, index=-1, mutation="misspell")
# A missing first weight of the mask branch silently skipped the units (depth read as 0).
@example(name="soft_mask_branch", seed=-1, index=-1, mutation="remove")
@example(name="attention_module", seed=-1, index=-1, mutation="remove")
def test_any_mutation_is_caught(name, seed, index, mutation):
    if seed < 0:  # the known bugs: a fixed key, in the first example that has it
        key = {
            "squeeze_excitation": "reduce.bias",
            "cbam": "channel.expand.bias",
            "soft_mask_branch": "down1.unit1.conv1.weight",
            "attention_module": "mask.down1.unit1.conv1.weight",
        }[name]
        seed = seed_with(name, key)
    params = params_of(name, seed)
    if seed >= 0 and index >= 0:
        keys = [k for k in params if not k.endswith(OPTIONAL_SUFFIX)]
        key = keys[index % len(keys)]
    MUTATIONS[mutation](name, params, key, seed)


# ---------------------------------------------------------------------------------------
# The NumPy side runs without torch


def test_numpy_side_runs_with_torch_blocked(tmp_path: Path):
    """Import numpy_functional and every numpy_forward, and run every component's forward
    on its example, in a subprocess where ``import torch`` fails; the outputs must equal
    the ones computed here."""
    cases = {}
    for i, name in enumerate(NAMES):
        ex = _example(name, 0)
        arrays = {f"param/{k}": v for k, v in params_of(name).items()}
        arrays |= {f"input/{j}": x.detach().numpy() for j, x in enumerate(ex.inputs)}
        np.savez(tmp_path / f"{i}.npz", **arrays)
        np.save(tmp_path / f"{i}.expected.npy", run(name, params_of(name)))
        forward = COMPONENTS[name].numpy_forward
        cases[str(i)] = [forward.__module__, forward.__name__, dict(ex.options)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = textwrap.dedent(
        """
        import importlib, json, sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        from pathlib import Path
        import numpy as np
        import refimpl.numpy_functional
        folder = Path(sys.argv[1])
        cases = json.loads((folder / "cases.json").read_text())
        for i, (module, function, options) in cases.items():
            forward = getattr(importlib.import_module(module), function)
            data = np.load(folder / f"{i}.npz")
            params = {k[6:]: data[k] for k in data.files if k.startswith("param/")}
            n_inputs = sum(k.startswith("input/") for k in data.files)
            inputs = [data[f"input/{j}"] for j in range(n_inputs)]
            out = forward(*inputs, params, training=False, **options)
            np.save(folder / f"{i}.got.npy", out)
        loaded = [m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v]
        assert not loaded, loaded
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for i in range(len(NAMES)):
        got = np.load(tmp_path / f"{i}.got.npy")
        np.testing.assert_array_equal(got, np.load(tmp_path / f"{i}.expected.npy"), NAMES[i])
