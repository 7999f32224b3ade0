"""ONNX export of every registered component and every network, run by onnxruntime.

Each component is exported once (float32, eval mode) with ``torch.onnx.export``, the
batch, height and width marked dynamic, at one size; onnxruntime then runs the file at
other sizes (odd, non-square, batch 1, 1x1) and its output must equal the NumPy oracle
within the component's float32 tolerance. A size baked into the graph as a constant (the
official CBAM/BAM code's ``avg_pool2d(x, x.size(2))``) either fails to run at another size
or computes something else there, so these runs are what proves the export dynamic; the
graph's inputs must also carry symbolic, not numeric, dimensions.

The exporter is torch's default since 2.9, ``dynamo=True`` (``torch.export`` then
onnxscript's translation; it needs the ``onnxscript`` package). The TorchScript exporter
(``dynamo=False``) is deprecated and cannot translate ``aten::mT`` (A^2-Nets' transposes).

Networks have no NumPy oracle: each is exported once at a small width and size and
checked against the PyTorch module at another size.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter's translation library

from refimpl.registry import components, random_input, randomize_, state_dict_numpy  # noqa: E402

NAMES = list(components())
EXPORT_SIZE = (2, 8, 6)  # N, H, W at export
#: Sizes onnxruntime runs at: odd, non-square, batch 1, one position; none is EXPORT_SIZE.
RUN_SIZES = [(3, 13, 9), (1, 7, 11), (2, 1, 1), (1, 1, 5)]


def export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    """``module`` to ONNX at ``path``, N, H and W of every input dynamic.

    ``Dim.AUTO`` lets ``torch.export`` keep a dimension symbolic and narrow its range where
    the code needs it (a ResNet needs H, W >= 33 for its last stage not to be 1x1, where
    broadcasting would differ); a dimension the code really fixes becomes a number, which
    :func:`assert_symbolic_inputs` and the runs at other sizes catch. (With ``Dim("H")``
    such range guards fail the strict export and the exporter retries non-strict, then as a
    draft: three traces instead of one.)
    """
    auto = torch.export.Dim.AUTO
    names = [f"x{i}" for i in range(len(inputs))]
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its steps
        torch.onnx.export(
            module,
            inputs,
            str(path),
            dynamo=True,
            input_names=names,
            output_names=["out"],
            dynamic_shapes=tuple({0: auto, 2: auto, 3: auto} for _ in inputs),
        )
    return path


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_symbolic_inputs(path: Path) -> None:
    """Every graph input is (N, C, H, W) with N, H, W named dimensions, C a number."""
    for value in onnx.load(str(path), load_external_data=False).graph.input:
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 4, value
        for axis in (0, 2, 3):
            assert dims[axis].dim_param and not dims[axis].HasField("dim_value"), (
                f"{value.name}: axis {axis} is fixed to {dims[axis].dim_value}, not dynamic"
            )
        assert dims[1].HasField("dim_value"), f"{value.name}: channels should be fixed"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple]:
    """``name -> (path, module, options)``: each component exported once per module."""
    out = tmp_path_factory.mktemp("onnx")
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            comp = components()[name]
            # The first example defined at every run size (Caffe pooling needs H, W >= 2^depth).
            example = next(
                e
                for e in map(comp.make_example, range(50))
                if e.module_options.get("pooling") != "caffe"
            )
            module = example.module.float().eval()
            n, h, w = EXPORT_SIZE
            inputs = tuple(
                random_input((n, x.shape[1], h, w), seed=i).float()
                for i, x in enumerate(example.inputs)
            )
            try:
                cache[name] = (export(module, inputs, out / f"{name}.onnx"), module, example)
            except Exception as e:  # noqa: BLE001 - every test of the component reports it
                cache[name] = e
        if isinstance(cache[name], Exception):
            e = cache[name]
            raise AssertionError(f"{name} does not export: {type(e).__name__}: {e}") from e
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_component_exports_with_dynamic_sizes(name: str, exported) -> None:
    path, _, _ = exported(name)
    assert_symbolic_inputs(path)


@pytest.mark.parametrize("size", RUN_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_onnxruntime_matches_numpy_oracle(name: str, size: tuple[int, int, int], exported):
    comp = components()[name]
    path, module, example = exported(name)
    n, h, w = size
    inputs = [
        random_input((n, x.shape[1], h, w), seed=10 + i).numpy()
        for i, x in enumerate(example.inputs)
    ]
    feeds = {f"x{i}": x.astype(np.float32) for i, x in enumerate(inputs)}
    (out,) = session(path).run(None, feeds)
    # The oracle reads the float32 weights and inputs the export saw, in float64.
    expected = comp.numpy_forward(
        *[x.astype(np.float32).astype(np.float64) for x in inputs],
        state_dict_numpy(module),
        training=False,
        **example.options,
    )
    assert out.shape == expected.shape, f"{name} at {size}: {out.shape} != {expected.shape}"
    rtol, atol = comp.tolerances["float32"]
    err = np.abs(out - expected) - (atol + rtol * np.abs(expected))
    where = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= 0, (
        f"{name} at {size}: |onnxruntime - numpy| exceeds {atol} + {rtol} |numpy| at {where}: "
        f"onnxruntime {out[where]:.8g}, numpy {expected[where]:.8g}"
    )


# ---------------------------------------------------------------------------------------
# Networks


def network_factories() -> dict[str, Callable[[], torch.nn.Module]]:
    """Every network class and arrangement, narrow and shallow, with 10 classes.

    The papers' 50-layer networks (``se_resnet50``, ``cbam_resnet50``, ``bam_resnet50``,
    ``a2_resnet50``, ``aff_resnet50``, ``iaff_resnet50``) are these classes with (3, 4, 6, 3)
    blocks: one block per stage runs the same code and exports in a fraction of the time
    (measured: ~35 s for a narrow 50-layer one, ~5 s with one block per stage).
    Attention-56 is already the smallest Residual Attention network (one module per stage);
    Attention-92 and the CIFAR variants differ in module counts and the stem (the CIFAR
    one is built with the shallowest mask branches, as it is here for its stem). The basic
    block is ResNet-18's and -34's (``refimpl.backbones.resnet(18, ...)``).
    """
    from refimpl.backbones import ResNet
    from refimpl.bam.networks import BAMResNet
    from refimpl.double_attention.networks import A2ResNet
    from refimpl.residual_attention.networks import attention56, attention56_cifar

    small = {"layers": (1, 1, 1, 1), "num_classes": 10, "widths": (8, 8, 16, 16)}
    ra = {"num_classes": 10, "widths": (16, 16, 32, 32), "stem_channels": 8}
    return {
        "se_resnet": lambda: ResNet(**small, attention="se", attention_options={"reduction": 4}),
        "cbam_resnet_basic": lambda: ResNet(
            **small, block="basic", attention="cbam", attention_options={"reduction": 4}
        ),
        "cbam_resnet": lambda: ResNet(
            **small, attention="cbam", attention_options={"reduction": 4}, layout="torchvision"
        ),
        "bam_resnet": lambda: BAMResNet(**small, reduction=4),
        "a2_resnet": lambda: A2ResNet(**small, positions=((2, 0), (3, 0))),
        "aff_resnet": lambda: ResNet(**small, fusion="aff", fusion_options={"reduction": 4}),
        "iaff_resnet": lambda: ResNet(**small, fusion="iaff", fusion_options={"reduction": 4}),
        "attention56": lambda: attention56(**ra),
        "attention56_cifar": lambda: attention56_cifar(**ra, depths=(1, 1, 1)),  # the stem
    }


NETWORKS = network_factories()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_exports_and_runs_at_another_size(name: str, tmp_path: Path) -> None:
    model = randomize_(NETWORKS[name](), seed=1).float().eval()
    path = export(model, (random_input((2, 3, 64, 48), seed=2).float(),), tmp_path / "net.onnx")
    assert_symbolic_inputs(path)
    x = random_input((3, 3, 77, 53), seed=3).float()  # odd, non-square, another batch
    (out,) = session(path).run(None, {"x0": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert out.shape == expected.shape
    # Both sides float32; their sums run in different orders through every layer, so
    # compare at the scale of the logits (measured: ~1e-6 of the largest).
    scale = np.abs(expected).max()
    err = np.abs(out - expected).max()
    assert err <= 1e-4 * scale, f"{name}: max |onnxruntime - torch| = {err:.3g}, scale {scale:.3g}"
