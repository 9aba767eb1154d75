"""Stage `eval`: greedy generation with `memento.engine` on the held-out problems — the control
model in `full` mode, the MEMENTO model in `memento` and `restart` modes — one JSONL record per
problem and mode in DIR/eval/ (output, answer, correctness, well-formedness, peak/AUC KV, KV trace)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from memento.format import MARKERS, THINK_END, THINK_START, parse
from memento.toy.demo.data import read_test
from memento.toy.demo.profiles import DemoConfig, Profile
from memento.toy.runner import Ui
from memento.toy.tasks import ChainProblem

MODES = ("control", "memento", "restart")  # control = the Control model with full attention
MODE_LABELS = {
    "control": "control (full attention)",
    "memento": "memento",
    "restart": "restart (ablation)",
}
# mode -> (the training run whose model it evaluates, the engine's generation mode)
ENGINE_RUNS = {
    "control": ("control", "full"),
    "memento": ("stage2", "memento"),
    "restart": ("stage2", "restart"),
}


def well_formed(text: str, mode: str, finish_reason: str) -> bool:
    """Finished on its own, `<think>` … `</think>` then a non-empty answer; for Memento modes also
    at least one block, every block closed by a memento, and nothing malformed."""
    if finish_reason != "stop":
        return False
    if mode == "control":
        if any(m in text for m in MARKERS):
            return False
        head, sep, _ = text.partition(THINK_END)
        return bool(sep) and head.lstrip().startswith(THINK_START) and bool(answer_of(text))
    trace, problems = parse(text)
    return not problems and len(trace.blocks) > 0 and bool(answer_of(text))


def answer_of(text: str) -> str:
    """The text after `</think>`, end-of-text tokens removed ("" if there is no `</think>`)."""
    _, sep, answer = text.partition(THINK_END)
    if not sep:
        return ""
    return answer.replace("<|endoftext|>", "").replace("<|im_end|>", "").strip()


def stage_eval(cfg: DemoConfig, ui: Ui) -> dict:
    """Generate greedily on the held-out problems with the engine, in the three modes."""
    import torch

    from memento.engine import Engine, SamplingParams

    s, paths = cfg.settings, cfg.paths
    task = s.task
    problems = read_test(paths.test)
    paths.eval.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in MODES:
        run, mode = ENGINE_RUNS[name]
        engine = Engine.from_pretrained(str(paths.model(run)), mode=mode, max_batch_size=s.eval_batch)
        prompts = [engine.chat_prompt([{"role": "user", "content": task.prompt(p)}]) for p in problems]
        sampling = SamplingParams(
            temperature=0.0, max_new_tokens=max_new_tokens(s, engine.tokenizer, problems)
        )
        with ui.progress() as bar, torch.inference_mode():
            task_id = bar.add_task(f"  eval {MODE_LABELS[name]}", total=len(prompts), info="")
            t0 = time.perf_counter()
            outputs = engine.generate(prompts, sampling, progress=lambda _o, t=task_id: bar.advance(t))
            wall = time.perf_counter() - t0
        records = []
        for p, prompt, o in zip(problems, prompts, outputs, strict=True):
            answer = answer_of(o.text)
            records.append(
                {
                    "problem": asdict(p),
                    "prompt": prompt,
                    "output": o.text,
                    "answer": answer,
                    "expected": task.answer(p),
                    "correct": task.is_correct(p, answer),
                    "well_formed": well_formed(o.text, name, o.finish_reason),
                    "finish_reason": o.finish_reason,
                    "output_tokens": len(o.output_ids),
                    "peak_kv": o.peak_kv,
                    "auc_kv": o.auc_kv,
                    "kv_trace": list(o.kv_trace),
                    **block_token_counts(engine.tokenizer, o.text, name),
                }
            )
        with (paths.eval / f"{name}.jsonl").open("w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        tokens = sum(r["output_tokens"] for r in records)
        summary[name] = {
            "wall_seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        }
        acc = sum(r["correct"] for r in records) / len(records)
        ui.log(f"  {MODE_LABELS[name]}: accuracy {acc:.1%} · {tokens / wall:,.0f} tokens/s")
        del engine
    return summary


def read_records(cfg: DemoConfig, mode: str) -> list[dict]:
    """The eval records of one mode, as written by `stage_eval`."""
    path: Path = cfg.paths.eval / f"{mode}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def max_new_tokens(s: Profile, tokenizer, problems: list[ChainProblem]) -> int:
    """Room for the longest reference solution plus a quarter (a rambling model stops there)."""
    if s.max_new:
        return s.max_new
    longest = max(len(tokenizer.encode(s.task.trace(p).render(), add_special_tokens=False)) for p in problems)
    return int(longest * 1.25) + 32


def block_token_counts(tokenizer, text: str, mode: str) -> dict[str, int]:
    """Tokens inside blocks and inside mementos (for the compression ratio)."""
    if mode == "control":
        return {"block_tokens": 0, "memento_tokens": 0}
    trace, _ = parse(text)

    def count(s: str) -> int:
        return len(tokenizer.encode(s, add_special_tokens=False))

    return {
        "block_tokens": sum(count(b.reasoning) for b in trace.blocks),
        "memento_tokens": sum(count(b.memento) for b in trace.blocks),
    }
