"""The restart ablation, made fair: sampled generations of one model under several KV semantics.

`memento` keeps the mementos' KV as computed while their block was visible; `restart` (today's
ablation, as in the original overlay) evicts the block *with its delimiters* and recomputes the
memento from `<|summary_start|>`; `restart_kv` (`BlockMaskingConfig.restart_kv_only`) evicts exactly
what memento mode evicts and recomputes every kept token that saw the block, so the text is the
same and only the KV channel differs. Every mode draws the same per-sample seeds, so samples are
paired: until the first memento ends the modes produce the same tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from memento.format import THINK_END, parse
from memento.masking import BlockMaskingConfig
from memento.probe.stats import bootstrap, paired_difference
from memento.toy.tasks import ChainProblem, ChainTask, ProbeTask

MODES: dict[str, tuple[str, BlockMaskingConfig]] = {
    "full": ("full", BlockMaskingConfig()),
    "memento": ("memento", BlockMaskingConfig()),
    "restart": ("restart", BlockMaskingConfig()),
    "restart_kv": ("restart", BlockMaskingConfig(restart_kv_only=True)),
}

# The paper's sampling (App. A.2.2; the same defaults as `memento eval`)
PAPER_TEMPERATURE = 0.6
PAPER_TOP_P = 0.95
PAPER_TOP_K = 20

_PROBE_SUM = re.compile(r"^sum=(\d+)$")


def answer_text(text: str) -> str:
    """What follows `</think>`, without end-of-turn tokens ("" if there is no `</think>`)."""
    _, sep, answer = text.partition(THINK_END)
    if not sep:
        return ""
    return answer.replace("<|endoftext|>", "").replace("<|im_end|>", "").strip()


def score_probe_sample(task: ProbeTask, text: str, finish_reason: str) -> dict:
    """A probing-toy generation: the model writes its own random digits, so it is *correct* when its
    answer is the total of the digits it wrote, and *well-formed* when it stopped by itself with
    `task.blocks` blocks in the task's block format, each followed by `sum=NNN`, then an answer."""
    trace, problems = parse(text)
    blocks = [task.read_block(b.reasoning) for b in trace.blocks]
    mementos = [_PROBE_SUM.match(b.memento.strip()) for b in trace.blocks]
    answer = _PROBE_SUM.match(answer_text(text))
    well_formed = (
        finish_reason == "stop"
        and not problems
        and len(trace.blocks) == task.blocks
        and all(d is not None for d in blocks)
        and all(mementos)
        and answer is not None
    )
    total, right = 0, 0
    for digits, m in zip(blocks, mementos, strict=True):
        total += sum(digits or [])
        right += m is not None and int(m.group(1)) == total
    correct = (
        answer is not None
        and bool(blocks)
        and all(d is not None for d in blocks)
        and int(answer.group(1)) == total
    )
    out = {
        "well_formed": well_formed,
        "correct": correct,
        "mementos_correct": right / len(blocks) if blocks else 0.0,
    }
    if task.worked:
        out |= _worked_steps(trace.blocks, mementos)
    return out


def _worked_steps(blocks, mementos) -> dict:
    """Where a worked generation goes wrong: `reads_memento` = blocks whose first running total is
    the previous memento plus the first digit (the step that reads the state from the memento),
    `adds_in_block` = the other steps (previous total in the block plus the digit); None when the
    generation has no such step (e.g. it stopped after one block)."""
    reads = [0, 0]
    adds = [0, 0]
    for i, block in enumerate(blocks):
        items = [item.partition(":") for item in block.reasoning.split(" passcode ")[0].split()]
        steps = [(int(d), int(t)) for d, sep, t in items if sep and d.isdigit() and t.isdigit()]
        if not steps:
            continue
        if i > 0 and mementos[i - 1] is not None:
            reads[0] += steps[0][1] == int(mementos[i - 1].group(1)) + steps[0][0]
            reads[1] += 1
        for (_, before), (d, after) in zip(steps, steps[1:], strict=False):
            adds[0] += after == before + d
            adds[1] += 1
    return {"reads_memento": reads[0] / reads[1] if reads[1] else None,
            "adds_in_block": adds[0] / adds[1] if adds[1] else None}  # fmt: skip


def score_chain_sample(task: ChainTask, problem: ChainProblem, text: str, finish_reason: str) -> dict:
    """A demo-task generation: correct = exact final state; well-formed = stopped by itself with at
    least one block, every block closed by a memento, nothing malformed, and an answer."""
    trace, problems = parse(text)
    answer = answer_text(text)
    return {
        "well_formed": finish_reason == "stop" and not problems and len(trace.blocks) > 0 and bool(answer),
        "correct": task.is_correct(problem, answer),
    }


