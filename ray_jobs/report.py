"""The pipeline's report folder: report.md, report.html, quality-vs-NFE and loss-curve PNGs, video grids."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["plot_quality_vs_nfe", "plot_loss_curves", "write_report"]

_COLUMNS = [("variant", "variant"), ("nfe", "NFE"), ("seconds", "seconds (e2e)"), ("psnr", "PSNR dB"),
            ("ssim", "SSIM"), ("pose_error", "pose error px"), ("pck", "PCK@5%"), ("mouth_sync", "mouth sync r"),
            ("flicker", "flicker"), ("motion_error", "motion error")]
_PANELS = (("psnr", "PSNR (dB, higher is better)"), ("pose_error", "pose error (px, lower is better)"),
           ("mouth_sync", "mouth sync r (higher is better)"), ("flicker", "flicker (lower is better)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on workers or CI
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_nfe(table: list[dict[str, Any]], out_path: Path) -> Path:
    """PSNR, pose error, mouth sync and flicker against NFE (log x), one labelled point per variant.

    Model-free rows (0 NFE: ground truth, copy the reference, VAE round trip) are dashed horizontal
    lines; non-finite values (the ground truth's infinite PSNR, a NaN sync) are left out.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, _PANELS):
        for row in table:
            value = row.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if row["nfe"] == 0:
                ax.axhline(value, linestyle="--", linewidth=1, color="gray")
                ax.annotate(row["variant"], (0.01, value), xycoords=("axes fraction", "data"), fontsize=7,
                            xytext=(2, 2), textcoords="offset points")
                continue
            ax.scatter([row["nfe"]], [value])
            ax.annotate(row["variant"], (row["nfe"], value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_loss_curves(curves: dict[str, list[dict[str, Any]]], out_path: Path) -> Path:
    """Loss against step for each training run (metrics.jsonl rows)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        points = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _markdown_table(table: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(label for _, label in _COLUMNS) + " |"
    rule = "|" + "---|" * len(_COLUMNS)
    body = ["| " + " | ".join(_fmt(row.get(key, "")) for key, _ in _COLUMNS) + " |" for row in table]
    return "\n".join([head, rule, *body])


def _html_table(table: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(k, '')))}</td>" for k, _ in _COLUMNS) + "</tr>"
                   for row in table)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(folder: Path, title: str, table: list[dict[str, Any]], stages: list[dict[str, Any]],
                 images: dict[str, str], videos: dict[str, str], notes: list[str]) -> dict[str, Path]:
    """Write report.md and report.html (tables, stage times, images and videos by relative path)."""
    stage_lines = [f"- {s['stage']}: {s['status']} in {s['seconds']:.1f} s" for s in stages]
    md = [f"# {title}", "", "## Quality, NFE and latency (held-out clips)", "", _markdown_table(table), "",
          "## Stages", "", *stage_lines, "", "## Figures", ""]
    md += [f"![{name}]({path})" for name, path in images.items()]
    md += ["", "## Videos", ""] + [f"- [{name}]({path})" for name, path in videos.items()]
    md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>",
            f"<h1>{html.escape(title)}</h1><h2>Quality, NFE and latency (held-out clips)</h2>", _html_table(table),
            "<h2>Stages</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in stage_lines) + "</ul>",
            "<h2>Figures</h2>" + "".join(f"<figure><img src='{html.escape(p)}'><figcaption>{html.escape(n)}"
                                         "</figcaption></figure>" for n, p in images.items()),
            "<h2>Videos</h2>" + "".join(f"<h3>{html.escape(n)}</h3><video controls loop src='{html.escape(p)}'>"
                                        "</video>" for n, p in videos.items()),
            "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul></body></html>"]
    (folder / "report.html").write_text("\n".join(page))
    (folder / "results.json").write_text(json.dumps({"table": table, "stages": stages}, indent=2, default=float))
    return {"md": folder / "report.md", "html": folder / "report.html"}
