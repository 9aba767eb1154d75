"""The `memento rl` loop: roll out with eviction, score with the Stage-2 mask, update with CISPO.

One step: pick `prompts_per_step` prompts (a seeded permutation per epoch, so step N always sees the
same prompts), sample `group_size` responses to each with `memento.engine` (the policy's own
weights, eviction on, per-token sampling log-probs), reward them, turn rewards into group
advantages, then score the responses with one masked forward per micro-batch (policy with
gradient, old policy and reference without) and take `updates_per_step` optimizer steps.

Everything random derives from `seed` and the step number, and a checkpoint holds the weights and
the optimizer state, so a resumed run takes exactly the step the uninterrupted run would have.

The consistency guard: on the first step of every invocation and every `guard_every` steps, the
trainer's log-probs of the sampled tokens (before any update) are compared with the engine's; if
their mean absolute difference exceeds `guard_tol`, or one token's exceeds 100 x `guard_tol`, the
run stops before updating (the trainer
would be optimising a different distribution from the one that sampled).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memento.train.rl.checkpoint import checkpoints, load_state, resolve_resume, save_checkpoint
from memento.train.rl.cispo import cispo_loss
from memento.train.rl.config import RLConfig
from memento.train.rl.rewards import RewardModel, load_answer_reward, load_function
from memento.train.rl.rollouts import Rollout, collect, group_advantages, step_advantages
from memento.train.rl.scoring import build_batch, response_logprobs

RUN_FILE = "rl_config.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "rl_result.json"
# The guard's limit for a single token, as a multiple of --guard-tol (the limit for the mean): fp32
# rounding grows with length (max |Δ| 2e-5..6e-5 measured on 400-token toy responses, mean ~1e-7),
# while a forward that sees an evicted block is off by 1e-2..8 on the tokens after it.
TOKEN_TOL_FACTOR = 100


class GuardError(RuntimeError):
    """The trainer's log-probs do not reproduce the engine's on the same tokens."""


@dataclass
class RLResult:
    output_dir: str
    step: int
    resumed_from: str | None
    seconds: float
    train: list[dict] = field(default_factory=list)  # one record per step
    evals: list[dict] = field(default_factory=list)  # held-out evaluations (step 0 = the start)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_schedule(n_problems: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the prompts of `step` (1-based): consecutive slices of one seeded permutation
    per epoch, so every prompt is used once per epoch and step N never depends on earlier steps."""
    out = []
    for c in range((step - 1) * per_step, step * per_step):
        epoch, pos = divmod(c, n_problems)
        order = list(range(n_problems))
        random.Random(f"rl-prompts-{seed}-{epoch}").shuffle(order)
        out.append(order[pos])
    return out


def step_seed(seed: int, step: int) -> int:
    """The first sampling seed of a step; its prompts and samples count up from it."""
    return (seed * 1_000_003 + step * 100_003) % (2**31)


