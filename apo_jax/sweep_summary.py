"""Aggregates a sweep directory DIR/<arm>/seed<k>/metrics.jsonl over seeds: DIR/summary.csv,
DIR/summary.md (mean, std, n, Student-t 95 % CI per arm; difference with a baseline arm, Welch
CI and p-value) and DIR/curves.png (mean curve ± 95 % CI band per arm). Reads metrics files
only, so it works on any set of training workdirs laid out that way."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re

import numpy as np
from scipy import stats

REWARD = "reward/mean"  # summarised as the mean over the last TAIL_FRAC of the steps
TAIL_FRAC = 0.1
LEVEL = 0.95  # confidence level of every interval
# Default metrics; {k} is the largest sample count the runs logged (avg@k / pass@k).
DEFAULT_METRICS = (
    REWARD,
    "eval/accuracy",
    "eval/avg@{k}",
    "eval/pass@{k}",
    "eval/distinct_correct_answers",  # distinct correct final answers per prompt
    "eval/distinct_correct",  # distinct correct completions per prompt (toy: orderings found)
    "eval/entropy",
)
CURVES = (  # (metric or fallbacks, panel title)
    ((REWARD,), "training reward"),
    (("eval/accuracy",), "held-out greedy accuracy"),
    (("policy/entropy", "eval/entropy"), "entropy (nats / token)"),
    (("schedule/alpha",), "alpha"),
)


def read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def _finished(run: str, lines: list[dict]) -> bool:
    """The run logged its config's final step (config.json is written at start-up)."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            total = json.load(f)["total_steps"]
    except (OSError, ValueError, KeyError):
        return True  # no config to tell: take the run as it is
    return lines[-1]["step"] >= total


def discover(workdir: str) -> tuple[dict[str, dict[int, list[dict]]], list[str]]:
    """({arm: {seed: metrics lines}} of the finished runs, in the sweep's arm order
    (DIR/sweep.json) else sorted; the unfinished runs' directories, left out)."""
    found: dict[str, dict[int, list[dict]]] = {}
    unfinished = []
    pattern = os.path.join(glob.escape(workdir), "*", "seed*", "metrics.jsonl")
    for path in sorted(glob.glob(pattern)):
        run = os.path.dirname(path)
        seed = re.fullmatch(r"seed(-?\d+)", os.path.basename(run))
        lines = read_lines(path)
        if not seed or not lines:
            continue
        if not _finished(run, lines):
            unfinished.append(run)
            continue
        arm = os.path.basename(os.path.dirname(run))
        found.setdefault(arm, {})[int(seed.group(1))] = lines
    order = []
    plan = os.path.join(workdir, "sweep.json")
    if os.path.exists(plan):
        with open(plan) as f:
            order = [a for a in json.load(f)["arms"] if a in found]
    order += sorted(a for a in found if a not in order)
    return {arm: dict(sorted(found[arm].items())) for arm in order}, unfinished


def trailing_mean(steps: np.ndarray, values: np.ndarray):
    """Mean over a trailing window of the last TAIL_FRAC of the steps (at least one)."""
    w = max(1, math.ceil(TAIL_FRAC * len(values)))
    return steps[w - 1 :], np.convolve(values, np.ones(w) / w, "valid")  # [n - w + 1]


