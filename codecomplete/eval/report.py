"""`--report DIR`: the result as JSON, a Markdown summary and PNG plots (matplotlib, imported lazily)."""

from __future__ import annotations

import math
from pathlib import Path

from codecomplete.eval.runner import to_json

RATE_PREFIXES = ("pass@", "exact_match", "edit_similarity", "syntax_error_rate", "oracle_", "empty_rate")
MAX_LISTED_CASES = 15


def _rates(result: dict) -> dict[str, float]:
    return {k: v for k, v in result.items()
            if k.startswith(RATE_PREFIXES) and isinstance(v, float) and math.isfinite(v)}


def _plots(result: dict, out_dir: Path) -> list[str]:
    """PNG files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    rates = _rates(result)
    if rates:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(rates) + 1.2))
        names = list(rates)
        ax.barh(names, [rates[n] for n in names], color="#4c72b0")
        for y, name in enumerate(names):
            ax.text(min(rates[name] + 0.01, 0.92), y, f"{rates[name]:.3f}", va="center")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_title(result["benchmark"])
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=120)
        plt.close(fig)
        written.append("metrics.png")
    details = result.get("details", [])
    for key, label in (("latency_ms", "latency per request (ms)"), ("tokens_generated", "tokens generated per case"),
                       ("edit_similarity", "edit similarity of the top candidate")):
        values = [d[key] for d in details if isinstance(d.get(key), int | float)]
        if len(values) < 2 or not any(values):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(values, bins=min(40, max(5, len(values) // 5)), color="#55a868")
        ax.set_xlabel(label)
        ax.set_ylabel("cases")
        fig.tight_layout()
        name = f"{key}.png"
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "n/a"
    return str(value)


def markdown(result: dict, plots: list[str]) -> str:
    """The Markdown report: settings, metrics, plots, and the first misses."""
    lines = [f"# {result['benchmark']}", "", f"{result['cases']} cases.", "", "## Metrics", "", "| metric | value |", "|---|---|"]
    for key, value in result.items():
        if key not in ("benchmark", "settings", "cases", "details"):
            lines.append(f"| {key} | {_format(value)} |")
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    for key, value in result.get("settings", {}).items():
        lines.append(f"| {key} | {_format(value)} |".replace("\n", " "))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    else:
        lines += ["", "(No plots: install matplotlib, e.g. `pip install codecomplete[plot]`.)"]
    misses = [d for d in result.get("details", []) if d.get("passed") is False or d.get("exact_match") is False]
    if misses:
        lines += ["", f"## First misses ({len(misses)} in all)", ""]
        for d in misses[:MAX_LISTED_CASES]:
            lines.append(f"### {d['task_id']}")
            if "target" in d:
                lines += ["", "```", f"want: {d['target']}", f"got:  {d.get('completion')}", "```", ""]
            else:
                lines += ["", "```", str(d.get("completion") or "")[:1200], "```"]
                if d.get("failure"):
                    lines += ["", "```", str(d["failure"])[-400:], "```", ""]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: str | Path) -> Path:
    """Write results.json, report.md and the plots into out_dir; return the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(to_json(result) + "\n", encoding="utf-8")
    plots = _plots(result, out)
    path = out / "report.md"
    path.write_text(markdown(result, plots), encoding="utf-8")
    return path
