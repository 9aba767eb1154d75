"""report.json, report.md and the figures of `memento probe` (comparable to the paper's Fig. 13 and
Table 3), with the paper's numbers beside ours."""

from __future__ import annotations

import json
from pathlib import Path

from memento.probe.baseline import given_total, nothing
from memento.probe.study import STAGES, StudyConfig, Ui, paths
from memento.toy.runner import StageRunner

# The paper's numbers (§6.2, App. A.4.2), as quoted in issue 14.
PAPER = {
    "toy_masked_last_layer": 0.262,
    "toy_masked_first_layer": 0.131,
    "toy_masked_plus1": 0.262,
    "toy_masked_plus2": 0.214,
    "toy_masked_plus7_over_chance": 1.3,
    "toy_masked_during_training": "flat 17-19% while task accuracy rises 77 -> 95%",
    "toy_masked_during_training_range": (0.17, 0.19),
    "toy_causal_control": 0.10,
    "qwen3_8b_direct": 0.652,
    "qwen3_8b_masked": 0.267,
    "qwen3_32b_direct": 0.712,
    "qwen3_32b_masked": 0.230,
    "aime24_memento": 0.661,
    "aime24_restart": 0.508,
}


def cell(results: dict, label: str, kind: str, cond: str, distance: int, layer: int) -> dict | None:
    for c in results.get(label, {}).get(kind, {}).get(cond, []):
        if c["distance"] == distance and c["layer"] == layer:
            return c
    return None


def pct(c: dict | None, interval: bool = True) -> str:
    if c is None:
        return "–"
    if not interval:
        return f"{100 * c['mean']:.1f}%"
    return f"{100 * c['mean']:.1f}% [{100 * c['low']:.1f}, {100 * c['high']:.1f}]"


def write_report(cfg: StudyConfig, stages: StageRunner, ui: Ui) -> dict:
    p = paths(cfg)
    probes = json.loads((p["results"] / "probes.json").read_text())
    patching = json.loads((p["results"] / "patching.json").read_text())
    ablation = json.loads((p["results"] / "ablation.json").read_text())
    demo_path = p["results"] / "ablation_demo.json"
    demo = json.loads(demo_path.read_text()) if demo_path.is_file() else None
    timings = {name: (stages.done(name) or {}).get("seconds") for name in STAGES}
    report = {
        "profile": cfg.settings.name,
        "seed": cfg.seed,
        "settings": json.loads(json.dumps(cfg.fingerprint()["profile"])),
        "baselines": {
            "chance": nothing().per_digit,
            "text_given_total": given_total().per_digit,
            "text_given_total_exact": given_total().exact,
        },  # fmt: skip
        "probes": probes,
        "patching": patching,
        "ablation": ablation,
        "ablation_demo": demo,
        "training": {name: stages.done(name) for name in ("stage1", "stage2", "control", "restart")},
        "timings_s": timings,
        "total_seconds": round(sum(t for t in timings.values() if t), 1),
        "paper": PAPER,
    }
    report["figures"] = write_figures(cfg.out, report)
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2))
    (cfg.out / "report.md").write_text(render_markdown(report))
    headline(ui, report)
    return report


def _layers(report: dict) -> int:
    return report["probes"]["layers"]


def headline(ui: Ui, report: dict) -> None:
    res, last = report["probes"]["results"], _layers(report) - 1
    for label in ("passcode", "digits"):
        c = cell(res, label, "mlp", "memento", 1, last)
        base = c["text_baseline"] if c else float("nan")
        ui.log(f"  {label}: masked probe +1 block, last layer {pct(c)} · text-only Bayes {100 * base:.1f}%")


