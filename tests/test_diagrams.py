"""refimpl.diagrams draws boxes, circles and arrows that meet at the outlines (Agg backend)."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from refimpl import diagrams  # noqa: E402
from refimpl.diagrams import Diagram, Node  # noqa: E402


def test_small_diagram_draws_and_saves() -> None:
    d = Diagram(6, 3, title="SE block")
    u = d.box(1, 1.5, "U", "C x H x W")
    z = d.box(4, 1.5, "squeeze", "C x 1 x 1", kind="pool")
    times = d.op(5.4, 1.5, "×")
    d.arrow(u, z, "C x H x W")
    d.arrow(z, times)
    d.arrow(u, times, via=[(1, 2.7), (5.4, 2.7)], style="--")
    d.frame(0.1, 0.5, 5.9, 2.9, "block")
    texts = [t.get_text() for t in d.ax.texts]
    assert {"U", "C x H x W", "squeeze", "C x 1 x 1", "×", "block"} <= set(texts)
    assert d.ax.get_title() == "SE block"
    buffer = io.BytesIO()
    d.fig.savefig(buffer, format="png", dpi=90)
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = d.fig.get_size_inches()
    assert (width, height) == pytest.approx((6 * 0.75, 3 * 0.75))
    plt.close(d.fig)


def test_arrow_meets_the_outlines() -> None:
    d = Diagram(6, 3)
    a = d.box(1, 1, "a", w=1.0, h=0.6)
    b = d.op(4, 1, "+", r=0.3)
    start, end = d.arrow(a, b)
    assert start == pytest.approx((1.5, 1.0))  # the box's right side
    assert end == pytest.approx((3.7, 1.0))  # the circle's left point
    tail, corner, head = d.arrow(a, b, via=[(1.0, 2.0)])  # up from the box, then to the circle
    assert tail == pytest.approx((1.0, 1.3)) and corner == (1.0, 2.0)
    assert np.hypot(head[0] - 4, head[1] - 1) == pytest.approx(0.3)
    plt.close(d.fig)


@given(
    dx=st.floats(-5, 5).filter(lambda v: abs(v) > 1e-3),
    dy=st.floats(-5, 5),
    hw=st.floats(0.1, 2),
    hh=st.floats(0.1, 2),
)
def test_edge_towards_lies_on_the_outline(dx: float, dy: float, hw: float, hh: float) -> None:
    box = Node(1.0, 2.0, hw, hh)
    x, y = box.edge_towards(1.0 + dx, 2.0 + dy)
    # on the rectangle: inside it, and on one of its sides
    assert abs(x - 1) <= hw + 1e-9 and abs(y - 2) <= hh + 1e-9
    assert np.isclose(abs(x - 1), hw) or np.isclose(abs(y - 2), hh)
    # on the ray towards the target
    assert np.isclose((x - 1) * dy, (y - 2) * dx, atol=1e-9)
    circle = Node(1.0, 2.0, hw, hw, round=True)
    cx, cy = circle.edge_towards(1.0 + dx, 2.0 + dy)
    assert np.isclose(np.hypot(cx - 1, cy - 2), hw)


def test_bad_input_says_what_came() -> None:
    with pytest.raises(ValueError, match="positive width"):
        Diagram(0, 3)
    d = Diagram(4, 2)
    a = d.box(1, 1, "a")
    with pytest.raises(ValueError, match="label_side"):
        d.arrow(a, (3, 1), "x", label_side="middle")
    with pytest.raises(ValueError, match="own centre"):
        a.edge_towards(1, 1)
    plt.close(d.fig)


def test_module_is_torch_free() -> None:
    tree = ast.parse(Path(diagrams.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    assert "torch" not in imported, imported
