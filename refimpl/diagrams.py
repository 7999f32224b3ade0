r"""Box-and-arrow diagrams for the tutorials, drawn with matplotlib alone (no torch).

Each tutorial lays out its paper's architecture in a few readable lines: boxes for
operations (each with the tensor shape it produces), circles for element-wise
operations (:math:`\otimes`, :math:`\oplus`, :math:`\sigma`), and arrows between them,
labelled with shapes where the shape is the point. This module only knows how to
draw those three things; where they go stays in the notebook.

    >>> d = Diagram(8, 3, title="SE block")
    >>> u = d.box(1, 1.5, "U", "C x H x W")
    >>> z = d.box(4, 1.5, "squeeze", "C x 1 x 1")
    >>> d.arrow(u, z)

Coordinates are in data units of a canvas ``width`` wide and ``height`` high, with
(0, 0) at the bottom left; one unit is drawn as ``scale`` inches, so text keeps its
size whatever the canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

__all__ = ["COLOURS", "Diagram", "Node"]

#: Fill colours by role, shared by every tutorial so that a reader learns them once.
COLOURS = {
    "tensor": "#e8eef7",  # a feature map
    "conv": "#cfe3c6",  # a learned layer (convolution, linear, batch norm)
    "pool": "#f6dfb8",  # pooling, reshaping, resampling: nothing learned
    "gate": "#f4c7c3",  # an activation that makes the attention map (sigmoid, softmax)
    "op": "#ffffff",  # an element-wise operation
    "note": "#f2f2f2",
}


@dataclass(frozen=True)
class Node:
    """A drawn box or circle: its centre, half-sizes and kind, for placing arrows.

    Attributes:
        x, y: centre, in canvas units.
        half_w, half_h: half the width and height (equal, the radius, for a circle).
        round: True for a circle.
    """

    x: float
    y: float
    half_w: float
    half_h: float
    round: bool = False

    def edge_towards(self, x: float, y: float) -> tuple[float, float]:
        """The point of the node's outline on the straight line to ``(x, y)``."""
        dx, dy = x - self.x, y - self.y
        if dx == 0 and dy == 0:
            raise ValueError(f"the point ({x}, {y}) is the node's own centre")
        if self.round:
            t = self.half_w / float(np.hypot(dx, dy))
        else:  # the rectangle's side that the ray leaves through
            t = min(
                self.half_w / abs(dx) if dx else np.inf, self.half_h / abs(dy) if dy else np.inf
            )
        return self.x + t * dx, self.y + t * dy

    @property
    def top(self) -> tuple[float, float]:
        return self.x, self.y + self.half_h

    @property
    def bottom(self) -> tuple[float, float]:
        return self.x, self.y - self.half_h

    @property
    def left(self) -> tuple[float, float]:
        return self.x - self.half_w, self.y

    @property
    def right(self) -> tuple[float, float]:
        return self.x + self.half_w, self.y


Point = Node | tuple[float, float]


def _centre(p: Point) -> tuple[float, float]:
    return (p.x, p.y) if isinstance(p, Node) else (float(p[0]), float(p[1]))


