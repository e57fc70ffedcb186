"""``GET /evals/{id}/chart.png``: the scores per evaluator and model, and each head-to-head matrix."""

from __future__ import annotations

import io
from typing import Any


def render_chart(name: str, table: list[dict[str, Any]], matrices: list[dict[str, Any]]) -> bytes:
    # matplotlib costs ~1 s of start-up; only the chart route pays it.
    import matplotlib

    matplotlib.use("Agg")  # no display: render to bytes
    import matplotlib.pyplot as plt

    evaluators = list(dict.fromkeys(row["evaluator"] for row in table))
    panels = len(evaluators) + len(matrices)
    figure, axes = plt.subplots(1, max(panels, 1), figsize=(5 * max(panels, 1), 4), squeeze=False)
    for axis, evaluator in zip(axes[0], evaluators, strict=False):
        rows = [r for r in table if r["evaluator"] == evaluator]
        values = [r["score"] or 0.0 for r in rows]
        bars = axis.bar([r["model"] for r in rows], values, color="#4C72B0")
        axis.bar_label(bars, labels=[f"{v:.2f}" for v in values])
        kind = rows[0]["evaluatorType"] if rows else ""
        axis.set_title(f"{evaluator} ({'win rate' if kind == 'head_to_head' else 'mean score'})")
        axis.set_ylim(0, 1.05)
        axis.tick_params(axis="x", rotation=20)
    for axis, matrix in zip(axes[0][len(evaluators) :], matrices, strict=False):
        models = matrix["models"]
        grid = [
            [
                matrix["winRates"][a][b] if matrix["winRates"][a][b] is not None else float("nan")
                for b in models
            ]
            for a in models
        ]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
        axis.set_xticks(range(len(models)), models, rotation=20)
        axis.set_yticks(range(len(models)), models)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center")
        axis.set_title(f"{matrix['evaluator']}: row beats column")
        figure.colorbar(image, ax=axis)
    figure.suptitle(name)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
