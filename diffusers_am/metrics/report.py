"""Writing evaluation results: JSON, a markdown table, PNG plots and sample grids.

``results`` is ``{"config": {...}, "models": {name: {metric: value}}}`` with flat metric names:
``reward/<name>`` (mean), ``reward/<name>/sem`` (standard error), ``diversity/<name>``,
``recall``, ``coverage``. The first model is the base.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..jsonio import write_json
from .grid import image_grid


def _fmt(value: Any, sem: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.4g}"
    return f"{text} ± {sem:.2g}" if sem is not None else text


def metric_columns(models: dict[str, dict[str, float]]) -> list[str]:
    """Metric names in display order: rewards, diversity, recall, coverage (no ``/sem`` columns)."""
    names: list[str] = []
    for metrics in models.values():
        names += [k for k in metrics if k not in names and not k.endswith("/sem")]
    order = {"reward": 0, "diversity": 1, "recall": 2, "coverage": 3}
    return sorted(names, key=lambda n: (order.get(n.split("/")[0], 4), names.index(n)))


def markdown_table(results: dict[str, Any]) -> str:
    """One row per model, one column per metric (rewards as mean ± s.e.)."""
    models = results["models"]
    cols = metric_columns(models)
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, metrics in models.items():
        cells = [_fmt(metrics.get(c), metrics.get(f"{c}/sem")) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], output_dir: str | Path, samples: dict[str, torch.Tensor] | None = None, nrow: int = 6) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.md``, ``plot_<metric>.png`` (one bar chart per metric),
    ``reward_vs_diversity.png`` and ``samples_<model>.png`` (titled with the model, a row per prompt labelled
    with it); returns the written paths by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["json"] = out / "metrics.json"
    write_json(written["json"], results)
    written["markdown"] = out / "metrics.md"
    written["markdown"].write_text(markdown_table(results))
    models = results["models"]
    names = list(models)
    cols = metric_columns(models)
    for col in cols:
        vals = [models[n].get(col, float("nan")) for n in names]
        errs = [models[n].get(f"{col}/sem", 0.0) for n in names]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.2))
        ax.bar(range(len(names)), [v if v is not None else float("nan") for v in vals], yerr=errs, color="#4c72b0", capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(col)
        fig.tight_layout()
        path = out / f"plot_{col.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[f"plot:{col}"] = path
    rewards = [c for c in cols if c.startswith("reward/")]
    diversities = [c for c in cols if c.startswith("diversity/")]
    if rewards and diversities:
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        for n in names:
            ax.scatter(models[n].get(diversities[0]), models[n].get(rewards[0]), label=n)
        ax.set_xlabel(diversities[0])
        ax.set_ylabel(rewards[0])
        ax.legend(fontsize=7)
        ax.set_title("reward vs diversity")
        fig.tight_layout()
        written["scatter"] = out / "reward_vs_diversity.png"
        fig.savefig(written["scatter"], dpi=100)
        plt.close(fig)
    prompts = results.get("config", {}).get("prompts")
    for name, imgs in (samples or {}).items():
        path = out / f"samples_{name}.png"
        rows = prompts if prompts and len(prompts) * nrow == len(imgs) else None  # a row per prompt
        image_grid(imgs.cpu(), nrow, row_labels=rows, title=name).save(path)
        written[f"samples:{name}"] = path
    return written