def series(lines: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric; the training reward as its trailing-window mean."""
    points = [(x["step"], x[metric]) for x in lines if isinstance(x.get(metric), int | float)]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = (np.asarray(v, np.float64) for v in zip(*points, strict=True))
    return trailing_mean(steps, values) if metric == REWARD else (steps, values)


def run_values(lines: list[dict], metric: str) -> tuple[float, float]:
    """(final, best) of one run: the last value and the maximum over the run."""
    _, values = series(lines, metric)
    if not len(values):
        return math.nan, math.nan
    return float(values[-1]), float(values.max())


def _finite(x) -> np.ndarray:
    return np.asarray([v for v in x if not math.isnan(v)], np.float64)


def mean_ci(x) -> dict:
    """Mean, sample std, n and the Student-t 95 % interval mean ± t_{n-1} s / sqrt(n)."""
    x = _finite(x)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf((1 + LEVEL) / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "ci_lo": mean - half, "ci_hi": mean + half}


def welch(a, b) -> dict:
    """Difference of means a - b with its Welch 95 % interval and the Welch t-test p-value."""
    a, b = _finite(a), _finite(b)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    half = p = math.nan
    if len(a) > 1 and len(b) > 1:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        if va + vb == 0.0:  # both arms constant: no spread to test against
            half, p = 0.0, math.nan if diff == 0 else 0.0
        else:
            # Welch-Satterthwaite degrees of freedom.
            df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
            half = float(stats.t.ppf((1 + LEVEL) / 2, df) * math.sqrt(va + vb))
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return {"diff": diff, "diff_ci_lo": diff - half, "diff_ci_hi": diff + half, "diff_p": p}


def resolve_metrics(runs: dict, metrics: list[str] | None) -> list[str]:
    keys = {k for seeds in runs.values() for lines in seeds.values() for x in lines for k in x}
    ks = [int(m.group(1)) for k in keys if (m := re.fullmatch(r"eval/pass@(\d+)", k))]
    k = max(ks, default=1)
    wanted = [m.format(k=k) for m in (metrics or DEFAULT_METRICS)]
    if metrics is None:
        return [m for m in wanted if m in keys]
    if runs and (unknown := [m for m in wanted if m not in keys]):
        known = sorted(keys - {"step"})
        raise ValueError(
            f"--metrics: {', '.join(map(repr, unknown))} not logged by any finished run; "
            f"logged: {', '.join(known)}"
        )
    return wanted


def summarise(runs: dict, metrics: list[str], baseline: str | None) -> list[dict]:
    """One row per arm: per metric the final-value statistics, the best-value mean and std,
    and the comparison with the baseline arm."""
    if not runs:
        return []
    baseline = baseline or next(iter(runs))
    if baseline not in runs:
        raise ValueError(f"--baseline {baseline!r} is not an arm; arms: {', '.join(runs)}")
    values = {  # arm -> metric -> (finals [seeds], bests [seeds])
        arm: {
            m: list(zip(*(run_values(lines, m) for lines in seeds.values()), strict=True))
            for m in metrics
        }  # fmt: skip
        for arm, seeds in runs.items()
    }
    rows = []
    for arm, seeds in runs.items():
        row = {"arm": arm, "seeds": " ".join(map(str, seeds)), "baseline": baseline}
        for m in metrics:
            finals, bests = values[arm][m]
            best = mean_ci(bests)
            row.update({f"{m}:{k}": v for k, v in mean_ci(finals).items()})
            row.update({f"{m}:best_mean": best["mean"], f"{m}:best_std": best["std"]})
            row.update({f"{m}:{k}": v for k, v in welch(finals, values[baseline][m][0]).items()})
        rows.append(row)
    return rows


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _label(m: str) -> str:
    return f"training reward (last {TAIL_FRAC:.0%} of steps)" if m == REWARD else m


def markdown(rows: list[dict], metrics: list[str], workdir: str, unfinished=()) -> str:
    left_out = f"Left out, unfinished: {', '.join(unfinished)}.\n" if unfinished else ""
    if not rows:
        return f"# Sweep summary: {workdir}\n\nNo finished runs found. {left_out}"
    base = rows[0]["baseline"]

    def table(rows: list[dict], cell: str, with_n: bool = True) -> list[str]:
        """One line per row; `cell` formats a metric's "{m}:{stat}" columns by stat name."""
        head = " | ".join(["arm", *(["n"] if with_n else []), *map(_label, metrics)])
        out = [f"| {head} |", "|---" * (len(metrics) + 1 + with_n) + "|"]
        for r in rows:
            n = [str(max((r[f"{m}:n"] for m in metrics), default=0))] if with_n else []
            cells = [
                cell.format(
                    **{k[len(m) + 1 :]: _fmt(v) for k, v in r.items() if k.startswith(f"{m}:")}
                )
                for m in metrics
            ]
            out.append("| " + " | ".join([r["arm"], *n, *cells]) + " |")
        return out

    out = [
        f"# Sweep summary: {workdir}",
        "",
        f"Per arm over seeds: mean ± sample std [95 % CI, Student t with n - 1 dof], n = seeds. "
        f"Training reward: mean of `{REWARD}` over the last {TAIL_FRAC:.0%} of each run's steps; "
        "eval metrics: the run's last evaluation. Best: the run's maximum (training reward: "
        "of that trailing mean), mean ± std over seeds.",
        *([left_out] if unfinished else []),
        "",
        "## Final values",
        "",
        *table(rows, "{mean} ± {std} [{ci_lo}, {ci_hi}]"),
        "",
        "## Best values",
        "",
        *table(rows, "{best_mean} ± {best_std}"),
        "",
        f"## Difference with the baseline `{base}`",
        "",
        "Arm minus baseline, final values: difference [Welch 95 % CI], two-sided Welch t-test p.",
        "",
        *table(
            [r for r in rows if r["arm"] != base],
            "{diff} [{diff_ci_lo}, {diff_ci_hi}] p={diff_p}",
            with_n=False,
        ),
    ]
    return "\n".join(out) + "\n"


def _smoothed(steps: np.ndarray, values: np.ndarray, metric: str):
    """Per-step curves (entropy, alpha) get the reward's trailing window; sparse ones (evals)
    are drawn as logged."""
    if metric == REWARD or len(values) < 30:
        return steps, values
    return trailing_mean(steps, values)


def plot_curves(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4), dpi=100)
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(runs), 1)))
    for (arm, seeds), color in zip(runs.items(), colors, strict=False):
        for ax, (candidates, title) in zip(axes, CURVES, strict=True):
            metric = next(
                (m for m in candidates if any(len(series(x, m)[0]) for x in seeds.values())), None
            )
            if metric is None:
                continue
            curves = [_smoothed(*series(lines, metric), metric) for lines in seeds.values()]
            steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
            y = np.array([[dict(zip(s.tolist(), v, strict=True))[t] for t in steps]
                          for s, v in curves])  # fmt: skip  # [seeds, steps]
            mean = y.mean(0)  # [steps]
            ax.plot(steps, mean, c=color, label=arm, marker="o" if len(steps) < 30 else None)
            if len(y) > 1:
                half = stats.t.ppf((1 + LEVEL) / 2, len(y) - 1) * y.std(0, ddof=1) / len(y) ** 0.5
                ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.2)
            ax.set(title=f"{title}: {metric}", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title=f"mean ± {LEVEL:.0%} CI (t) over seeds")
    fig.suptitle(f"per-step metrics: trailing mean over {TAIL_FRAC:.0%} of the steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_summary(workdir: str, baseline: str | None = None, metrics: list[str] | None = None):
    """Writes DIR/summary.csv, DIR/summary.md and DIR/curves.png; returns the rows."""
    runs, unfinished = discover(workdir)
    names = resolve_metrics(runs, metrics)
    rows = summarise(runs, names, baseline)
    if rows:
        with open(os.path.join(workdir, "summary.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot_curves(runs, os.path.join(workdir, "curves.png"))
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(markdown(rows, names, workdir, unfinished))
    print(
        f"wrote {workdir}/summary.md, summary.csv, curves.png ({len(rows)} arms"
        f"{f', {len(unfinished)} unfinished runs left out' if unfinished else ''})"
    )
    return rows
