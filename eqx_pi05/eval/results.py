"""The run's record: `episodes.jsonl` (one finished episode a line, appended as it ends, so a
rerun skips what is done) and the summaries made from it (results.json, results.md, a bar chart)."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence

from eqx_pi05.eval.rollout import EpisodeResult
from eqx_pi05.eval.sim import Task

log = logging.getLogger(__name__)

EPISODES = "episodes.jsonl"


def episodes_per_task(n: int, num_tasks: int, trials_available: int) -> list[int]:
    """`n` episodes spread evenly over the tasks (500 over 10 → 50 each); the first `n % num_tasks`
    tasks get one more."""
    if n < 1 or num_tasks < 1:
        raise ValueError(f"n={n} episodes over {num_tasks} tasks: expected both >= 1")
    counts = [n // num_tasks + (i < n % num_tasks) for i in range(num_tasks)]
    if counts[0] > trials_available:
        raise ValueError(f"n={n} over {num_tasks} tasks needs {counts[0]} trials per task, but a task has only "
                         f"{trials_available} fixed initial states (at most n={trials_available * num_tasks})")
    return counts


def append_episode(out_dir: pathlib.Path, result: EpisodeResult) -> None:
    with open(pathlib.Path(out_dir) / EPISODES, "a") as f:
        f.write(json.dumps(dataclasses.asdict(result)) + "\n")
        f.flush()


def load_episodes(out_dir: pathlib.Path) -> list[EpisodeResult]:
    """Finished episodes; a last line cut short by a killed run is dropped (and rewritten away)."""
    path = pathlib.Path(out_dir) / EPISODES
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        log.warning("%s: dropping an unfinished last line %r (the run was killed while writing it)",
                    path, lines[-1][:80])
        lines = lines[:-1]
        path.write_text("".join(line + "\n" for line in lines))
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(EpisodeResult(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}:{number}: not an episode record ({e}): {line[:120]!r}") from None
    return out


def format_rate(successes: int, episodes: int) -> str:
    """`94.2% (471/500)`."""
    return f"{100 * successes / episodes:.1f}% ({successes}/{episodes})" if episodes else "n/a (0/0)"


def summarize(results: Sequence[EpisodeResult], tasks: Sequence[Task], planned: dict[int, int]) -> dict:
    """Per-task and total success over the planned episodes (task index -> trial count)."""
    by_task = {t.index: [r for r in results if r.task == t.index and r.trial < planned.get(t.index, 0)]
               for t in tasks}
    rows = []
    for task in tasks:
        done = by_task[task.index]
        wins = sum(r.success for r in done)
        rows.append({
            "task": task.index, "language": task.language, "successes": wins, "episodes": len(done),
            "planned": planned.get(task.index, 0), "success_rate": wins / len(done) if done else None,
            "text": format_rate(wins, len(done)) if planned.get(task.index, 0) else "not run",
        })
    wins = sum(r["successes"] for r in rows)
    total = sum(r["episodes"] for r in rows)
    errors = sum(r.error is not None for rs in by_task.values() for r in rs)
    return {
        "per_task": rows,
        "total": {"successes": wins, "episodes": total, "planned": sum(planned.values()),
                  "success_rate": wins / total if total else None, "text": format_rate(wins, total),
                  "episodes_with_sim_errors": errors},
    }


def markdown(summary: dict, header: dict) -> str:
    lines = [f"# LIBERO evaluation: {header.get('suite', '')}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| task | instruction | success |", "|---:|---|---:|"]
    lines += [f"| {r['task']} | {r['language']} | {r['text']} |" for r in summary["per_task"]]
    lines += [f"| **all** | | **{summary['total']['text']}** |", ""]
    if summary["total"]["episodes"] < summary["total"]["planned"]:
        lines.insert(2, f"**Incomplete: {summary['total']['episodes']} of {summary['total']['planned']} "
                        "planned episodes finished.**\n")
    return "\n".join(lines)


def chart(summary: dict, title: str):
    """Per-task success bars (a matplotlib Figure); a task with no episode says "not run" rather than
    drawing a 0 % bar, and the legend sits outside the axes, clear of the bar labels."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = summary["per_task"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 3.5), 4.0))
    bars = ax.bar([str(r["task"]) for r in rows], [100 * (r["success_rate"] or 0.0) for r in rows], color="#D97757")
    for bar, r in zip(bars, rows):
        x = bar.get_x() + bar.get_width() / 2
        if r["episodes"]:
            ax.text(x, bar.get_height() + 1, f"{r['successes']}/{r['episodes']}", ha="center", va="bottom", fontsize=8)
        else:
            ax.text(x, 2, "not run", ha="center", va="bottom", fontsize=8, rotation=90, color="#87867F")
    total = summary["total"]
    if total["success_rate"] is not None:
        ax.axhline(100 * total["success_rate"], color="#3D3D3A", ls="--", lw=1, label=f"all: {total['text']}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set(ylim=(0, 110), xlabel="task", ylabel="success rate (%)", title=title)
    fig.tight_layout()
    return fig


def bar_chart(summary: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = chart(summary, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir: pathlib.Path, summary: dict, header: dict) -> dict[str, pathlib.Path]:
    """results.json (header + summary), results.md and success_per_task.png in `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "success_per_task.png"}
    paths["json"].write_text(json.dumps({**header, **summary}, indent=2) + "\n")
    paths["md"].write_text(markdown(summary, header))
    bar_chart(summary, paths["png"], f"{header.get('variant', '')} {header.get('suite', '')}: "
                                     f"{summary['total']['text']}")
    return paths
