"""`memento rl --demo`: CISPO on the toy task, from a deliberately under-trained MEMENTO model.

The start is the demo's own pipeline (`memento.toy.demo`: data, base, stage 1) with a Stage 2 cut
short, so the model writes well-formed blocks and mementos but gets only part of the held-out
problems right. `memento rl` then trains it with rollouts that evict (exact-answer reward plus
per-step credit from `chain_step_spans`), and the held-out problems of the demo are evaluated
greedily, with eviction, before, during and after.

Everything is budgeted in steps with seeds: `--seed` is the RL seed (prompt order and sampling);
the start checkpoint is built once with seed 0 and shared by every RL seed, so runs with different
seeds differ by RL alone. Re-running with the same `--out` resumes (finished start stages are
skipped, the RL run continues from its last checkpoint).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from memento.cpu_numerics import cpu_kernels
from memento.toy.demo.profiles import PROFILES as DEMO_PROFILES
from memento.toy.demo.profiles import Profile
from memento.toy.tasks import TRAIN, ChainTask


@dataclass(frozen=True)
class RLDemoProfile:
    """The start (a demo profile with a short Stage 2) and the RL run's settings."""

    name: str
    start: Profile
    n_prompts: int  # RL training problems (train split, never a held-out start state)
    prompt_min_steps: int
    prompt_max_steps: int
    n_eval: int  # held-out problems evaluated (the demo's test set, first n_eval)
    steps: int
    group_size: int
    prompts_per_step: int
    lr: float
    warmup_steps: int
    beta: float
    temperature: float
    eval_every: int
    micro_batch_size: int = 16
    step_weight: float = 0.0  # > 0: per-step credit from `chain_step_spans` (see docs/rl.md)
    scale_rewards: str = "group"
    max_new_tokens: int = 0  # 0: the demo's own limit (longest held-out solution + 25%)


# The start: the demo's pipeline as it stood when these runs were measured (pinned here, so later
# changes to the demo's own profiles do not move it), with Stage 2 cut from 430 to 250 steps.
START = Profile(
    "rl-start", digits=2, block_steps=2, max_steps=12, test_min_steps=10, test_max_steps=12,
    n_train=12000, n_test=200, layers=4, hidden=128, heads=4, kv_heads=2,
    base_steps=800, stage1_steps=300, stage2_steps=250,
)  # fmt: skip

PROFILES: dict[str, RLDemoProfile] = {
    "default": RLDemoProfile(
        "default", start=START, n_prompts=3000, prompt_min_steps=10, prompt_max_steps=12, n_eval=200,
        steps=20, group_size=4, prompts_per_step=64, lr=1e-4, warmup_steps=3, beta=0.001, temperature=0.3,
        eval_every=10, step_weight=1.0, scale_rewards="none", max_new_tokens=600,
    ),
    # Tests only: seconds; checks the plumbing, not the learning.
    "smoke": RLDemoProfile(
        "smoke", start=replace(DEMO_PROFILES["smoke"], name="rl-start-smoke"), n_prompts=16,
        prompt_min_steps=3, prompt_max_steps=3, n_eval=4, steps=2, group_size=2, prompts_per_step=2,
        lr=1e-3, warmup_steps=0, beta=0.001, temperature=1.0, eval_every=1, micro_batch_size=4, step_weight=1.0,
    ),
}  # fmt: skip


STEP_REWARD = "memento.toy.rl_demo:chain_step_spans"


def chain_step_spans(response: str, problem: str) -> list[tuple[int, int, float]]:
    """Step reward for `memento rl --step-reward memento.toy.rl_demo:chain_step_spans`: every
    step's pieces judged right or wrong (`ChainTask.step_spans`); none for other prompts."""
    head = problem.split(",", 1)[0].split()
    modulus = head[-1] if head and head[-1].isdigit() else ""
    if modulus[:1] != "1" or set(modulus[1:]) != {"0"}:
        return []
    task = ChainTask(digits=len(modulus) - 1)
    p = task.parse_prompt(problem)
    return task.step_spans(p, response) if p is not None else []


@dataclass(frozen=True)
class RLDemoConfig:
    out: Path
    seed: int = 0
    threads: int = 1
    profile: str = "default"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        object.__setattr__(self, "out", Path(self.out))

    @property
    def settings(self) -> RLDemoProfile:
        return PROFILES[self.profile]