class RLTrainer:
    """Holds the policy, the frozen reference, the engine and the optimizer for one run."""

    def __init__(self, cfg: RLConfig, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda _msg: None)
        self.output_dir = Path(cfg.output_dir)
        # Everything a user can get wrong is checked before a model is loaded or a file written.
        from memento.eval.benchmarks import load_benchmark
        from memento.user_errors import check_device, check_input_file, check_model_dir, check_output_dir

        check_model_dir(cfg.model)
        check_input_file(cfg.prompts, "--prompts")
        if cfg.eval_prompts:
            check_input_file(cfg.eval_prompts, "--eval-prompts")
        check_output_dir(cfg.output_dir)
        check_device(cfg.device)
        try:
            self.problems = load_benchmark(cfg.prompts).problems
        except ValueError as exc:
            raise ValueError(f"--prompts: {exc}") from exc
        self.eval_problems = ()
        if cfg.eval_prompts:
            try:
                self.eval_problems = load_benchmark(cfg.eval_prompts, limit=cfg.eval_limit).problems
            except ValueError as exc:
                raise ValueError(f"--eval-prompts: {exc}") from exc
        self.reward = RewardModel(load_answer_reward(cfg.reward), cfg.format_reward)
        self.step_reward = load_function(cfg.step_reward, "--step-reward") if cfg.step_reward else None
        self.resume_from = resolve_resume(cfg.resume, self.output_dir)
        self._check_output_dir()

    # --- set-up -------------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        run_file = self.output_dir / RUN_FILE
        # A run stopped before its first checkpoint (a load failure, Ctrl-C) left nothing to resume:
        # it must not block the rerun; a run with checkpoints is never overwritten.
        if self.resume_from is None and run_file.is_file() and checkpoints(self.output_dir):
            raise ValueError(
                f"{self.output_dir} already holds an rl run ({run_file}); pass --resume latest to continue "
                "it or choose another --output-dir"
            )
        if self.resume_from is not None:
            diff = self.cfg.trajectory_diff(load_state(self.resume_from)["settings"])
            if diff:
                raise ValueError(
                    f"{self.resume_from} was made with other settings ({', '.join(diff)}); resume with the "
                    "same options (only steps, saving, evaluation and batching limits may change)"
                )

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from memento.engine import Engine
        from memento.tokens import MarkerIds, ensure_chat_template

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = torch.device(cfg.device)
        source = str(self.resume_from) if self.resume_from else cfg.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch.float32, attn_implementation="sdpa"
            ).to(device)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{source}: cannot load a causal LM + tokenizer: {exc}") from exc
        try:
            MarkerIds.from_tokenizer(tokenizer)
        except ValueError as exc:
            raise ValueError(
                f"--model {cfg.model}: {exc}; RL starts from a MEMENTO (Stage 2) checkpoint"
            ) from exc
        ensure_chat_template(tokenizer)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.use_cache = False
        self.model, self.tokenizer = model, tokenizer
        self.ref_model = None
        if cfg.beta > 0:
            ref = AutoModelForCausalLM.from_pretrained(
                cfg.model, dtype=torch.float32, attn_implementation="sdpa"
            )
            self.ref_model = ref.to(device).eval().requires_grad_(False)
        from memento.hf import AttentionSwap

        self.swap = AttentionSwap(model)
        self.ref_swap = AttentionSwap(self.ref_model) if self.ref_model is not None else None
        self.engine = Engine(
            model,
            tokenizer,
            mode=cfg.mode,
            masking=cfg.masking,
            kv_budget_tokens=cfg.kv_budget_tokens,
            max_batch_size=cfg.rollout_batch_size,
        )
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay,
        )
        self.prompt_ids = [self._encode(p.problem) for p in self.problems]
        self.eval_prompt_ids = [self._encode(p.problem) for p in self.eval_problems]

    def _encode(self, problem: str) -> list[int]:
        messages = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        messages.append({"role": "user", "content": problem})
        return self.engine.encode(self.engine.chat_prompt(messages))

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> RLResult:
        cfg = self.cfg
        started = time.perf_counter()
        self._load()
        train: list[dict] = []
        evals: list[dict] = []
        start = 0
        if self.resume_from is not None:
            state = load_state(self.resume_from)
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            train, evals, start = list(state["train"]), list(state["evals"]), int(state["step"])
            self.log(f"resumed from {self.resume_from} (step {start})")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / RUN_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
        self._rewrite_metrics(train, evals)
        if start == 0 and self.eval_problems:
            evals.append(self.evaluate(0))
            self._append_metrics(evals[-1])
        for step in range(start + 1, cfg.steps + 1):
            record = self.train_step(
                step, guard=(step == start + 1) or (cfg.guard_every and step % cfg.guard_every == 0)
            )
            train.append(record)
            self._append_metrics(record)
            self.log(format_step(record, cfg.steps))
            last = step == cfg.steps
            if self.eval_problems and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                evals.append(self.evaluate(step))
                self._append_metrics(evals[-1])
            if step % cfg.save_steps == 0 or last:
                state = {"settings": cfg.trajectory_settings(), "train": train, "evals": evals}
                path = save_checkpoint(
                    self.output_dir,
                    step,
                    self.model,
                    self.tokenizer,
                    self.optimizer,
                    state,
                    cfg.save_total_limit,
                )
                self.log(f"saved {path}")
        self.model.save_pretrained(self.output_dir)
        self.tokenizer.save_pretrained(self.output_dir)
        result = RLResult(
            str(self.output_dir),
            max(cfg.steps, start),
            str(self.resume_from) if self.resume_from else None,
            time.perf_counter() - started,
            train,
            evals,
        )
        (self.output_dir / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2))
        if train or evals:
            from memento.train.rl.plots import plot_curves

            plot_curves(self.output_dir / "curves.png", train, evals)
        return result

    def _rewrite_metrics(self, train: list[dict], evals: list[dict]) -> None:
        records = sorted([*train, *evals], key=lambda r: (r["step"], r["kind"] == "eval"))
        (self.output_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))

    def _append_metrics(self, record: dict) -> None:
        with (self.output_dir / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    # --- one step -----------------------------------------------------------------------------

    def rollouts(self, step: int) -> list[Rollout]:
        from memento.engine import SamplingParams

        cfg = self.cfg
        chosen = prompt_schedule(len(self.problems), step, cfg.prompts_per_step, cfg.seed)
        # Own seeds per prompt (sample k of prompt i: base + i * group_size + k): with one seed for
        # all prompts, a model that barely reads its prompt gives every prompt the same responses.
        base = step_seed(cfg.seed, step)
        params = [
            SamplingParams(
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                n=cfg.group_size,
                seed=base + i * cfg.group_size,
                logprobs=True,
            )
            for i in range(len(chosen))
        ]
        outputs = self.engine.generate([self.prompt_ids[i] for i in chosen], params)
        problems = [self.problems[i] for i in chosen]
        rollouts = collect(
            self.engine, outputs, [p.answer for p in problems], self.reward,
            problems=[p.problem for p in problems], step_reward=self.step_reward,
        )  # fmt: skip
        advantages = group_advantages([r.verdict.reward for r in rollouts], cfg.group_size, cfg.scale_rewards)
        for r, a in zip(rollouts, advantages, strict=True):
            r.advantage = a
        if self.step_reward is not None:
            step_advantages(rollouts, cfg.group_size, cfg.step_weight, self.engine.tokenizer)
        return rollouts

    def train_step(self, step: int, guard: bool = False) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        rollouts = self.rollouts(step)
        t_rollout = time.perf_counter() - t0
        lr = cfg.lr * (min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Whole groups per update; each update is normalised by its own loss-token count.
        per_update = math.ceil(len(rollouts) / cfg.group_size / cfg.updates_per_step) * cfg.group_size
        updates = [rollouts[i : i + per_update] for i in range(0, len(rollouts), per_update)]
        # A response with zero advantage (its group's rewards were all equal) has no policy gradient;
        # unless score_zero_advantage keeps it for its KL term, it stays out of the loss and is not
        # scored at all, except without gradient for the guard.
        score_all = cfg.beta > 0 and cfg.score_zero_advantage
        in_loss = lambda r: score_all or r.has_gradient  # noqa: E731
        check = GuardStats()
        if guard:
            self._score_into(check, [r for r in rollouts if not in_loss(r)])
        old: dict[int, torch.Tensor] = {}
        if cfg.updates_per_step > 1:  # later updates are off-policy: keep the pre-update log-probs
            old = self._score_into(check if guard else None, [r for r in rollouts if in_loss(r)])
            if guard:
                self._check_guard(step, check)
        totals = _Totals()
        grad_norms = []
        for u, chunk in enumerate(updates):
            normaliser = sum(r.loss_tokens for r in chunk)
            for micro in _chunks([r for r in chunk if in_loss(r)], cfg.micro_batch_size):
                batch = self._batch(micro)
                logp = response_logprobs(self.model, batch, cfg.temperature, self.swap)
                width = batch.width
                if old:
                    old_logp = torch.stack([_pad(old[id(r)], width) for r in micro]).to(logp.device)
                else:
                    old_logp = logp.detach()  # one update per step: the sampling policy is this one
                    if guard:
                        for r, row in zip(micro, old_logp, strict=True):
                            check.add(r, row[: len(r.output_ids)])
                ref_logp = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_logp = response_logprobs(self.ref_model, batch, cfg.temperature, self.ref_swap)
                mask = torch.stack([_pad(torch.tensor(r.loss_mask), width) for r in micro]).to(logp.device)
                if self.step_reward is not None:
                    adv = torch.stack([_pad(torch.tensor(r.token_advantages), width) for r in micro])
                    adv = adv.to(device=logp.device, dtype=logp.dtype)
                else:
                    adv = torch.tensor([r.advantage for r in micro], dtype=logp.dtype, device=logp.device)
                loss, stats = cispo_loss(
                    logp, old_logp, adv, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    beta=cfg.beta, ref_logp=ref_logp, num_tokens=normaliser,
                )  # fmt: skip
                loss.backward()
                totals.add(stats)
            if guard and u == 0 and not old:
                self._check_guard(step, check)  # before the first update touches the weights
            grad_norms.append(
                float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
            )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        record = step_record(step, rollouts, totals, cfg)
        record.update(
            lr=lr,
            grad_norm=sum(grad_norms) / len(grad_norms),
            rollout_seconds=round(t_rollout, 2),
            seconds=round(time.perf_counter() - t0, 2),
        )
        if guard:
            record["guard"] = check.summary()
        return record

    @torch.no_grad()
    def _score_into(self, check: GuardStats | None, rollouts: list[Rollout]) -> dict[int, torch.Tensor]:
        """Log-probs of `rollouts` under the current policy, without gradient (by `id` of the
        rollout); added to the guard's statistics when given."""
        out = {}
        for micro in _chunks(rollouts, self.cfg.micro_batch_size):
            logp = response_logprobs(self.model, self._batch(micro), self.cfg.temperature, self.swap)
            for r, row in zip(micro, logp, strict=True):
                out[id(r)] = row[: len(r.output_ids)]
                if check is not None:
                    check.add(r, out[id(r)])
        return out

    def _batch(self, rollouts: list[Rollout]):
        rows = [(r.prompt_ids, r.output_ids, r.evictions) for r in rollouts]
        return build_batch(rows, self.tokenizer.pad_token_id)

    def _check_guard(self, step: int, check: GuardStats) -> None:
        summary = check.summary()
        self.log(
            f"guard step {step}: trainer vs engine log-probs on {summary['tokens']} sampled tokens: "
            f"mean |Δ| {summary['mean_abs']:.2e}, max |Δ| {summary['max_abs']:.2e}, KL {summary['kl']:.2e}"
        )
        tol = self.cfg.guard_tol
        if summary["tokens"] and (summary["mean_abs"] > tol or summary["max_abs"] > TOKEN_TOL_FACTOR * tol):
            raise GuardError(
                f"log-prob guard failed at step {step}: on {summary['tokens']} sampled tokens the trainer's "
                f"log-probs differ from the engine's by mean |Δ| {summary['mean_abs']:.3e} (limit {tol:g}), "
                f"max |Δ| {summary['max_abs']:.3e} (limit {TOKEN_TOL_FACTOR * tol:g}), KL {summary['kl']:.3e}; "
                "the training forward does not see what the engine sampled from (mask, positions, "
                "temperature or precision). Stopped before updating; the last checkpoint is intact."
            )

    # --- held-out evaluation ------------------------------------------------------------------

    def evaluate(self, step: int) -> dict:
        """Greedy generation on the held-out prompts, with eviction, as the model will be used."""
        from memento.engine import SamplingParams

        t0 = time.perf_counter()
        params = SamplingParams(temperature=0, max_new_tokens=self.cfg.max_new_tokens)
        outputs = self.engine.generate(self.eval_prompt_ids, params)
        answers = [p.answer for p in self.eval_problems]
        texts = [p.problem for p in self.eval_problems]
        rollouts = collect(
            self.engine,
            outputs,
            answers,
            self.reward,
            logprobs=False,
            problems=texts,
            step_reward=self.step_reward,
        )
        record = {"kind": "eval", "step": step, **rollout_summary(rollouts)}
        record["seconds"] = round(time.perf_counter() - t0, 2)
        self.log(
            f"eval step {step}: accuracy {record['accuracy']:.1%} · well-formed {record['well_formed']:.1%} · "
            f"peak KV {record['peak_kv']:.0f} (full attention {record['full_kv']:.0f}, "
            f"{record['kv_reduction']:.2f}x lower) · {record['seconds']:.0f}s"
        )
        return record


@dataclass
class GuardStats:
    """Trainer vs engine log-probs of the same sampled tokens."""

    diffs: list[torch.Tensor] = field(default_factory=list)

    def add(self, rollout: Rollout, trainer_logp: torch.Tensor) -> None:
        engine = torch.tensor(rollout.sampling_logprobs, dtype=torch.float64)
        sampled = torch.tensor(rollout.loss_mask)
        self.diffs.append((trainer_logp.detach().double().cpu() - engine)[sampled])

    def summary(self) -> dict:
        if not self.diffs:
            return {"tokens": 0, "mean_abs": 0.0, "max_abs": 0.0, "kl": 0.0}
        d = torch.cat(self.diffs)  # log pi_trainer - log pi_engine, on tokens drawn from the engine
        kl = (torch.exp(d) - 1 - d).mean()  # KL(engine || trainer), k3 estimate
        return {
            "tokens": int(d.numel()),
            "mean_abs": float(d.abs().mean()),
            "max_abs": float(d.abs().max()),
            "kl": float(kl),
        }


@dataclass
class _Totals:
    tokens: int = 0
    policy: float = 0.0
    kl: float = 0.0
    clipped_low: int = 0
    clipped_high: int = 0
    ratio: float = 0.0

    def add(self, stats) -> None:
        self.tokens += stats.tokens
        self.policy += stats.policy_sum
        self.kl += stats.kl_sum
        self.clipped_low += stats.clipped_low
        self.clipped_high += stats.clipped_high
        self.ratio += stats.ratio_sum


def rollout_summary(rollouts: list[Rollout]) -> dict:
    """Reward, accuracy, well-formedness, length and KV over a list of rollouts."""
    n = len(rollouts)
    mean = lambda xs: sum(xs) / n if n else 0.0  # noqa: E731
    peak = mean([r.peak_kv for r in rollouts])
    full = mean([r.full_kv for r in rollouts])
    return {
        "reward": mean([r.verdict.reward for r in rollouts]),
        "accuracy": mean([r.verdict.correct for r in rollouts]),
        "well_formed": mean([r.verdict.well_formed for r in rollouts]),
        "steps_right": _mean_or_none([r.steps_right for r in rollouts]),
        "length": mean([len(r.output_ids) for r in rollouts]),
        "truncated": mean([r.finish_reason != "stop" for r in rollouts]),
        "evictions": mean([len(r.evictions) for r in rollouts]),
        "forced": mean([sum(r.forced) for r in rollouts]),
        "peak_kv": peak,
        "max_peak_kv": max((r.peak_kv for r in rollouts), default=0),
        "full_kv": full,
        "kv_reduction": full / peak if peak else 0.0,
    }


def step_record(step: int, rollouts: list[Rollout], totals: _Totals, cfg: RLConfig) -> dict:
    record = {"kind": "train", "step": step, **rollout_summary(rollouts)}
    t = max(totals.tokens, 1)
    record.update(
        loss_tokens=totals.tokens,
        policy_loss=totals.policy / t,
        kl=totals.kl / t if cfg.beta > 0 else None,
        clip_fraction=(totals.clipped_low + totals.clipped_high) / t,
        clip_low=totals.clipped_low / t,
        clip_high=totals.clipped_high / t,
        ratio_mean=totals.ratio / t,
        zero_advantage_groups=sum(
            all(not r.has_gradient for r in rollouts[i : i + cfg.group_size])
            for i in range(0, len(rollouts), cfg.group_size)
        ),
    )
    return record


def format_step(record: dict, steps: int) -> str:
    kl = "n/a" if record.get("kl") is None else f"{record['kl']:.4f}"
    return (
        f"step {record['step']}/{steps}: reward {record['reward']:.3f} · accuracy {record['accuracy']:.1%} · "
        + (f"steps right {record['steps_right']:.1%} · " if record["steps_right"] is not None else "")
        + f"well-formed {record['well_formed']:.1%} · KL {kl} · clip {record['clip_fraction']:.1%} · "
        f"length {record['length']:.0f} · peak KV {record['peak_kv']:.0f} "
        f"({record['kv_reduction']:.2f}x below full) · {record['seconds']:.1f}s"
    )


def _chunks(rollouts: list[Rollout], size: int) -> list[list[Rollout]]:
    """Micro-batches of similar lengths (less padding); the order only changes float summation."""
    ordered = sorted(rollouts, key=lambda r: len(r.prompt_ids) + len(r.output_ids))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _pad(row: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros(width, dtype=row.dtype)
    out[: row.shape[0]] = row.cpu()
    return out


def train_rl(cfg: RLConfig, log: Callable[[str], None] | None = None) -> RLResult:
    """Run (or resume) one `memento rl` job; returns its metric history."""
    return RLTrainer(cfg, log).run()
