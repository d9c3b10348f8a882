"""Point labels that do not overlap one another, the points or the axes' edge (matplotlib, deterministic).

Each label tries a fixed list of positions around its point, nearest first, and takes the first whose box
(measured by the renderer) stays inside the axes and clear of every label placed before it, of every
point's marker and of the legend; when none is clear it takes the position with the least overlap. Same points,
same layout.
"""

from __future__ import annotations

# offsets in points from the point to the label's anchor, with the label's alignment there, nearest first
_POSITIONS = sorted(
    (
        (dx, dy, "left" if dx > 0 else "right" if dx < 0 else "center", "bottom" if dy > 0 else "top")
        for dx in (-120, -60, -7, 0, 7, 60, 120)
        for dy in (-100, -70, -45, -25, -9, 9, 25, 45, 70, 100)
        if abs(dx) > 0 or abs(dy) >= 9
    ),
    key=lambda p: (p[0] ** 2 + p[1] ** 2, p[0] < 0, p[1] < 0, p[0], p[1]),
)
MARKER_HALF = 6  # pixels of a point's marker counted as taken


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def text_box(annotation, renderer):
    """The box of an annotation's text alone (an annotation's own extent includes its arrow)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def place_labels(ax, points: list[tuple[float, float]], texts: list[str], *, fontsize: float = 8, renderer=None):
    """Annotate each (x, y) in data coordinates with its text; returns the annotations."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    if renderer is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        renderer = (fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)).get_renderer()
    frame = ax.get_window_extent(renderer)
    to_pixels = ax.transData.transform
    markers = []
    for x, y in points:
        px, py = to_pixels((x, y))
        markers.append(Bbox.from_extents(px - MARKER_HALF, py - MARKER_HALF, px + MARKER_HALF, py + MARKER_HALF))
    legend = ax.get_legend()
    if legend is not None:
        markers.append(legend.get_window_extent(renderer))
    placed, annotations = [], []
    for (x, y), text in zip(points, texts):
        best = None
        for dx, dy, ha, va in _POSITIONS:
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=fontsize,
                arrowprops=None,
            )
            box = text_box(ann, renderer)
            outside = (max(0, frame.x0 - box.x0) + max(0, box.x1 - frame.x1)) * box.height + (
                max(0, frame.y0 - box.y0) + max(0, box.y1 - frame.y1)
            ) * box.width
            cost = outside + sum(_overlap(box, other) for other in placed + markers)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box, (dx, dy))
            else:
                ann.remove()
            if cost == 0:
                break
        _, ann, box, (dx, dy) = best
        if abs(dx) > 7 or abs(dy) > 9:  # moved away from its point: a thin line shows which point it names
            ann.remove()
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ann.get_ha(),
                va=ann.get_va(),
                fontsize=fontsize,
                arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.6, "shrinkA": 0, "shrinkB": 4},
            )
        placed.append(box)
        annotations.append(ann)
    return annotations
