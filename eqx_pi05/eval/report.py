"""The research report's results table from several evaluation runs.

    python -m eqx_pi05.eval.report RUN_DIR... [--output results_table]

Reads each RUN_DIR/results.json and writes OUTPUT.md (variant | backbone | mechanism | SR |
evidence) and OUTPUT.png (success rate per variant, bars on a common 0-100 % scale).
"""

from __future__ import annotations

import json
import pathlib
from typing import Annotated

import tyro

from eqx_pi05.eval.results import format_rate


def load_row(run_dir: pathlib.Path) -> dict:
    path = pathlib.Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no results.json (is it an evaluate.py output directory?)")
    res = json.loads(path.read_text())
    total = res["total"]
    sr = format_rate(total["successes"], total["episodes"])
    if total["episodes"] < total["planned"]:
        sr += f", incomplete: {total['episodes']} of {total['planned']}"
    audit = res.get("audit", "")
    evidence = pathlib.Path(run_dir).resolve().name + (" · audit=pass" if "audit=pass" in audit else "")
    return {"variant": res.get("variant", "?"), "backbone": res.get("backbone", "?"),
            "mechanism": res.get("mechanism", "?"), "sr": sr, "success_rate": total["success_rate"],
            "evidence": evidence, "suite": res.get("suite", "?")}


def markdown(rows: list[dict]) -> str:
    suites = sorted({r["suite"] for r in rows})
    lines = [f"Results on {', '.join(suites)} (success rate over the evaluated episodes).", "",
             "| Variant | Backbone | Mechanism | SR | Eval evidence |", "|---|---|---|---:|---|"]
    lines += [f"| {r['variant']} | {r['backbone']} | {r['mechanism']} | {r['sr']} | {r['evidence']} |" for r in rows]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(9.0, 0.55 * len(rows) + 1.2))
    labels = [f"{r['variant']}\n{r['backbone']} · {r['mechanism']}" for r in rows][::-1]
    rates = [100 * (r["success_rate"] or 0.0) for r in rows][::-1]
    bars = ax.barh(labels, rates, color="#D97757")
    for bar, r in zip(bars, rows[::-1]):
        ax.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2, r["sr"], va="center", fontsize=8)
    ax.set(xlim=(0, 125), xlabel="success rate (%)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    run_dirs: Annotated[list[pathlib.Path], tyro.conf.Positional],
    output: pathlib.Path = pathlib.Path("results_table"),
) -> str:
    """Write OUTPUT.md and OUTPUT.png from the runs' results.json; print the markdown.

    Args:
        run_dirs: evaluate.py output directories, one table row each, in this order.
        output: path stem of the table files (OUTPUT.md, OUTPUT.png).
    """
    if not run_dirs:
        raise ValueError("report: expected at least one RUN_DIR")
    rows = [load_row(d) for d in run_dirs]
    text = markdown(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(text)
    bar_chart(rows, output.with_suffix(".png"))
    print(text)
    return text


if __name__ == "__main__":
    tyro.cli(main)
