"""Does `MEMENTO_CPU_NUMERICS=avx2` make different x86-64 CPUs train alike? Measured, and its cost.

    .venv/bin/python benchmarks/cpu_numerics.py --out benchmarks/results/cpu_numerics.json

A tiny Qwen3 (the toy kit's, 2 layers) takes 3 AdamW steps on fixed tokens in a fresh process per
setting, and the weights after them are hashed. Settings: the CPU's own kernels ("native"),
MEMENTO_CPU_NUMERICS=avx2, and avx2 with MKL's cross-vendor branch instead (MKL_CBWR=COMPATIBLE),
on this machine and, where `qemu-x86_64` is installed (Debian: `apt-get install qemu-user`), on an
emulated Intel Haswell (AVX2, no AVX-512) and AMD EPYC-Rome (AVX2, the other vendor: MKL picks its
code by vendor too), minutes per setting. Equal hashes mean bit-identical training; `summary`
groups the settings that agree.

The cost: the demo's model (4 layers, d=128) trains for 20 steps at 4 x 256 tokens on this
machine, native and avx2 alternating, `--repeats` times each, 1 thread; every run's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from memento.cpu_numerics import PINNED, SWITCH, cpu_flags, cpu_kernels, pin_cpu_numerics

STEPS, BATCH, LENGTH = 3, 2, 64
TIMED_STEPS, TIMED_BATCH, TIMED_LENGTH = 20, 4, 256
EMULATED = ("Haswell", "EPYC-Rome")


def child(model_dir: str, steps: int, batch: int, length: int) -> None:
    """Run in a fresh process: pin (if asked) before torch computes anything, train, print JSON."""
    pin_cpu_numerics()
    import hashlib
    import time

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(
        0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    seconds = round(time.perf_counter() - start, 3)
    print(
        json.dumps(
            {"kernels": cpu_kernels(), "losses": losses, "weights_sha256": digest[:16], "seconds": seconds}
        )
    )


SETTINGS = {
    "native": {SWITCH: "native"},
    "avx2": {SWITCH: "avx2"},
    "avx2, MKL_CBWR=COMPATIBLE": {SWITCH: "avx2", "MKL_CBWR": "COMPATIBLE"},
}


def run(model_dir: Path, *, setting: str, emulate: str | None = None, timed: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINNED}
    env.update(SETTINGS[setting])
    size = (TIMED_STEPS, TIMED_BATCH, TIMED_LENGTH) if timed else (STEPS, BATCH, LENGTH)
    command = [sys.executable, __file__, "--child", str(model_dir), *map(str, size)]
    if emulate:
        command = ["qemu-x86_64", "-cpu", emulate, *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], *map(int, args.child[1:]))
        return
    from memento.toy.kit import build_tiny_model, build_tokenizer, save_toy_model

    flags = cpu_flags() or set()
    results: dict[str, dict] = {}
    timings: dict[str, list[float]] = {"native": [], "avx2": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer()
        small = save_toy_model(Path(tmp) / "small", tokenizer, build_tiny_model(tokenizer, layers=2))
        demo_size = save_toy_model(Path(tmp) / "demo", tokenizer, build_tiny_model(tokenizer))
        cpus = [None, *(EMULATED if shutil.which("qemu-x86_64") else ())]
        for cpu in cpus:
            for setting in SETTINGS:
                name = f"{'this CPU' if cpu is None else 'emulated ' + cpu}: {setting}"
                results[name] = run(small, setting=setting, emulate=cpu)
                print(
                    f"{name:44s} {results[name]['kernels']:28s} {results[name]['weights_sha256']}", flush=True
                )
        for _ in range(args.repeats):
            for setting in timings:
                timings[setting].append(run(demo_size, setting=setting, timed=True)["seconds"])
        print(f"{TIMED_STEPS} training steps of the demo model, seconds: {timings}", flush=True)
    groups: dict[str, list[str]] = {}
    for name, result in results.items():
        groups.setdefault(result["weights_sha256"], []).append(name)
    summary = " | ".join(" = ".join(names) for names in groups.values())
    print(f"bit-identical: {summary}")
    report = {
        "summary": summary,
        "cpu": {flag: flag in flags for flag in ("avx2", "avx512f", "amx_tile")},
        "workload": {"model": "toy kit Qwen3, 2 layers, d=128", "adamw_steps": STEPS, "batch": BATCH, "length": LENGTH},
        "results": results,
        "timing": {"model": "toy kit Qwen3, 4 layers, d=128 (the demo's)", "adamw_steps": TIMED_STEPS,
                   "batch": TIMED_BATCH, "length": TIMED_LENGTH, "threads": 1, "seconds": timings,
                   "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]},
    }  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