class Diagram:
    """A canvas for one architecture diagram.

    Args:
        width, height: the canvas in units (boxes are about 1.6 x 0.8 units by default).
        title: drawn above the canvas.
        scale: inches per unit; the figure is ``width * scale`` by ``height * scale``.
        ax: draw into this axes instead of a new figure (for side-by-side diagrams).
        fontsize: of the box labels; shapes and arrow labels are 1 pt smaller.
    """

    def __init__(
        self,
        width: float,
        height: float,
        *,
        title: str | None = None,
        scale: float = 0.75,
        ax: plt.Axes | None = None,
        fontsize: float = 10,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"Diagram needs a positive width and height; got {width} x {height}")
        if ax is None:
            _, ax = plt.subplots(figsize=(width * scale, height * scale))
        self.ax, self.fig, self.fontsize = ax, ax.figure, fontsize
        ax.set_xlim(0, width)
        ax.set_ylim(0, height)
        ax.set_aspect("equal")
        ax.axis("off")
        if title:
            ax.set_title(title, fontsize=fontsize + 1)

    def box(
        self,
        x: float,
        y: float,
        label: str,
        shape: str | None = None,
        *,
        kind: str = "tensor",
        w: float = 1.6,
        h: float = 0.8,
    ) -> Node:
        """A rounded box centred at ``(x, y)``: ``label`` in it, ``shape`` under the label.

        Args:
            label: what the box computes or holds (matplotlib mathtext allowed).
            shape: the tensor shape it produces, e.g. ``"C x H x W"``; drawn smaller.
            kind: a key of :data:`COLOURS`, or any matplotlib colour.
        """
        colour = COLOURS.get(kind, kind)
        self.ax.add_patch(
            FancyBboxPatch(
                (x - w / 2, y - h / 2),
                w,
                h,
                boxstyle="round,pad=0,rounding_size=0.12",
                facecolor=colour,
                edgecolor="#444444",
                linewidth=1.0,
            )
        )
        if shape is None:
            self.ax.text(x, y, label, ha="center", va="center", fontsize=self.fontsize)
        else:
            self.ax.text(x, y + 0.14 * h, label, ha="center", va="center", fontsize=self.fontsize)
            self.ax.text(
                x,
                y - 0.24 * h,
                shape,
                ha="center",
                va="center",
                fontsize=self.fontsize - 1,
                color="#333366",
                family="monospace",
            )
        return Node(x, y, w / 2, h / 2)

    def op(self, x: float, y: float, symbol: str, *, r: float = 0.25) -> Node:
        """A circle at ``(x, y)`` for an element-wise operation: ``"×"``, ``"+"``, ``"σ"``."""
        self.ax.add_patch(Circle((x, y), r, facecolor=COLOURS["op"], edgecolor="#444444"))
        self.ax.text(x, y, symbol, ha="center", va="center", fontsize=self.fontsize + 2)
        return Node(x, y, r, r, round=True)

    def arrow(
        self,
        start: Point,
        end: Point,
        label: str | None = None,
        *,
        via: Sequence[tuple[float, float]] = (),
        label_at: float = 0.5,
        label_side: str = "above",
        style: str = "-",
    ) -> list[tuple[float, float]]:
        """An arrow from ``start`` to ``end`` (nodes or points), bending at ``via``.

        The arrow leaves and enters a node at its outline. ``label`` (a tensor shape,
        say) is written beside the segment that holds the fraction ``label_at`` of the
        path's length, ``"above"``, ``"below"``, ``"left"`` or ``"right"`` of it.
        ``style`` is a matplotlib line style (``"--"`` for a skip connection).

        Returns:
            The points the arrow passes through, from its tail to its head.
        """
        if label_side not in ("above", "below", "left", "right"):
            raise ValueError(f"label_side must be above/below/left/right; got {label_side!r}")
        points = [_centre(start), *[(float(a), float(b)) for a, b in via], _centre(end)]
        if isinstance(start, Node):
            points[0] = start.edge_towards(*points[1])
        if isinstance(end, Node):
            points[-1] = end.edge_towards(*points[-2])
        line = dict(color="#333333", linewidth=1.2, linestyle=style)
        for a, b in zip(points[:-2], points[1:-1], strict=True):
            self.ax.plot([a[0], b[0]], [a[1], b[1]], solid_capstyle="butt", **line)
        self.ax.add_patch(
            FancyArrowPatch(
                points[-2],
                points[-1],
                arrowstyle="-|>",
                mutation_scale=12,
                shrinkA=0,
                shrinkB=1,
                **line,
            )
        )
        if label:
            self._label_path(points, label, label_at, label_side)
        return points

    def _label_path(self, points, label: str, at: float, side: str) -> None:
        pts = np.asarray(points)
        lengths = np.hypot(*np.diff(pts, axis=0).T)
        target = at * lengths.sum()
        i = min(int(np.searchsorted(np.cumsum(lengths), target)), len(lengths) - 1)
        before = lengths[:i].sum()
        t = (target - before) / lengths[i] if lengths[i] else 0.0
        x, y = pts[i] + t * (pts[i + 1] - pts[i])
        offset = {"above": (0, 4), "below": (0, -4), "left": (-4, 0), "right": (4, 0)}[side]
        align = {
            "above": ("center", "bottom"),
            "below": ("center", "top"),
            "left": ("right", "center"),
            "right": ("left", "center"),
        }[side]
        self.ax.annotate(
            label,
            (x, y),
            xytext=offset,
            textcoords="offset points",
            ha=align[0],
            va=align[1],
            fontsize=self.fontsize - 1,
            color="#333366",
            family="monospace",
        )

    def text(self, x: float, y: float, text: str, **kwargs) -> None:
        """Free text at ``(x, y)`` (centred), e.g. a note on what a part computes."""
        kwargs = {"ha": "center", "va": "center", "fontsize": self.fontsize - 1, **kwargs}
        self.ax.text(x, y, text, **kwargs)

    def frame(self, x0: float, y0: float, x1: float, y1: float, label: str = "") -> None:
        """A dashed frame around a group of boxes, its label at the top left inside."""
        self.ax.add_patch(
            Rectangle(
                (x0, y0),
                x1 - x0,
                y1 - y0,
                fill=False,
                linestyle="--",
                edgecolor="#888888",
                linewidth=1.0,
            )
        )
        if label:
            self.ax.text(
                x0 + 0.1,
                y1 - 0.1,
                label,
                ha="left",
                va="top",
                fontsize=self.fontsize - 1,
                color="#555555",
                style="italic",
            )
