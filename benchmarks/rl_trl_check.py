"""Could `memento rl` be TRL's GRPOTrainer (loss_type="cispo" + rollout_func)? Measured, not assumed.

TRL is not in the locked environment; install it beside it for this script only:

    .venv/bin/python -m pip install --no-deps --target /tmp/trl-pkg trl==1.16.0
    PYTHONPATH=/tmp/trl-pkg .venv/bin/python benchmarks/rl_trl_check.py --out benchmarks/results/rl_trl_check.json

On a tiny model SFT-trained for a few seconds to write blocks (so its rollouts evict), this samples
rollouts with `memento.engine` (memento mode, per-token sampling log-probs) and then measures:

1. what TRL's CISPO weight cap is when `epsilon_high` is left unset, and how its clip works;
2. the log-probs TRL's trainer computes for those rollouts (its own padding, 2-D mask) against the
   engine's, on the same tokens — and the same for `memento.train.rl.scoring`;
3. TRL training steps driven by `rollout_func` (the engine) against `memento rl` steps on the same
   rollout sizes, in one process (ours first, then TRL's `train()`), wall time per step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def count_traces(n: int, seed: int):
    from memento.format import Block, MementoTrace

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randint(1, 20)
        nums = list(range(a, a + rng.randint(3, 9) + 1))
        blocks = [
            Block(" ".join(map(str, nums[i : i + 3])), f"at {nums[i : i + 3][-1]}")
            for i in range(0, len(nums), 3)
        ]
        out.append(
            MementoTrace(f"Count from {a} to {nums[-1]}.", tuple(blocks), f"The answer is {nums[-1]}.")
        )
    return out


def tiny_memento_model(root: Path) -> Path:
    from memento.format import write_traces
    from memento.toy import build_tiny_model, build_tokenizer
    from memento.toy.kit import save_toy_model
    from memento.train import SFTConfig, train

    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, layers=2, hidden=48, heads=2, kv_heads=1, intermediate=96, seed=0)
    save_toy_model(root / "init", tokenizer, model)
    write_traces(root / "traces.jsonl", count_traces(400, 0))
    cfg = SFTConfig(model=str(root / "init"), data=str(root / "traces.jsonl"), output_dir=str(root / "sft"),
                    stage="memento", max_steps=100, lr=2e-2, batch_size=16, grad_accum=1, warmup_ratio=0.1, progress=False,
                    save_steps=10**6)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    return root / "sft"


def delta_stats(d: torch.Tensor) -> dict:
    return {"tokens": int(d.numel()), "mean_abs": float(d.abs().mean()), "max_abs": float(d.abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from memento.engine import Engine, SamplingParams
    from memento.train.rl.config import RLConfig
    from memento.train.rl.scoring import build_batch, response_logprobs
    from memento.train.rl.trainer import RLTrainer

    result: dict = {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    work = Path(tempfile.mkdtemp(prefix="rl-trl-"))
    model_dir = tiny_memento_model(work)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    traces = count_traces(args.prompts, 7)
    prompts = [[{"role": "user", "content": t.problem}] for t in traces]
    answers = [t.answer for t in traces]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"problem": t.problem, "answer": t.answer}) + "\n"
                                               for t in traces))  # fmt: skip

    def make_engine(model) -> Engine:
        return Engine(model, tokenizer, mode="memento", max_batch_size=64)

    def sample(engine, step: int):
        texts = [engine.chat_prompt(m) for m in prompts]
        params = [SamplingParams(temperature=1.0, max_new_tokens=64, n=args.group, seed=1000 * step + 10 * i,
                                 logprobs=True) for i in range(len(texts))]  # fmt: skip
        return engine.generate(texts, params)

    # --- 1 + 2: TRL's CISPO settings and its log-probs of evicting rollouts --------------------------
    seen_completions: list[str] = []

    def reward_exact(prompts, completions, answer, **kwargs):
        # TRL hands conversational completions decoded with skip_special_tokens=True: the block
        # markers and </think> are gone from what a reward function sees.
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        seen_completions.extend(texts)
        return [float(t.strip().endswith(a)) for t, a in zip(texts, answer, strict=True)]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    engine = make_engine(model)

    def rollout_func(batch_prompts, trainer):
        outs = sample(engine, trainer.state.global_step + 1)
        return {
            "prompt_ids": [o.prompt_ids for o in outs],
            "completion_ids": [o.output_ids for o in outs],
            "logprobs": [o.logprobs for o in outs],
            "env_mask": [[int(not f) for f in o.forced] for o in outs],  # forced tokens carry no loss
        }

    dataset = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)])
    trl_args = GRPOConfig(
        output_dir=str(work / "trl"), loss_type="cispo", num_generations=args.group,
        per_device_train_batch_size=args.prompts * args.group, max_completion_length=64, beta=0.0,
        learning_rate=1e-3, max_steps=args.repeats, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1, temperature=1.0, seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_exact], args=trl_args, train_dataset=dataset,
                          processing_class=tokenizer, rollout_func=rollout_func)  # fmt: skip
    result["trl_cispo"] = {
        "epsilon_high_unset_becomes": trainer.epsilon_high,
        "num_iterations_default": trl_args.num_iterations,
        "note": "cispo weight = clamp(ratio, max=epsilon_high): an absolute cap, no lower bound",
    }

    outs = sample(engine, 0)
    evicted = sum(bool(o.evictions) for o in outs)
    pad = tokenizer.pad_token_id
    plen = max(len(o.prompt_ids) for o in outs)
    clen = max(len(o.output_ids) for o in outs)
    ids = torch.full((len(outs), plen + clen), pad)
    mask = torch.zeros_like(ids)
    for b, o in enumerate(outs):  # TRL's layout: prompts left-padded, completions right-padded, 2-D mask
        ids[b, plen - len(o.prompt_ids) : plen] = torch.tensor(o.prompt_ids)
        ids[b, plen : plen + len(o.output_ids)] = torch.tensor(o.output_ids)
        mask[b, plen - len(o.prompt_ids) : plen + len(o.output_ids)] = 1
    with torch.no_grad():
        trl_logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, clen)
        ours = response_logprobs(
            model, build_batch([(o.prompt_ids, o.output_ids, o.evictions) for o in outs], pad)
        )
    trl_d, our_d, before, after = [], [], [], []
    for b, o in enumerate(outs):
        n = len(o.output_ids)
        engine_lp = torch.tensor(o.logprobs, dtype=torch.float64)
        keep = ~torch.tensor(o.forced)
        d = (trl_logp[b, :n].double() - engine_lp)[keep]
        trl_d.append(d)
        our_d.append((ours[b, :n].double() - engine_lp)[keep])
        first = min((ev.trigger for ev in o.evictions), default=None)
        pos = torch.arange(len(o.prompt_ids), len(o.prompt_ids) + n)[keep]
        if first is not None:
            before.append(d[pos <= first])
            after.append(d[pos > first])
        else:
            before.append(d)
    result["rollouts"] = {"responses": len(outs), "with_evictions": evicted,
                          "evictions": sum(len(o.evictions) for o in outs)}  # fmt: skip
    result["logprob_vs_engine"] = {
        "trl_default": delta_stats(torch.cat(trl_d)),
        "trl_default_up_to_first_eviction": delta_stats(torch.cat(before)),
        "trl_default_after_first_eviction": delta_stats(torch.cat(after)) if after else None,
        "memento_scoring": delta_stats(torch.cat(our_d)),
    }

    # --- 3: TRL steps (rollout_func = the engine) vs memento rl steps, same sizes, one process ----------
    cfg = RLConfig(model=str(model_dir), prompts=str(work / "prompts.jsonl"), output_dir=str(work / "ours"),
                   reward="exact", group_size=args.group, prompts_per_step=args.prompts, steps=10**6,
                   lr=1e-3, warmup_steps=0, beta=0.0, max_new_tokens=64, progress=False)  # fmt: skip
    ours_trainer = RLTrainer(cfg)
    ours_trainer._load()
    trl_times, our_times = [], []
    callback_times: list[float] = []

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            callback_times.append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.args.max_steps = 10**6
    # TRL has no "one step" call: train() for max_steps, timing each optimizer step with a callback.
    for r in range(args.repeats):
        t0 = time.perf_counter()
        ours_trainer.train_step(r + 1, guard=False)
        our_times.append(time.perf_counter() - t0)
    trainer.args.max_steps = args.repeats
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    trl_times = callback_times[-args.repeats :]
    result["trl_reward_input_example"] = seen_completions[0] if seen_completions else None
    result["step_seconds"] = {
        "trl": trl_times, "memento_rl": our_times,
        "trl_median": statistics.median(trl_times), "memento_rl_median": statistics.median(our_times),
        "load_average": os.getloadavg(),
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
