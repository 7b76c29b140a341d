"""Where GSPF's selected entries fall, per layer and module type (the paper claims they cluster
in the last blocks and the output projections: this measures it), and a heatmap of it."""

from __future__ import annotations

import torch

from tkllm_ray.sparse.selection import layer_of


def placement_table(indices: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict:
    """{"layers": [...], "types": [...], "count": [[selected]], "size": [[weights]], "share": [[count / size]]}.
    Modules outside the numbered blocks (e.g. lm_head) form a row named after themselves."""
    cells: dict[tuple[str, str], tuple[int, int]] = {}
    for name, shape in shapes.items():
        layer = layer_of(name)
        row = str(layer) if layer is not None else name.rsplit(".", 1)[-1]
        col = name.rsplit(".", 1)[-1]
        sel = int(indices[name].numel()) if name in indices else 0
        c, t = cells.get((row, col), (0, 0))
        cells[(row, col)] = (c + sel, t + shape.numel())
    rows = sorted({r for r, _ in cells}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
    cols = sorted({c for _, c in cells})
    count = [[cells.get((r, c), (0, 0))[0] for c in cols] for r in rows]
    size = [[cells.get((r, c), (0, 0))[1] for c in cols] for r in rows]
    share = [[(cells[(r, c)][0] / cells[(r, c)][1]) if (r, c) in cells else None for c in cols] for r in rows]
    return {"layers": rows, "types": cols, "count": count, "size": size, "share": share}


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


def pooled(tables: list[dict]) -> dict:
    """Tables of the same model (e.g. one per account) pooled: counts summed, shares averaged."""
    first = tables[0]
    n = len(tables)
    count = [[sum(t["count"][i][j] for t in tables) for j in range(len(first["types"]))]
             for i in range(len(first["layers"]))]
    share = [[None if first["share"][i][j] is None else sum(t["share"][i][j] for t in tables) / n
              for j in range(len(first["types"]))] for i in range(len(first["layers"]))]
    return {"layers": first["layers"], "types": first["types"], "count": count, "size": first["size"], "share": share}


def concentration(table: dict) -> dict:
    """The paper's claim in numbers: the share of selected entries in the final quarter of the
    blocks and per module type, each next to that part's share of the weights (what a uniform
    selection would give)."""
    total, weights = sum(map(sum, table["count"])), table["size"]
    all_w = sum(map(sum, weights))
    blocks = [i for i, name in enumerate(table["layers"]) if name.isdigit()]
    last = [i for i in blocks if int(table["layers"][i]) >= 0.75 * len(blocks)]

    def part(rows=None, col=None):
        rows = range(len(table["layers"])) if rows is None else rows
        cols = range(len(table["types"])) if col is None else [col]
        sel = sum(table["count"][i][j] for i in rows for j in cols)
        w = sum(weights[i][j] for i in rows for j in cols)
        return {"entries_share": sel / total if total else 0.0, "weights_share": w / all_w if all_w else 0.0}

    return {"final_quarter_blocks": part(rows=last),
            "by_type": {t: part(col=j) for j, t in enumerate(table["types"])}}
