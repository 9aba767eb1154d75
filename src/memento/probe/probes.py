"""Probes: small classifiers that read a passcode's digits from KV features, many trained at once.

One probe per group (a layer at one memento position, say) reads a feature vector and predicts
`heads` labels of `classes` values each (five digits, ten values). All groups share their training
examples, so they train together as one batched model (`torch.bmm` over the group axis): forty
probes cost one small matmul per step instead of forty Python loops. Each group keeps the weights
of its best epoch on a development split carved from the training problems, and is judged on
validation problems that share no passcode with training (the split is done by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("mlp", "linear")


@dataclass(frozen=True)
class ProbeConfig:
    """`hidden`: the MLP's layers (the paper's toy: 256 then a 128 bottleneck); `linear` ignores it."""

    kind: str = "mlp"
    hidden: tuple[int, ...] = (256, 128)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"probe kind must be one of {KINDS}, got {self.kind!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


class GroupedProbe(torch.nn.Module):
    """`groups` independent MLPs (or linear maps) evaluated in one batched pass: `[G, N, F] -> [G, N, H, C]`."""

    def __init__(self, groups: int, features: int, heads: int, classes: int, cfg: ProbeConfig) -> None:
        super().__init__()
        sizes = [features, *(cfg.hidden if cfg.kind == "mlp" else ()), heads * classes]
        self.heads, self.classes = heads, classes
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = fan_in**-0.5
            self.weights.append(
                torch.nn.Parameter(torch.empty(groups, fan_in, fan_out).uniform_(-bound, bound))
            )
            self.biases.append(torch.nn.Parameter(torch.zeros(groups, 1, fan_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x.view(x.shape[0], x.shape[1], self.heads, self.classes)


@dataclass
class FittedProbes:
    """Trained probes with the feature standardisation they were trained with."""

    probe: GroupedProbe
    mean: torch.Tensor  # [G, 1, F]
    std: torch.Tensor
    dev_accuracy: torch.Tensor  # [G] best development accuracy per group

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """`[G, M, F]` features -> `[G, M, heads]` predicted labels."""
        self.probe.eval()
        return self.probe((x.float() - self.mean) / self.std).argmax(-1)


def fit_probes(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_dev: torch.Tensor,
    y_dev: torch.Tensor,
    cfg: ProbeConfig,
    classes: int = 10,
) -> FittedProbes:
    """Train one probe per group (features `[G, N, F]`, labels `[N, heads]` shared by all groups);
    each group keeps its weights from the epoch with the best development accuracy."""
    groups, _, features = x_train.shape
    heads = y_train.shape[1]
    mean = x_train.float().mean(dim=1, keepdim=True)
    std = x_train.float().std(dim=1, keepdim=True).clamp_min(1e-6)
    x_train = (x_train.float() - mean) / std
    x_dev = (x_dev.float() - mean) / std
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = GroupedProbe(groups, features, heads, classes, cfg)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = torch.full((groups,), -1.0)
    best_state = [p.detach().clone() for p in probe.parameters()]
    n = x_train.shape[1]
    targets = y_train.long()
    for _ in range(cfg.epochs):
        probe.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = probe(x_train[:, idx])  # [G, b, H, C]
            target = targets[idx].expand(groups, -1, -1)
            # sum over groups of each group's mean loss: groups stay independent of each other
            loss = torch.nn.functional.cross_entropy(logits.permute(0, 3, 1, 2), target) * groups
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            probe.eval()
            acc = (probe(x_dev).argmax(-1) == y_dev[None]).float().mean(dim=(1, 2))
            better = acc > best
            best = torch.where(better, acc, best)
            for saved, p in zip(best_state, probe.parameters(), strict=True):
                saved[better] = p.detach()[better]
    with torch.no_grad():
        for saved, p in zip(best_state, probe.parameters(), strict=True):
            p.copy_(saved)
    return FittedProbes(probe, mean, std, best)
