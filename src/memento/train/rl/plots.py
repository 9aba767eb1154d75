"""`curves.png`: reward and accuracy, well-formedness, and peak KV against RL steps."""

from __future__ import annotations

from pathlib import Path


def plot_curves(path: Path, train: list[dict], evals: list[dict], title: str = "memento rl") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(11, 3.2), dpi=110)
    steps = [r["step"] for r in train]
    esteps = [r["step"] for r in evals]
    if train:
        a1.plot(steps, [r["reward"] for r in train], color="#1f77b4", lw=1, label="reward (rollouts)")
        a1.plot(steps, [r["accuracy"] for r in train], color="#ff7f0e", lw=1, label="accuracy (rollouts)")
        a2.plot(steps, [r["well_formed"] for r in train], color="#2ca02c", lw=1, label="rollouts")
        a3.plot(steps, [r["peak_kv"] for r in train], color="#d62728", lw=1, label="peak KV, rollouts")
        a3.plot(steps, [r["full_kv"] for r in train], color="#888888", lw=1, ls="--",
                label="full attention, same tokens")  # fmt: skip
    if evals:
        a1.plot(esteps, [r["accuracy"] for r in evals], "o-", color="#9467bd", lw=1.5, ms=3,
                label="accuracy (held-out, greedy)")  # fmt: skip
        a2.plot(
            esteps, [r["well_formed"] for r in evals], "o-", color="#9467bd", lw=1.5, ms=3, label="held-out"
        )
        a3.plot(esteps, [r["peak_kv"] for r in evals], "o-", color="#9467bd", lw=1.5, ms=3,
                label="peak KV, held-out")  # fmt: skip
    a1.set_ylim(-0.02, 1.02)
    a1.set_title("reward / accuracy", fontsize=9)
    a2.set_ylim(-0.02, 1.02)
    a2.set_title("well-formed", fontsize=9)
    a3.set_title("KV cache (tokens, mean per response)", fontsize=9)
    a3.set_ylim(bottom=0)
    for a in (a1, a2, a3):
        a.set_xlabel("RL step")
        a.grid(alpha=0.3)
        a.legend(frameon=False, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
