"""Reward vs diversity across alpha on the embedded toy task, on CPU, from one command.

The toy task (copy a 3-set in any order) has 3! = 6 correct answers per prompt, so coverage is
measurable: after short APO runs with a fixed alpha (and one with the schedule), each final
policy draws k = 8 samples at T = 1 for 64 held-out prompts, and we count the distinct correct
answers per prompt (`ToyTask.answer_rank`) next to the reward.

    python -m experiments.toy_alpha_study --workdir runs/alpha_study [--steps 300] [--seeds 0,1]

Writes <workdir>/summary.json and <workdir>/alpha_study.png; one run per arm and seed under
<workdir>/<arm>_s<seed> (an existing finished run is reused). As a config file, one arm:
--config=experiments/toy_alpha_study.py:0.5 (or :scheduled; add ,debug for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from configs import base, toy
from experiments import apo_alpha_ablation

ARMS = ("0.35", "0.5", "0.9", "1.0", "scheduled")
EVAL_KEYS = (  # final held-out metrics summarised per arm
    "eval/sample_reward_mean",
    "eval/avg@8",
    "eval/pass@8",
    "eval/accuracy",
    "eval/distinct_correct_answers",
    "eval/distinct_completions",
    "eval/entropy",
)


def get_config(arg=None):
    c = toy.get_config()
    alpha = apo_alpha_ablation.parse_alpha(arg)
    if alpha is not None:
        c.schedule.mode = "fixed"
        c.schedule.alpha = alpha
    c.total_steps = 300
    c.eval.num_prompts = 64  # held-out prompts, k = group_size = 8 samples each
    c.eval.every_steps = 25
    c.checkpoint.every_steps = 0  # only the last step: short runs, reruns skip finished arms
    c.logging.tensorboard = c.logging.plots = c.logging.progress = False
    if arg and "debug" in arg.split(","):
        base.apply_debug(c)
    return c


def _run_arm(arm: str, seed: int, steps: int, workdir: str) -> list[dict]:
    from apo_jax.infra import metrics as metrics_lib
    from apo_jax.trainer import loop as train

    c = get_config(arm)
    c.seed, c.total_steps = seed, steps
    c.eval.every_steps = min(c.eval.every_steps, steps)
    train.run(c, workdir)
    return metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def summarise(runs: dict[str, list[list[dict]]]) -> dict:
    """Per arm: mean and std over seeds of the last evaluation and of the training reward over
    the last 20 steps."""
    out = {}
    for arm, seeds in runs.items():
        finals = [[x for x in lines if "eval/accuracy" in x][-1] for lines in seeds]
        train_r = [np.mean([x["reward/mean"] for x in lines[-20:]]) for lines in seeds]
        row = {"seeds": len(seeds), "train/reward_last20": _mean_std(train_r)}
        row.update({k: _mean_std([f[k] for f in finals]) for k in EVAL_KEYS})
        # Diversity among the prompts that were solved at all (pass@8 = fraction solved, as
        # n = k = 8): separates "finds fewer answers" from "solves fewer prompts".
        per_solved = [
            f["eval/distinct_correct_answers"] / max(f["eval/pass@8"], 1e-9) for f in finals
        ]
        row["distinct_per_solved_prompt"] = _mean_std(per_solved)
        row["alpha"] = [float(np.mean([x["schedule/alpha"] for x in lines])) for lines in seeds]
        out[arm] = row
    return out


def _mean_std(xs) -> dict:
    xs = np.asarray(xs, np.float64)
    return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0}


def plot(runs: dict, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2), dpi=100)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(runs)))
    scatter = (  # (axis, y metric, label): x is the held-out avg@8 in both
        (axes[0], "distinct_per_solved_prompt", "distinct correct answers per solved prompt"),
        (axes[1], "eval/distinct_completions", "distinct completions per prompt (of 8)"),
    )
    for (arm, seeds), color in zip(runs.items(), colors, strict=True):
        s, x = summary[arm], summary[arm]["eval/avg@8"]
        for ax, key, _ in scatter:
            y = s[key]
            ax.errorbar(
                x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", c=color, label=arm
            )
        for i, lines in enumerate(seeds):
            reward = np.convolve([x["reward/mean"] for x in lines], np.ones(10) / 10, "valid")
            steps = [x["step"] for x in lines][9:]  # trailing 10-step mean
            axes[2].plot(steps, reward, c=color, alpha=0.8, label=arm if i == 0 else None)
            key = "eval/distinct_correct_answers"
            ev = np.array([(x["step"], x[key]) for x in lines if key in x]).T
            axes[3].plot(*ev, "o-", c=color, ms=3, alpha=0.8)
    for ax, _, label in scatter:
        ax.set(xlabel="held-out avg@8 (fraction of samples correct)", ylabel=label)
    axes[0].set(title="reward vs coverage of the 6 correct answers", ylim=(0, 6.2))
    axes[1].set(title="reward vs diversity of all samples")
    axes[2].set(xlabel="step", ylabel="training reward (10-step mean)", title="training reward")
    axes[3].set(
        xlabel="step",
        ylabel="distinct correct answers / prompt (of 6)",
        title="held-out coverage during training",
    )
    for ax in axes[:3]:
        ax.legend(title="alpha", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/alpha_study")
    p.add_argument("--arms", default=",".join(ARMS), help="fixed alphas and/or 'scheduled'")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (one run per arm each)")
    p.add_argument("--steps", type=int, default=300, help="rollout steps per run")
    a = p.parse_args(argv)
    arms, seeds = a.arms.split(","), [int(s) for s in a.seeds.split(",")]
    runs = {
        arm: [_run_arm(arm, s, a.steps, os.path.join(a.workdir, f"{arm}_s{s}")) for s in seeds]
        for arm in arms
    }
    summary = summarise(runs)
    with open(os.path.join(a.workdir, "summary.json"), "w") as f:
        json.dump({"steps": a.steps, "seeds": seeds, "arms": summary}, f, indent=1)
    plot(runs, summary, os.path.join(a.workdir, "alpha_study.png"))
    for arm, s in summary.items():
        print(
            f"alpha={arm:>9}: train reward {s['train/reward_last20']['mean']:.3f}  "
            f"held-out avg@8 {s['eval/avg@8']['mean']:.3f}  pass@8 {s['eval/pass@8']['mean']:.3f}"
            f"  distinct correct {s['eval/distinct_correct_answers']['mean']:.2f}/6"
            f" ({s['distinct_per_solved_prompt']['mean']:.2f} per solved prompt)"
        )
    print(f"wrote {a.workdir}/summary.json and {a.workdir}/alpha_study.png")
    return summary


if __name__ == "__main__":
    main()
