"""Probe sets: held-out problems with a passcode, their token ids, and what each probe must read.

A probe set is `n` problems from the task's held-out split with a random 5-digit passcode written
into block `target` (0-based; the paper's T2 is `target=2`). Each problem gives one feature vector
per memento and layer; a *label set* says what to predict from them:

* `passcode`: the injected passcode (`... passcode 12345`, not part of any sum). Nothing in the
  text after the block reveals it, so a text-only reader is at chance (10% per digit).
* `digits`: the five digits of block `target` itself. The mementos' running sums reveal their
  total, so a text-only reader does better than chance (`baseline.given_total`: 16.0% per digit).
* `digits_last`: the digits of the last block; every other memento comes *before* it, so causality
  alone forbids any information there (the causal control, M1, at distances -1 ... -7).
* `control`: a control task in the sense of Hewitt & Liang (2019): five random digits drawn once
  per passcode (a fixed random function of it), so it is learnable only by memorising passcodes.

Train, development and validation problems are split by the *label's key* (the passcode, or the
block's digits), so no passcode in validation appears in training.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from memento.probe import baseline
from memento.toy.tasks import TEST, ProbeProblem, ProbeTask

LABELS = ("passcode", "digits", "digits_last", "control")
TRAIN, DEV, VAL = "train", "dev", "val"


@dataclass(frozen=True)
class LabelSet:
    """What the probes predict (`labels`: `[problems, 5]`) and how the problems split."""

    name: str
    block: int  # the block the information lives in (distance 0)
    labels: torch.Tensor
    keys: list[str]  # the split key of every problem (the passcode, or the block's digits)

    def split(self, val_fraction: float, dev_fraction: float, seed: int) -> dict[str, torch.Tensor]:
        """Indices of train / dev / val problems; problems with the same key always land together."""
        parts: dict[str, list[int]] = {TRAIN: [], DEV: [], VAL: []}
        for i, key in enumerate(self.keys):
            u = _unit(f"{seed}:{self.name}:{key}")
            part = VAL if u < val_fraction else DEV if u < val_fraction + dev_fraction else TRAIN
            parts[part].append(i)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in parts.items()}

    def text_baseline(self, distance: int, semantics: str = "memento") -> baseline.TextBaseline:
        """Bayes-optimal accuracy of a reader of the text visible to a memento `distance` blocks
        after the labelled block, under `semantics` (restart hides every block, even its own)."""
        if self.name == "control":
            return baseline.nothing()
        own_block_visible = semantics in ("memento", "full")
        if distance < 0:
            return baseline.nothing()
        if semantics == "full" or (distance == 0 and own_block_visible):
            return baseline.everything()
        if self.name == "passcode":
            return baseline.nothing()
        return baseline.given_total(len(self.labels[0]))


def _unit(text: str) -> float:
    """A deterministic number in [0, 1) from a string."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _digits(text: str) -> list[int]:
    return [int(c) for c in text]


def probe_problems(task: ProbeTask, n: int, target: int, seed: int) -> list[ProbeProblem]:
    """`n` held-out problems, each with a random passcode in block `target` (deterministic)."""
    return task.problems(n, split=TEST, seed=seed, passcode_block=target)


def label_sets(problems: list[ProbeProblem], seed: int) -> dict[str, LabelSet]:
    """Every label set of `LABELS` for these problems (all share the passcode block)."""
    target = problems[0].passcode_block
    if target is None or any(p.passcode_block != target for p in problems):
        raise ValueError("every probe problem needs its passcode in the same block")
    last = len(problems[0].digits) - 1
    codes = [p.passcode for p in problems]
    block_keys = ["".join(map(str, p.digits[target])) for p in problems]
    last_keys = ["".join(map(str, p.digits[last])) for p in problems]

    def control(code: str) -> list[int]:
        rng = random.Random(f"control-{seed}-{code}")
        return [rng.randrange(10) for _ in code]

    return {
        "passcode": LabelSet("passcode", target, torch.tensor([_digits(c) for c in codes]), codes),
        "digits": LabelSet("digits", target, torch.tensor([_digits(k) for k in block_keys]), block_keys),
        "digits_last": LabelSet(
            "digits_last", last, torch.tensor([_digits(k) for k in last_keys]), last_keys
        ),
        "control": LabelSet("control", target, torch.tensor([control(c) for c in codes]), codes),
    }
