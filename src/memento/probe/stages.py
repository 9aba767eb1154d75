"""The stages of `memento probe` (see `memento.probe.study` for the order and what each leaves)."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from memento.probe.data import DEV, TRAIN, VAL, label_sets, probe_problems
from memento.probe.study import StudyConfig, Ui, paths
from memento.toy.tasks import TRAIN as TASK_TRAIN
from memento.toy.tasks import ProbeProblem, ProbeTask

TASK = ProbeTask(worked=True)  # see ProbeTask: the plain form's units digit is not learnable in minutes


# --- data -----------------------------------------------------------------------------------------


def stage_data(cfg: StudyConfig, ui: Ui) -> dict:
    """Tokenizer + untrained model + training traces (some with a passcode) + probe problems."""
    from memento.format import write_traces
    from memento.toy.kit import DEFAULT_CORPUS, build_tiny_model, build_tokenizer, save_toy_model

    s, p = cfg.settings, paths(cfg)
    rng = random.Random(f"probe-data-{cfg.seed}")
    sample = [_with_passcode(q, rng, 1.0) for q in TASK.problems(40, seed=12345)]
    tokenizer = build_tokenizer(
        [*DEFAULT_CORPUS, *(f"{t.problem}\n{t.render()}" for t in TASK.traces(sample))]
    )
    model = build_tiny_model(
        tokenizer, layers=s.layers, hidden=s.hidden, heads=s.heads, kv_heads=s.kv_heads,
        intermediate=3 * s.hidden, max_position=1024, seed=cfg.seed,
    )  # fmt: skip
    save_toy_model(p["init"], tokenizer, model)
    train = [
        _with_passcode(q, rng, s.passcode_rate)
        for q in TASK.problems(s.n_train, split=TASK_TRAIN, seed=cfg.seed)
    ]
    p["train"].parent.mkdir(parents=True, exist_ok=True)
    write_traces(p["train"], TASK.traces(train))
    probes = probe_problems(TASK, s.n_probe, s.target, cfg.seed)
    p["probe"].write_text(json.dumps([asdict(q) for q in probes]))
    params = sum(x.numel() for x in model.parameters())
    ui.log(
        f"  model {params / 1e6:.2f}M params ({s.layers} layers, d={s.hidden}) · {len(train)} training traces "
        f"({s.passcode_rate:.0%} with a passcode) · {len(probes)} held-out probe problems (passcode in block {s.target})"
    )
    return {"params": params, "vocab": len(tokenizer), "n_train": len(train), "n_probe": len(probes)}


def _with_passcode(problem: ProbeProblem, rng: random.Random, rate: float) -> ProbeProblem:
    if rng.random() >= rate:
        return problem
    return TASK.inject_passcode(problem, rng.randrange(TASK.blocks), f"{rng.randrange(100000):05d}")


def read_probe_problems(cfg: StudyConfig) -> list[ProbeProblem]:
    return [ProbeProblem(**d) for d in json.loads(paths(cfg)["probe"].read_text())]


def tokenize(tokenizer, problems: list[ProbeProblem]) -> list[list[int]]:
    from memento.train.data import tokenize_trace

    return [tokenize_trace(TASK.trace(q), tokenizer).input_ids for q in problems]


# --- training -------------------------------------------------------------------------------------


RUNS = {  # run -> (start, stage, Stage-2 mask options, steps field)
    "stage1": ("init", "full", {}, "stage1_steps"),
    "memento": ("stage1", "memento", {}, "stage2_steps"),
    "control": ("stage1", "full", {}, "stage2_steps"),
    "restart": ("stage1", "memento", {"restart_mode": True, "restart_kv_only": True}, "stage2_steps"),
}
LABELS = {"stage1": "stage 1 (full attention)", "memento": "stage 2 (block mask)",
          "control": "control (full attention)", "restart": "stage 2 under restart semantics"}  # fmt: skip
CHECKPOINT_EXTRAS = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


def stage_train(cfg: StudyConfig, ui: Ui, run: str) -> dict:
    """One step-budgeted run (`memento.toy.training.train_run`). Stage 2 (`memento`) keeps evenly
    spaced checkpoints (weights only) so the probes can follow training."""
    from memento.toy.training import train_run

    s, p = cfg.settings, paths(cfg)
    start, stage, masking, steps_key = RUNS[run]
    steps = getattr(s, steps_key)
    save_every = steps // (s.checkpoints + 1) if run == "memento" and s.checkpoints else 0
    result = train_run(
        model=p[start], data=p["train"], out=p[run], stage=stage, fmt="memento", steps=steps,
        lr=s.lr if run == "stage1" else s.finetune_lr, seed=cfg.seed, batch_size=s.batch_size,
        save_every=max(save_every, 0), masking=masking, label=LABELS[run], ui=ui,
    )  # fmt: skip
    kept = []
    for ckpt in p[run].glob("checkpoint-*"):
        step = int(ckpt.name.split("-")[1])
        if step < steps:
            for extra in CHECKPOINT_EXTRAS:
                (ckpt / extra).unlink(missing_ok=True)
            kept.append(step)
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
    return {**result, "checkpoints": sorted(kept)}


def checkpoint_dirs(cfg: StudyConfig) -> list[tuple[int, Path]]:
    """(stage-2 step, model dir) from the end of stage 1 (step 0) to the final model."""
    p = paths(cfg)
    out = [(0, p["stage1"])]
    for ckpt in sorted(p["memento"].glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1])):
        out.append((int(ckpt.name.split("-")[1]), ckpt))
    out.append((cfg.settings.stage2_steps, p["memento"]))
    return out


# --- features -------------------------------------------------------------------------------------

# condition -> (model, semantics). Checkpoints are added as "step-N".
CONDITIONS: dict[str, tuple[str, str]] = {
    "memento": ("memento", "memento"),  # M3 (later mementos), M1 (earlier), the block's own memento
    "direct": ("memento", "full"),  # M2: the same later mementos, the block directly visible
    "restart_kv": ("memento", "restart_kv"),  # mementos' KV recomputed without any block (fair)
    "restart": ("memento", "restart"),  # today's restart (block and delimiters evicted)
    "untrained": ("init", "memento"),
    "control": ("control", "memento"),  # trained with full attention only, probed under the mask
    "restart_trained": ("restart", "restart_kv"),  # trained under restart semantics, run under them
}


MAIN = ("memento", "direct", "restart_kv")  # on every probe problem; the others on the first n_probe_controls


def conditions(cfg: StudyConfig) -> dict[str, tuple[Path, str, int]]:
    """condition -> (model dir, semantics, number of probe problems it is extracted for)."""
    s, p = cfg.settings, paths(cfg)
    size = {True: s.n_probe, False: min(s.n_probe, s.n_probe_controls)}
    out = {name: (p[model], sem, size[name in MAIN]) for name, (model, sem) in CONDITIONS.items()}
    for step, model_dir in checkpoint_dirs(cfg)[:-1]:
        out[f"step-{step}"] = (model_dir, "memento", size[False])
    return out


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def stage_extract(cfg: StudyConfig, ui: Ui) -> dict:
    """Memento KV of every probe problem under every condition -> features/<cond>.pt
    (`[problems, mementos, layers, memento tokens, 2 * kv_heads * head_dim]`, float16)."""
    from transformers import AutoTokenizer

    from memento.probe.features import extract
    from memento.tokens import MarkerIds

    p = paths(cfg)
    tokenizer = AutoTokenizer.from_pretrained(p["init"])
    markers = MarkerIds.from_tokenizer(tokenizer)
    sequences = tokenize(tokenizer, read_probe_problems(cfg))
    p["features"].mkdir(parents=True, exist_ok=True)
    shapes = {}
    for name, (model_dir, semantics, n) in conditions(cfg).items():
        target = p["features"] / f"{name}.pt"
        if target.is_file():
            continue
        feats = extract(load_model(model_dir), sequences[:n], markers, semantics)
        tmp = target.with_suffix(".tmp")
        torch.save(feats.half(), tmp)
        tmp.replace(target)
        shapes[name] = list(feats.shape)
        ui.log(f"  {name}: {semantics} semantics, features {tuple(feats.shape)}")
    return {"shapes": shapes, "tokens_per_problem": len(sequences[0])}


# --- probes ---------------------------------------------------------------------------------------


def probe_plan(cfg: StudyConfig, names: list[str]) -> list[dict]:
    """Which probes to train: (label, kind, condition, mementos, seeds, pooling). Everything on the
    main condition (M3, M1, the block's own memento), with every seed, a linear probe and mean
    pooling beside it; the restart-recomputed and direct KV at the labelled block and after; the
    other controls at the labelled block, +1 and +2; the training checkpoints at +1 and +2."""
    s = cfg.settings
    seeds = list(range(s.probe_seeds))
    every = list(range(TASK.blocks))
    after = list(range(s.target, TASK.blocks))
    near = [j for j in range(s.target, s.target + 3) if j < TASK.blocks]
    plan: list[dict] = []

    def add(label: str, kind: str, cond: str, mementos: list[int], seeds=(0,), pool: str = "concat") -> None:
        plan.append({"label": label, "kind": kind, "cond": cond, "mementos": mementos, "seeds": list(seeds),
                     "pool": pool})  # fmt: skip

    for label in ("passcode", "digits"):
        add(label, "mlp", "memento", every, seeds)
        add(label, "linear", "memento", every)
        add(label, "mlp", "memento", every, pool="mean")
        add(label, "mlp", "restart_kv", after)
        add(label, "linear", "restart_kv", after)
        add(label, "mlp", "direct", after)
        for cond in ("restart", "untrained", "control", "restart_trained"):
            add(label, "mlp", cond, near)
        for cond in names:
            if cond.startswith("step-"):
                add(label, "mlp", cond, near[1:])
    add("control", "mlp", "memento", every)
    add("control", "linear", "memento", every)
    add("digits_last", "mlp", "memento", every)
    return plan


def result_kind(job: dict) -> str:
    """The key a probe's results sit under: its kind, with `-mean` for mean-pooled features."""
    return job["kind"] if job["pool"] == "concat" else f"{job['kind']}-mean"


def stage_probe(cfg: StudyConfig, ui: Ui) -> dict:
    """Train every probe of `probe_plan`; results/probes.json holds, per label / kind / condition /
    layer / memento, the validation accuracy with its bootstrap interval over problems (seeds
    averaged per problem) and each seed's mean; the main digits probe is kept for patching."""
    from memento.probe.features import pooled
    from memento.probe.probes import ProbeConfig, fit_probes
    from memento.probe.stats import bootstrap_many

    s, p = cfg.settings, paths(cfg)
    problems = read_probe_problems(cfg)
    labels = label_sets(problems, cfg.seed)
    names = list(conditions(cfg))
    feats: dict[str, torch.Tensor] = {}

    def features(cond: str) -> torch.Tensor:
        if cond not in feats:
            feats[cond] = torch.load(p["features"] / f"{cond}.pt")  # [N, mementos, layers, tokens, F]
        return feats[cond]

    layers = features("memento").shape[2]
    p["results"].mkdir(parents=True, exist_ok=True)
    splits = {name: ls.split(s.val_fraction, s.dev_fraction, cfg.seed) for name, ls in labels.items()}
    results: dict = {}
    for job in probe_plan(cfg, names):
        ls = labels[job["label"]]
        x = pooled(features(job["cond"])[:, job["mementos"]], job["pool"]).float()  # [N, J, L, F]
        # conditions extracted for the first n problems only: the same split, restricted to them
        split = {k: v[v < x.shape[0]] for k, v in splits[job["label"]].items()}
        groups = x.permute(1, 2, 0, 3).reshape(len(job["mementos"]) * layers, x.shape[0], x.shape[-1])
        y = ls.labels
        per_seed, train_acc = [], []
        for seed in job["seeds"]:
            probe_cfg = ProbeConfig(
                kind=job["kind"], hidden=s.probe_hidden, epochs=s.probe_epochs, batch_size=s.probe_batch,
                lr=s.probe_lr, seed=seed,
            )  # fmt: skip
            fitted = fit_probes(
                groups[:, split[TRAIN]], y[split[TRAIN]], groups[:, split[DEV]], y[split[DEV]], probe_cfg
            )
            right = (
                (fitted.predict(groups[:, split[VAL]]) == y[split[VAL]][None]).float().mean(dim=2)
            )  # [G, M]
            per_seed.append(right)
            train_acc.append(
                (fitted.predict(groups[:, split[TRAIN]]) == y[split[TRAIN]][None]).float().mean(dim=(1, 2))
            )
            if (job["label"], result_kind(job), job["cond"], seed) == ("digits", "mlp", "memento", 0):
                torch.save(
                    {"fitted": fitted, "mementos": job["mementos"], "layers": layers},
                    p["results"] / "digits_probe.pt",
                )
        scores = torch.stack(per_seed).mean(0)  # seeds averaged per problem
        estimates = bootstrap_many(scores, resamples=s.bootstrap, seed=cfg.seed)
        seed_means = torch.stack(per_seed).mean(dim=2)  # [seeds, G]
        cells = []
        for g, est in enumerate(estimates):
            j, layer = job["mementos"][g // layers], g % layers
            cells.append({
                "memento": j, "distance": j - ls.block, "layer": layer, **est.to_dict(),
                "seeds": [round(float(v), 4) for v in seed_means[:, g]],
                "train": round(float(torch.stack(train_acc)[:, g].mean()), 4),
                "text_baseline": ls.text_baseline(j - ls.block, CONDITION_SEMANTICS.get(job["cond"], "memento")).per_digit,
            })  # fmt: skip
        results.setdefault(job["label"], {}).setdefault(result_kind(job), {})[job["cond"]] = cells
        ui.log(
            f"  {job['label']:<11} {result_kind(job):<11} {job['cond']:<16} {len(cells)} probes x "
            f"{len(job['seeds'])} seeds"
        )
    sizes = {name: {k: int(v.numel()) for k, v in sp.items()} for name, sp in splits.items()}
    overlap = {name: _split_overlap(labels[name].keys, sp) for name, sp in splits.items()}
    majority = {name: _majority_accuracy(labels[name].labels, sp) for name, sp in splits.items()}
    out = {"results": results, "split_sizes": sizes, "split_key_overlap": overlap, "majority": majority,
           "layers": layers}  # fmt: skip
    (p["results"] / "probes.json").write_text(json.dumps(out))
    return {"split_sizes": sizes, "split_key_overlap": overlap, "majority": majority}


def _majority_accuracy(labels: torch.Tensor, split: dict[str, torch.Tensor]) -> float:
    """Validation accuracy of always answering each digit's most frequent training value."""
    train, val = labels[split[TRAIN]], labels[split[VAL]]
    mode = torch.mode(train, dim=0).values
    return round(float((val == mode[None]).float().mean()), 4)


CONDITION_SEMANTICS = {name: semantics for name, (_, semantics) in CONDITIONS.items()}


def _split_overlap(keys: list[str], split: dict[str, torch.Tensor]) -> int:
    """How many validation keys (passcodes) also occur in training (must be 0)."""
    train = {keys[i] for i in split[TRAIN].tolist()}
    return sum(keys[i] in train for i in split[VAL].tolist())


# --- use: patching -------------------------------------------------------------------------------


def stage_patching(cfg: StudyConfig, ui: Ui) -> dict:
    """Patch A's block-t memento KV into B (same memento text, other digits in block t)."""
    from transformers import AutoTokenizer

    from memento.probe.features import pooled
    from memento.probe.patching import run_pairs, same_total_twin
    from memento.probe.stats import bootstrap, bootstrap_many
    from memento.tokens import MarkerIds

    s, p = cfg.settings, paths(cfg)
    problems = read_probe_problems(cfg)
    labels = label_sets(problems, cfg.seed)["digits"]
    split = labels.split(s.val_fraction, s.dev_fraction, cfg.seed)
    train_keys = {labels.keys[i] for i in split[TRAIN].tolist()}
    rng = random.Random(f"patch-{cfg.seed}")
    recipients = [problems[i] for i in split[VAL].tolist()[: s.n_patch]]
    donors = []
    for b in recipients:
        while True:
            a = same_total_twin(b, s.target, rng)
            if "".join(map(str, a.digits[s.target])) not in train_keys:
                break
        donors.append(a)
    tokenizer = AutoTokenizer.from_pretrained(p["init"])
    markers = MarkerIds.from_tokenizer(tokenizer)
    ids_a, ids_b = tokenize(tokenizer, donors), tokenize(tokenizer, recipients)
    colon = tokenizer.convert_tokens_to_ids(":") if TASK.worked else None
    res = run_pairs(
        load_model(p["memento"]), list(zip(ids_a, ids_b, strict=True)), markers, s.target, colon=colon
    )
    out: dict = {"pairs": len(recipients)}
    for run in ("patched", "ablated"):
        rows = res[run]
        out[run] = {
            key: bootstrap(torch.tensor([getattr(r, key) for r in rows]), resamples=s.bootstrap, seed=cfg.seed).to_dict()
            for key in ("kl_all", "kl_sums", "changed_sums", "correct_sums")
        }  # fmt: skip
    saved = torch.load(p["results"] / "digits_probe.pt", weights_only=False)
    fitted, mementos, layers = saved["fitted"], saved["mementos"], saved["layers"]
    y_a = torch.tensor([list(a.digits[s.target]) for a in donors])
    y_b = torch.tensor([list(b.digits[s.target]) for b in recipients])
    readout: dict = {}
    for run, feats in res["features"].items():
        x = pooled(feats[:, mementos], "concat").float()  # [pairs, J, L, F]
        x = x.permute(1, 2, 0, 3).reshape(len(mementos) * layers, x.shape[0], x.shape[-1])
        pred = fitted.predict(x)
        for who, y in (("recipient", y_b), ("donor", y_a)):
            right = (pred == y[None]).float().mean(dim=2)
            cells = []
            for g, est in enumerate(bootstrap_many(right, resamples=s.bootstrap, seed=cfg.seed)):
                j = mementos[g // layers]
                if j > s.target:
                    cells.append(
                        {"memento": j, "distance": j - s.target, "layer": g % layers, **est.to_dict()}
                    )
            readout.setdefault(run, {})[who] = cells
    out["readout"] = readout
    (p["results"] / "patching.json").write_text(json.dumps(out))
    pk = out["patched"]
    ui.log(
        f"  {len(recipients)} pairs · patched: KL at later sum digits {pk['kl_sums']['mean']:.4f}, "
        f"greedy sum digits changed {pk['changed_sums']['mean']:.1%}"
    )
    return {"pairs": len(recipients)}


# --- ablation -------------------------------------------------------------------------------------


def _max_new(tokenizer, extra: float = 1.25) -> int:
    longest = max(
        len(tokenizer.encode(TASK.trace(q).render(), add_special_tokens=False))
        for q in TASK.problems(20, seed=7)
    )
    return int(longest * extra) + 16


def stage_ablation(cfg: StudyConfig, ui: Ui) -> dict:
    """Sampled generations on the probing toy: the memento model under memento / restart / fair
    restart, the restart-trained model, the full-attention control, and task accuracy over the
    stage-2 checkpoints."""
    from transformers import AutoTokenizer

    from memento.probe.ablation import sample_modes, score_probe_sample, summarize
    from memento.probe.stats import difference

    s, p = cfg.settings, paths(cfg)
    tokenizer = AutoTokenizer.from_pretrained(p["init"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": TASK.prompt_text}], tokenize=False, add_generation_prompt=True
    )
    max_new = s.max_new_tokens or _max_new(tokenizer)

    def score(_i: int, text: str, finish: str) -> dict:
        return score_probe_sample(TASK, text, finish)

    sampled = {}

    def run(key: str, model_dir: Path, modes: list[str], samples: int, seed: int) -> dict:
        sampled[key] = sample_modes(
            model_dir, [prompt], modes, score, samples=samples, max_new_tokens=max_new, seed=seed
        )
        return summarize(sampled[key], seed=cfg.seed)

    seed = 10_000 * (cfg.seed + 1)
    out = {
        "memento_model": run(
            "memento", p["memento"], ["memento", "restart", "restart_kv"], s.ablation_samples, seed
        ),
        "restart_model": run("restart", p["restart"], ["restart_kv", "memento"], s.ablation_samples, seed),
        "control_model": run("control", p["control"], ["full"], s.ablation_samples, seed),
        "curve": [],
    }
    # what training under restart semantics costs or gains, each model in its own semantics (and the
    # control in full attention), against the memento model in memento mode: independent samples
    reference = _sample_scores(sampled["memento"], "memento", "correct")
    out["vs_memento_model"] = {
        name: difference(_sample_scores(sampled[key], mode, "correct"), reference, seed=cfg.seed).to_dict()
        for name, key, mode in (
            ("restart_model", "restart", "restart_kv"),
            ("control_model", "control", "full"),
        )
    }
    for step, model_dir in checkpoint_dirs(cfg):
        row = run(f"step-{step}", model_dir, ["memento"], s.curve_samples, seed)["memento"]
        out["curve"].append({"step": step, **row})
    (p["results"] / "ablation.json").write_text(json.dumps(out))
    for name in ("memento", "restart", "restart_kv"):
        r = out["memento_model"][name]
        ui.log(
            f"  memento model, {name:<10}: accuracy {r['correct']['mean']:.1%} · well-formed {r['well_formed']['mean']:.1%}"
        )
    return {"samples": s.ablation_samples}


def _sample_scores(run, mode: str, key: str) -> torch.Tensor:
    return torch.tensor([float(sample[key]) for samples in run.scores[mode] for sample in samples])


def stage_ablation_demo(cfg: StudyConfig, ui: Ui) -> dict:
    """The same three modes on a trained `memento demo` model (held-out chain problems)."""
    from transformers import AutoTokenizer

    from memento.probe.ablation import read_demo_run, sample_modes, score_chain_sample, summarize

    s, p = cfg.settings, paths(cfg)
    task, problems, model_dir = read_demo_run(cfg.demo_run)
    problems = problems[: s.demo_problems]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": task.prompt(q)}], tokenize=False, add_generation_prompt=True)
        for q in problems
    ]  # fmt: skip
    longest = max(len(tokenizer.encode(task.trace(q).render(), add_special_tokens=False)) for q in problems)

    def score(i: int, text: str, finish: str) -> dict:
        return score_chain_sample(task, problems[i], text, finish)

    sampled = sample_modes(
        model_dir, prompts, ["memento", "restart", "restart_kv"], score, samples=s.demo_samples,
        max_new_tokens=s.max_new_tokens or int(longest * 1.25) + 32, seed=20_000 * (cfg.seed + 1),
    )  # fmt: skip
    out = {"demo_run": str(cfg.demo_run), "problems": len(problems), "samples": s.demo_samples,
           "modes": summarize(sampled, seed=cfg.seed)}  # fmt: skip
    p["results"].mkdir(parents=True, exist_ok=True)
    (p["results"] / "ablation_demo.json").write_text(json.dumps(out))
    for name, r in out["modes"].items():
        ui.log(
            f"  demo model, {name:<10}: accuracy {r['correct']['mean']:.1%} · well-formed {r['well_formed']['mean']:.1%}"
        )
    return {"problems": len(problems)}
