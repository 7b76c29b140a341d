"""Where GSPF's selected entries fall, per layer and module type (the paper claims they cluster
in the last blocks and the output projections: this measures it), and a heatmap of it."""

from __future__ import annotations

import re

import torch

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def placement_table(indices: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict:
    """{"layers": [...], "types": [...], "share": [[selected / module size]], "count": [[...]]}.
    Modules outside the numbered blocks (e.g. lm_head) form a row named after themselves."""
    cells: dict[tuple[str, str], tuple[int, int]] = {}
    for name, shape in shapes.items():
        m = _LAYER_RE.search(name)
        row = m.group(1) if m else name.rsplit(".", 1)[-1]
        col = name.rsplit(".", 1)[-1]
        sel = int(indices[name].numel()) if name in indices else 0
        c, t = cells.get((row, col), (0, 0))
        cells[(row, col)] = (c + sel, t + shape.numel())
    rows = sorted({r for r, _ in cells}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
    cols = sorted({c for _, c in cells})
    count = [[cells.get((r, c), (0, 0))[0] for c in cols] for r in rows]
    share = [[(cells[(r, c)][0] / cells[(r, c)][1]) if (r, c) in cells else None for c in cols] for r in rows]
    return {"layers": rows, "types": cols, "count": count, "share": share}


def heatmap_png(table: dict, title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else 100 * v for v in row] for row in table["share"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(table["types"]), 1.2 + 0.35 * len(table["layers"])))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(table["types"])), table["types"], rotation=45, ha="right")
    ax.set_yticks(range(len(table["layers"])), table["layers"])
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="% of the module's weights selected")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