@dataclass(frozen=True)
class SampledRun:
    """`scores[mode][prompt][sample]` dicts; prompts x samples per mode, same seeds in every mode."""

    scores: dict[str, list[list[dict]]]
    tokens: dict[str, int]
    seconds: dict[str, float]


def sample_modes(
    model_dir: str | Path,
    prompts: list[str],
    modes: list[str],
    score: Callable[[int, str, str], dict],
    *,
    samples: int,
    max_new_tokens: int,
    seed: int,
    temperature: float = PAPER_TEMPERATURE,
    top_p: float = PAPER_TOP_P,
    top_k: int = PAPER_TOP_K,
    batch: int = 32,
    progress: Callable[[str, int], None] | None = None,
) -> SampledRun:
    """Generate `samples` per prompt under each mode (sample k of prompt i uses seed `seed + 1000 i + k`)
    and score each with `score(prompt_index, text, finish_reason)`."""
    import time

    from memento.engine import Engine, SamplingParams

    scores: dict[str, list[list[dict]]] = {}
    tokens: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for name in modes:
        mode, masking = MODES[name]
        engine = Engine.from_pretrained(str(model_dir), mode=mode, masking=masking, max_batch_size=batch)
        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                n=samples,
                seed=seed + 1000 * i,
                max_new_tokens=max_new_tokens,
            )
            for i in range(len(prompts))
        ]
        t0 = time.perf_counter()
        with torch.inference_mode():
            outs = engine.generate(
                prompts, params, progress=None if progress is None else (lambda _o, n=name: progress(n, 1))
            )
        seconds[name] = time.perf_counter() - t0
        per: list[list[dict]] = [[] for _ in prompts]
        for o in outs:
            per[o.prompt_index].append(
                score(o.prompt_index, o.text, o.finish_reason) | {"tokens": len(o.output_ids)}
            )
        scores[name] = per
        tokens[name] = sum(len(o.output_ids) for o in outs)
    return SampledRun(scores, tokens, seconds)


def summarize(run: SampledRun, reference: str = "memento", seed: int = 0) -> dict:
    """Per mode: accuracy and well-formedness (and memento accuracy when scored) with 95% bootstrap
    intervals over prompts (over samples when there is one prompt), and paired differences to
    `reference`."""

    def units(per: list[list[dict]], key: str) -> torch.Tensor:
        """One number per independent unit; samples where `key` is None (not measurable) are left out."""
        if len(per) == 1:  # one prompt (the probing toy): the samples are the independent units
            return torch.tensor([float(s[key]) for s in per[0] if s.get(key) is not None])
        means = []
        for samples in per:
            vals = [float(s[key]) for s in samples if s.get(key) is not None]
            if vals:
                means.append(sum(vals) / len(vals))
        return torch.tensor(means)

    always = ("correct", "well_formed", "mementos_correct")  # measurable in every sample: paired
    out: dict = {}
    for mode, per in run.scores.items():
        row = {}
        for k in (*always, "reads_memento", "adds_in_block"):
            if k in per[0][0] and len(values := units(per, k)):
                row[k] = bootstrap(values, seed=seed).to_dict()
        if reference in run.scores and mode != reference:
            ref = run.scores[reference]
            row["vs_" + reference] = {
                k: paired_difference(units(per, k), units(ref, k), seed=seed).to_dict()
                for k in always
                if k in per[0][0]
            }
        row["samples"] = sum(len(s) for s in per)
        row["mean_tokens"] = run.tokens[mode] / max(1, row["samples"])
        row["seconds"] = round(run.seconds[mode], 2)
        out[mode] = row
    return out


def read_demo_run(run_dir: str | Path) -> tuple[ChainTask, list[ChainProblem], Path]:
    """The task, held-out problems and Memento model of a finished `memento demo` run directory."""
    from memento.toy.demo.data import read_test
    from memento.toy.demo.profiles import DemoPaths, Profile

    run_dir = Path(run_dir)
    demo = DemoPaths(run_dir)
    config_path, model_dir = run_dir / "demo_config.json", demo.model("stage2")
    for path in (config_path, model_dir / "config.json", demo.test):
        if not path.is_file():
            raise ValueError(f"--demo-run {run_dir}: not a finished `memento demo` run ({path} is missing)")
    try:
        saved = json.loads(config_path.read_text())["profile"]
        known = {f.name for f in fields(Profile)}
        profile = Profile(**{k: v for k, v in saved.items() if k in known})  # runs from newer demos too
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: cannot read the demo's settings ({exc})") from exc
    return profile.task, read_test(demo.test), model_dir