def render_markdown(report: dict) -> str:
    res = report["probes"]["results"]
    layers = _layers(report)
    last = layers - 1
    s = report["settings"]
    lines = [
        f"# memento probe report ({report['profile']}, seed {report['seed']})",
        "",
        f"Probing toy: {s['layers']} layers, d={s['hidden']}; stage 1 {s['stage1_steps']} steps, stage 2 "
        f"{s['stage2_steps']} steps (batch {s['batch_size']}); {s['n_probe']} held-out probe problems with the "
        f"passcode in block {s['target']}; probes: MLP {tuple(s['probe_hidden'])} and linear, "
        f"{s['probe_seeds']} seeds on the main conditions; 95% bootstrap intervals over validation problems.",
        "",
        f"Baselines per digit: chance {100 * report['baselines']['chance']:.1f}%; majority class (most "
        f"frequent training value per digit, on validation) "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["probes"].get("majority", {}).items())
        + f"; text-only Bayes given the block's total (what the running sums reveal) "
        f"{100 * report['baselines']['text_given_total']:.2f}%.",
        "",
        "## Per distance (last layer, MLP probe)",
        "",
        "| distance | " + " | ".join(["passcode: masked", "direct", "restart_kv", "restart", "text-only",
                                      "digits: masked", "direct", "restart_kv", "restart", "text-only"]) + " |",
        "|---" * 11 + "|",
    ]  # fmt: skip
    for d in range(-s["target"], 10 - s["target"]):
        row = [f"{d:+d}"]
        for label in ("passcode", "digits"):
            m = cell(res, label, "mlp", "memento", d, last)
            row += [pct(m)]
            row += [
                pct(cell(res, label, "mlp", cond, d, last)) for cond in ("direct", "restart_kv", "restart")
            ]
            row += [f"{100 * m['text_baseline']:.1f}%" if m else "–"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Causal control (M1): digits of the last block, probed at earlier mementos (last layer, MLP):", "",
              "| distance | accuracy |", "|---|---|"]  # fmt: skip
    for d in range(-7, 0):
        lines.append(f"| {d:+d} | {pct(cell(res, 'digits_last', 'mlp', 'memento', d, last))} |")
    lines += ["", "## Per layer (+1 block past the target)", "",
              "| condition | label | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
              "|---|---|" + "---|" * layers]  # fmt: skip
    for cond in ("memento", "direct", "restart_kv", "restart", "untrained", "control", "restart_trained"):
        for label in ("passcode", "digits"):
            row = [cond, label] + [pct(cell(res, label, "mlp", cond, 1, layer)) for layer in range(layers)]
            lines.append("| " + " | ".join(row) + " |")
    for kind, name in (("linear", "memento, linear probe"), ("mlp-mean", "memento, mean-pooled tokens")):
        for label in ("passcode", "digits"):
            row = [name, label] + [pct(cell(res, label, kind, "memento", 1, i)) for i in range(layers)]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Selectivity (Hewitt & Liang): control task = random digits per passcode", "",
              "| probe | layer | passcode val | control val | selectivity | passcode train | control train |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in ("mlp", "linear"):
        for layer in range(layers):
            real = cell(res, "passcode", kind, "memento", 1, layer)
            ctrl = cell(res, "control", kind, "memento", 1, layer)
            if real and ctrl:
                lines.append(
                    f"| {kind} | {layer} | {pct(real, False)} | {pct(ctrl, False)} | "
                    f"{100 * (real['mean'] - ctrl['mean']):+.1f} pp | {100 * real['train']:.1f}% | {100 * ctrl['train']:.1f}% |"
                )
    lines += ["", "## Over training (+1 block, last layer; task accuracy sampled in memento mode)", "",
              "| stage-2 step | passcode masked | digits masked | task accuracy | well-formed | mementos correct | reads the memento |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["ablation"]["curve"]:
        cond = "memento" if row["step"] == s["stage2_steps"] else f"step-{row['step']}"
        lines.append(
            f"| {row['step']} | {pct(cell(res, 'passcode', 'mlp', cond, 1, last))} | "
            f"{pct(cell(res, 'digits', 'mlp', cond, 1, last))} | {pct(row['correct'])} | {pct(row['well_formed'])} | "
            f"{pct(row['mementos_correct'])} | {pct(row.get('reads_memento'))} |"
        )
    pt = report["patching"]
    lines += ["", f"## Use: patching block {s['target']}'s memento KV from A into B ({pt['pairs']} pairs, same memento text)",
              "", "| run | KL (all later tokens) | KL (later running-sum digits) | greedy sum digits changed | sum digits right (teacher forced) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for run in ("patched", "ablated"):
        r = pt[run]
        lines.append(
            f"| {run} | {r['kl_all']['mean']:.4f} [{r['kl_all']['low']:.4f}, {r['kl_all']['high']:.4f}] | "
            f"{r['kl_sums']['mean']:.4f} [{r['kl_sums']['low']:.4f}, {r['kl_sums']['high']:.4f}] | "
            f"{pct(r['changed_sums'])} | {pct(r['correct_sums'])} |"
        )
    lines += ["", "Probe readout of B's later mementos (digits probe trained on clean features, last layer):", "",
              "| run | distance | reads B's digits | reads A's digits |", "|---|---|---|---|"]  # fmt: skip
    for run in ("clean", "patched", "ablated"):
        rb = {(c["distance"], c["layer"]): c for c in pt["readout"][run]["recipient"]}
        ra = {(c["distance"], c["layer"]): c for c in pt["readout"][run]["donor"]}
        for d in (1, 2, 3):
            if (d, last) in rb:
                lines.append(f"| {run} | +{d} | {pct(rb[(d, last)])} | {pct(ra[(d, last)])} |")
    lines += ["", "## Restart ablation, sampled (probing toy)", "", _ablation_table(report["ablation"]), ""]
    for name, d in report["ablation"].get("vs_memento_model", {}).items():
        lines.append(
            f"* {name.replace('_', ' ')} (own semantics) vs the memento model (memento mode): accuracy "
            f"{100 * d['mean']:+.1f} pp [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        )
    if report["ablation_demo"]:
        dm = report["ablation_demo"]
        lines += ["", f"## Restart ablation on the demo model ({dm['problems']} problems x {dm['samples']} samples)",
                  "", _ablation_table({"memento_model": dm["modes"]})]  # fmt: skip
    lines += ["", "## Timings (s)", "", json.dumps(report["timings_s"]), "",
              "![per layer](fig_layers.png)", "", "![per distance](fig_distance.png)", "",
              "![over training](fig_training.png)", ""]  # fmt: skip
    return "\n".join(lines)


def _ablation_table(ablation: dict) -> str:
    rows = ["| model | mode | accuracy | well-formed | mementos correct | reads the memento | adds in a block | accuracy vs memento mode |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model in ("memento_model", "restart_model", "control_model"):
        for mode, r in ablation.get(model, {}).items():
            diff = r.get("vs_memento", {}).get("correct")
            d = (
                f"{100 * diff['mean']:+.1f} pp [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
                if diff
                else "–"
            )
            rows.append(
                f"| {model.replace('_model', '')} | {mode} | {pct(r['correct'])} | {pct(r['well_formed'])} | "
                f"{pct(r.get('mementos_correct'))} | {pct(r.get('reads_memento'))} | {pct(r.get('adds_in_block'))} | {d} |"
            )
    return "\n".join(rows)


def write_figures(out: Path, report: dict) -> dict[str, str]:
    """fig_layers.png, fig_distance.png (the paper's Fig. 13 panels), fig_training.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["probes"]["results"]
    layers = _layers(report)
    last = layers - 1
    target = report["settings"]["target"]
    styles = {"memento": ("#d62728", "masked (M3)"), "direct": ("#2ca02c", "direct (M2)"),
              "restart_kv": ("#1f77b4", "restart-recomputed (fair)"), "restart": ("#9467bd", "restart (today)"),
              "control": ("#8c564b", "full-attention model"), "untrained": ("#7f7f7f", "untrained model"),
              "restart_trained": ("#17becf", "trained with restart")}  # fmt: skip
    figures = {}

    def baselines(ax, label):
        ax.axhline(10, color="k", ls=":", lw=1, label="chance")
        if label == "digits":
            ax.axhline(
                100 * report["baselines"]["text_given_total"],
                color="k",
                ls="--",
                lw=1,
                label="text-only Bayes",
            )

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, label in zip(axes, ("passcode", "digits"), strict=True):
        for cond, (color, name) in styles.items():
            cells = [cell(res, label, "mlp", cond, 1, i) for i in range(layers)]
            if all(c is None for c in cells):
                continue
            xs = [i for i, c in enumerate(cells) if c]
            ys = [100 * c["mean"] for c in cells if c]
            err = [
                [100 * (c["mean"] - c["low"]) for c in cells if c],
                [100 * (c["high"] - c["mean"]) for c in cells if c],
            ]
            ax.errorbar(xs, ys, yerr=err, color=color, marker="o", ms=3, lw=1.2, capsize=2, label=name)
        baselines(ax, label)
        ax.plot([0, layers - 1], [100 * PAPER["toy_masked_first_layer"], 100 * PAPER["toy_masked_last_layer"]],
                "kx", ms=7, label="paper's toy, masked (first / last layer)")  # fmt: skip
        ax.set_ylim(0, 40)
        ax.set_title(f"{label}: one block past the target, per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("probe accuracy per digit (%)")
        ax.set_xticks(range(layers))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, frameon=False, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "fig_layers.png")
    plt.close(fig)
    figures["layers"] = str(out / "fig_layers.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, label in zip(axes, ("passcode", "digits"), strict=True):
        for cond in ("memento", "direct", "restart_kv", "restart"):
            color, name = styles[cond]
            cells = [c for c in res[label]["mlp"].get(cond, []) if c["layer"] == last]
            cells.sort(key=lambda c: c["distance"])
            if cond == "direct":
                cells = [c for c in cells if c["distance"] >= 1]
            xs = [c["distance"] for c in cells]
            ys = [100 * c["mean"] for c in cells]
            err = [
                [100 * (c["mean"] - c["low"]) for c in cells],
                [100 * (c["high"] - c["mean"]) for c in cells],
            ]
            ax.errorbar(xs, ys, yerr=err, color=color, marker="o", ms=3, lw=1.2, capsize=2, label=name)
        if label == "digits":
            m1 = [c for c in res["digits_last"]["mlp"]["memento"] if c["layer"] == last and c["distance"] < 0]
            m1.sort(key=lambda c: c["distance"])
            ax.errorbar([c["distance"] for c in m1], [100 * c["mean"] for c in m1],
                        yerr=[[100 * (c["mean"] - c["low"]) for c in m1], [100 * (c["high"] - c["mean"]) for c in m1]],
                        color="#ff7f0e", marker="s", ms=3, lw=1.2, capsize=2, label="causal control (M1)")  # fmt: skip
        baselines(ax, label)
        paper = [(1, PAPER["toy_masked_plus1"]), (2, PAPER["toy_masked_plus2"]),
                 (7, 0.1 * PAPER["toy_masked_plus7_over_chance"])]  # fmt: skip
        ax.plot([d for d, _ in paper], [100 * v for _, v in paper], "kx", ms=7, label="paper's toy, masked")
        ax.set_title(f"{label}: last layer, per distance from block {target}")
        ax.set_xlabel("blocks after the target (negative: before)")
        ax.set_ylabel("probe accuracy per digit (%)")
        ax.set_ylim(0, 45)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, frameon=False, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "fig_distance.png")
    plt.close(fig)
    figures["distance"] = str(out / "fig_distance.png")

    curve = report["ablation"]["curve"]
    steps = [row["step"] for row in curve]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    for label, color in (("passcode", "#d62728"), ("digits", "#ff7f0e")):
        cells = [
            cell(
                res,
                label,
                "mlp",
                "memento" if step == report["settings"]["stage2_steps"] else f"step-{step}",
                1,
                last,
            )
            for step in steps
        ]
        ys = [100 * c["mean"] if c else float("nan") for c in cells]
        err = [
            [100 * (c["mean"] - c["low"]) if c else 0 for c in cells],
            [100 * (c["high"] - c["mean"]) if c else 0 for c in cells],
        ]
        ax.errorbar(
            steps,
            ys,
            yerr=err,
            fmt="o-",
            color=color,
            capsize=2,
            label=f"masked probe, {label} (+1, last layer)",
        )
    ax.axhline(10, color="k", ls=":", lw=1, label="chance")
    ax.axhline(
        100 * report["baselines"]["text_given_total"],
        color="k",
        ls="--",
        lw=1,
        label="text-only Bayes (digits)",
    )
    low, high = PAPER["toy_masked_during_training_range"]
    ax.errorbar([steps[-1]], [50 * (low + high)], yerr=[50 * (high - low)], fmt="kx", ms=7, capsize=3,
                label="paper's toy: flat 17-19%")  # fmt: skip
    ax.set_ylim(0, 30)
    ax.set_xlabel("stage-2 step (0 = end of stage 1)")
    ax.set_ylabel("probe accuracy (%)")
    ax2 = ax.twinx()
    task = [row["correct"] for row in curve]
    ax2.errorbar(
        steps,
        [100 * c["mean"] for c in task],
        yerr=[[100 * (c["mean"] - c["low"]) for c in task], [100 * (c["high"] - c["mean"]) for c in task]],
        fmt="s--",
        color="#1f77b4",
        capsize=2,
        label="task accuracy (sampled, memento mode)",
    )
    ax2.set_ylabel("task accuracy (%)")
    ax2.set_ylim(0, 100)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "fig_training.png")
    plt.close(fig)
    figures["training"] = str(out / "fig_training.png")
    return figures