def run_rl_demo(cfg: RLDemoConfig, log: Callable[[str], None] | None = None) -> dict:
    """Build (or reuse) the start, run RL for `cfg.seed`, and write `rl-seed{seed}/report.json`."""
    from memento.toy.demo import DemoConfig, run_demo
    from memento.toy.demo.data import read_test
    from memento.toy.demo.evaluate import max_new_tokens
    from memento.toy.runner import Ui, quiet_transformers
    from memento.train.rl import RLConfig, train_rl

    log = log or (lambda _msg: None)
    s = cfg.settings
    start_cfg = DemoConfig(out=cfg.out / "start", profile=s.start, seed=0, threads=cfg.threads)
    t0 = time.perf_counter()
    log(
        f"start checkpoint: demo stages data, base, stage1, stage2 ({s.start.stage2_steps} steps) in {start_cfg.out}"
    )
    run_demo(start_cfg, Ui(), only=("data", "base", "stage1", "stage2"))
    start_seconds = time.perf_counter() - t0
    start_model = start_cfg.paths.model("stage2")

    task = s.start.task
    prompts_dir = cfg.out / "prompts"
    prompts_dir.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = prompts_dir / "train.jsonl", prompts_dir / "eval.jsonl"
    problems = task.problems(
        s.n_prompts, split=TRAIN, seed=1, min_steps=s.prompt_min_steps, max_steps=s.prompt_max_steps
    )
    held_out = read_test(start_cfg.paths.test)[: s.n_eval]
    for path, items in ((train_file, problems), (eval_file, held_out)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            "".join(json.dumps({"problem": task.prompt(p), "answer": task.answer(p)}) + "\n" for p in items)
        )
        tmp.replace(path)
    from transformers import AutoTokenizer

    max_new = s.max_new_tokens or max_new_tokens(
        s.start, AutoTokenizer.from_pretrained(start_model), held_out
    )

    out = cfg.out / f"rl-seed{cfg.seed}"
    rl_cfg = RLConfig(
        model=str(start_model), prompts=str(train_file), output_dir=str(out), eval_prompts=str(eval_file),
        reward="exact", group_size=s.group_size, prompts_per_step=s.prompts_per_step, steps=s.steps, lr=s.lr,
        warmup_steps=s.warmup_steps, beta=s.beta, temperature=s.temperature, max_new_tokens=max_new,
        eval_every=s.eval_every, micro_batch_size=s.micro_batch_size, rollout_batch_size=64,
        step_reward=STEP_REWARD if s.step_weight else None, step_weight=s.step_weight or 1.0,
        scale_rewards=s.scale_rewards,
        save_steps=max(1, s.eval_every), seed=cfg.seed, threads=cfg.threads, resume="latest",
    )  # fmt: skip
    t1 = time.perf_counter()
    with quiet_transformers():
        result = train_rl(rl_cfg, log=log)
    rl_seconds = time.perf_counter() - t1
    first, last = result.evals[0], result.evals[-1]
    report = {
        "profile": s.name,
        "seed": cfg.seed,
        "cpu_kernels": cpu_kernels(),
        "settings": asdict(s),
        "start_model": str(start_model),
        "start_seconds_this_invocation": round(start_seconds, 1),
        "rl_seconds_this_invocation": round(rl_seconds, 1),
        "rl_seconds_total": round(sum(r["seconds"] for r in result.train) + sum(e["seconds"] for e in result.evals), 1),
        "held_out": {"n": len(held_out), "start": first, "end": last, "gain_points": 100 * (last["accuracy"] - first["accuracy"])},
        "evals": result.evals,
        "curves": str(out / "curves.png"),
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(
        f"held-out accuracy {first['accuracy']:.1%} -> {last['accuracy']:.1%} "
        f"({report['held_out']['gain_points']:+.1f} points) · peak KV {last['peak_kv']:.0f} vs full attention "
        f"{last['full_kv']:.0f} ({last['kv_reduction']:.2f}x lower) · well-formed {last['well_formed']:.1%} · "
        f"RL {report['rl_seconds_total'] / 60:.1f} min · {out / 'curves.png'}"
    )
    return report
