"""`MEMENTO_CPU_NUMERICS=avx2`: compute with AVX2 kernels on any x86-64 CPU, so an AVX-512 machine
gives the numbers an AVX2 one does, and a seed's numbers do not depend on which of the two ran it.

PyTorch picks its vectorised kernels (ATen: softmax, attention, reductions) by the instruction sets
the CPU has, and MKL its matmul and math code paths by the instruction sets and the vendor, and
each rounds differently. A few hundred optimizer steps amplify that into different models: the
`memento rl --demo` start, same command and seed, scored 25.0% held-out on an earlier VM and 50.5%
on an AVX-512 Intel one (docs/environments.md). This pins ATen to its AVX2 kernels and MKL to its
AVX2 branch. Measured by benchmarks/cpu_numerics.py: an AVX-512 Intel CPU trains bit-identically to
an (emulated) Intel Haswell with it, and differently without it. Not across vendors: on AMD CPUs
MKL ignores its AVX2 branch (its docs say so; measured on an emulated EPYC).

It is opt-in: it costs speed on AVX-512 machines and changes the numbers a machine gave before.
The variables must be set before the first CPU kernel runs (they are read once), so the `memento`
command sets them before its subcommand imports torch; a script calls `pin_cpu_numerics()` first.
Variables the user set are left alone (e.g. MKL_CBWR=COMPATIBLE, see docs/environments.md).
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

SWITCH = "MEMENTO_CPU_NUMERICS"
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_numerics(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set `PINNED` (where unset) if `SWITCH` is "avx2"; True if set, False for native (the default).

    Raises ValueError for a value other than "avx2", "native" or empty, and for "avx2" on a CPU
    without AVX2: asking for comparable numbers must never silently give the machine's own."""
    env = os.environ if environ is None else environ
    choice = env.get(SWITCH, "").strip().lower()
    if choice not in {"", "native", "avx2"}:
        raise ValueError(f"{SWITCH}={env[SWITCH]!r}: use avx2 (AVX2 kernels on any x86-64 CPU) or native")
    if choice != "avx2":
        return False
    if not _x86_with_avx2():
        raise ValueError(
            f"{SWITCH}=avx2 needs an x86-64 CPU with AVX2 (this is {platform.machine()}); unset it"
        )
    for name, value in PINNED.items():
        env.setdefault(name, value)
    return True


def cpu_kernels() -> str:
    """What this process computes with, for run records: e.g. "AVX2 (MKL_CBWR=AVX2)" or "AVX512"."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    cbwr = os.environ.get("MKL_CBWR")
    return f"{capability} (MKL_CBWR={cbwr})" if cbwr else capability


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux); None where there is no such file."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _x86_with_avx2() -> bool:
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return False
    flags = cpu_flags()
    return flags is None or "avx2" in flags  # macOS, Windows: no cheap check; x86-64 without AVX2 is rare
