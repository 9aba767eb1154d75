"""The vLLM plugin's pure-Python parts, tested in the main venv (no vLLM needed).

`memento.integrations.vllm.{config,plugin,serve,cli}` import nothing from vLLM, so option parsing,
the engine arguments, the `vllm serve` flags and `memento vllm-serve --dry-run` must work (and
refuse bad input) before any vLLM process is started.
"""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from memento.integrations.vllm import (
    ASYNC_SCHEDULER_CLS,
    BLOCK_CAP_PROCESSOR,
    CPU_WORKER_CLS,
    GPU_WORKER_CLS,
    SCHEDULER_CLS,
)
from memento.integrations.vllm.config import CONFIG_KEY, MementoVllmConfig, request_masking
from memento.integrations.vllm.plugin import engine_kwargs, serve_flags
from memento.integrations.vllm.serve import build_command
from memento.masking import BlockMaskingConfig

# -- additional_config["memento"] ------------------------------------------------------------------


def test_section_turns_plugin_on_with_masking_options():
    cfg = MementoVllmConfig.from_dict({"keep_last_n_blocks": 1, "mask_delimiters": True, "debug": True})
    assert cfg.enable and cfg.debug
    assert cfg.masking == BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True)
    assert MementoVllmConfig.from_dict({}).enable  # an empty section still means "on"
    assert not MementoVllmConfig.from_dict({"enable": False}).enable


def test_absent_section_means_off():
    assert not MementoVllmConfig.from_vllm_config(SimpleNamespace(additional_config=None)).enable
    assert not MementoVllmConfig.from_vllm_config(SimpleNamespace(additional_config={"other": 1})).enable
    on = MementoVllmConfig.from_vllm_config(
        SimpleNamespace(additional_config={CONFIG_KEY: {"restart_mode": True}})
    )
    assert on.enable and on.masking.restart_mode


@pytest.mark.parametrize(
    "section",
    [
        {"keep_last_n_block": 0},  # typo of a masking key
        {"enabled": True},  # typo of a plugin key
        {"keep_last_n_blocks": 0, "foo": 1},
    ],
)
def test_unknown_server_keys_are_errors(section):
    with pytest.raises(ValueError, match="unknown memento option"):
        MementoVllmConfig.from_dict(section)


@pytest.mark.parametrize(
    "section, match",
    [
        ({"enable": "yes"}, "true or false"),
        ({"debug": 1}, "true or false"),
        ({"block_start_token": True}, "token string or id"),
        ({"block_start_token": 1.5}, "token string or id"),
    ],
)
def test_bad_plugin_values_are_errors(section, match):
    with pytest.raises(ValueError, match=match):
        MementoVllmConfig.from_dict(section)


def test_bad_masking_values_are_errors():
    with pytest.raises(ValueError):
        MementoVllmConfig.from_dict({"keep_last_n_blocks": -2})
    with pytest.raises(ValueError, match="JSON object"):
        MementoVllmConfig.from_vllm_config(SimpleNamespace(additional_config={CONFIG_KEY: [1]}))


def test_marker_tokens_resolve_by_id_or_text(toy_tokenizer, markers):
    by_text = MementoVllmConfig.from_dict({}).resolve_markers(toy_tokenizer)
    assert by_text == markers
    ids = {
        "block_start_token": markers.block_start,
        "block_end_token": markers.block_end,
        "summary_start_token": markers.summary_start,
        "summary_end_token": markers.summary_end,
    }
    by_id = MementoVllmConfig.from_dict(ids).resolve_markers(None)  # no tokenizer needed
    assert (by_id.block_start, by_id.block_end, by_id.summary_start, by_id.summary_end) == tuple(ids.values())
    with pytest.raises(ValueError, match="not a single token"):
        MementoVllmConfig.from_dict({"block_start_token": "two words"}).resolve_markers(toy_tokenizer)


def test_to_dict_round_trips():
    cfg = MementoVllmConfig.from_dict({"keep_last_n_blocks": 2, "keep_last_block_for_answer": True})
    again = MementoVllmConfig.from_dict(cfg.to_dict())
    assert again == cfg


# -- per-request overrides ---------------------------------------------------------------------------


def test_request_overrides_only_masking_keys():
    base = BlockMaskingConfig(keep_last_n_blocks=0)
    assert request_masking(base, None) is base
    assert request_masking(base, {"other": 1}) is base  # other extra_args are not ours
    got = request_masking(base, {CONFIG_KEY: {"keep_last_n_blocks": 1, "mask_delimiters": True}})
    assert got == BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True)
    for bad in ({"keep_last_n_block": 1}, {"debug": True}, {"block_start_token": "x"}):
        with pytest.raises(ValueError, match="unknown per-request memento option"):
            request_masking(base, {CONFIG_KEY: bad})
    with pytest.raises(ValueError, match="must be a dict"):
        request_masking(base, {CONFIG_KEY: [("keep_last_n_blocks", 1)]})


# -- engine_kwargs / serve_flags ---------------------------------------------------------------------


def test_engine_kwargs_cpu_sync():
    kw = engine_kwargs({"keep_last_n_blocks": 1})
    assert kw == {
        "scheduler_cls": SCHEDULER_CLS,
        "worker_cls": CPU_WORKER_CLS,
        "additional_config": {CONFIG_KEY: {"keep_last_n_blocks": 1}},
        "enable_prefix_caching": False,
        "async_scheduling": False,
        "logits_processors": [BLOCK_CAP_PROCESSOR],
    }
    assert engine_kwargs()["additional_config"] == {CONFIG_KEY: {}}


def test_engine_kwargs_cuda_async_and_refusals():
    kw = engine_kwargs({}, device="cuda", async_scheduling=True)
    assert kw["scheduler_cls"] == ASYNC_SCHEDULER_CLS and kw["worker_cls"] == GPU_WORKER_CLS
    with pytest.raises(ValueError, match="restart_mode needs async_scheduling=False"):
        engine_kwargs({"restart_mode": True}, async_scheduling=True)
    with pytest.raises(ValueError, match="unknown memento option"):
        engine_kwargs({"keep_last": 0})


def test_serve_flags_match_engine_kwargs():
    flags = serve_flags({"keep_last_n_blocks": 0, "mask_delimiters": True})
    assert flags[flags.index("--scheduler-cls") + 1] == SCHEDULER_CLS
    assert flags[flags.index("--worker-cls") + 1] == CPU_WORKER_CLS
    section = json.loads(flags[flags.index("--additional-config") + 1])
    assert section == {CONFIG_KEY: {"keep_last_n_blocks": 0, "mask_delimiters": True}}
    assert "--no-enable-prefix-caching" in flags and "--no-async-scheduling" in flags
    assert flags[flags.index("--logits-processors") + 1 :] == [BLOCK_CAP_PROCESSOR]
    assert "--async-scheduling" in serve_flags({}, device="cuda", async_scheduling=True)


def test_build_command_order():
    cmd = build_command(
        "/m", memento={"keep_last_n_blocks": 1}, port=9000, python="/py", extra=["--seed", "3"]
    )
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/m" and cmd[cmd.index("--port") + 1] == "9000"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # local only unless asked
    assert cmd[-2:] == ["--seed", "3"]  # extra flags last, so they can override


# -- memento vllm-serve --dry-run ---------------------------------------------------------------------


def _app():
    from memento.cli import app

    return app


def test_cli_dry_run_prints_command():
    result = CliRunner().invoke(
        _app(),
        [
            "vllm-serve",
            "/models/m",
            "--memento-config",
            '{"keep_last_n_blocks": 1}',
            "--port",
            "8123",
            "--python",
            "/opt/py",
            "--dry-run",
            "--max-model-len",
            "4096",
        ],
    )
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip().splitlines()[-1])
    assert argv[:3] == ["/opt/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[-2:] == ["--max-model-len", "4096"]  # unknown options pass through to vllm serve
    # The JSON is printed unquoted, so check the pieces rather than parse it back.
    assert argv[argv.index("--scheduler-cls") + 1] == SCHEDULER_CLS


def test_cli_dry_run_rejects_unknown_option():
    result = CliRunner().invoke(
        _app(),
        ["vllm-serve", "/m", "--memento-config", '{"keep_last_n_blockz": 1}', "--python", "/py", "--dry-run"],
    )
    assert result.exit_code == 2  # one line, no traceback (issue 19)
    assert "unknown memento option" in result.stderr and "Traceback" not in result.output


def test_request_options_may_come_as_a_json_string():
    """`vllm_xargs` carries flat values only, so over HTTP the per-request options are a JSON
    object string; bad JSON and unknown keys are errors that name the problem."""
    base = BlockMaskingConfig()
    as_dict = request_masking(base, {CONFIG_KEY: {"keep_last_n_blocks": 1}})
    assert request_masking(base, {CONFIG_KEY: '{"keep_last_n_blocks": 1}'}) == as_dict
    with pytest.raises(ValueError, match="not valid JSON"):
        request_masking(base, {CONFIG_KEY: "{keep: 1"})
    with pytest.raises(ValueError, match="keep_last_n_block"):
        request_masking(base, {CONFIG_KEY: '{"keep_last_n_block": 1}'})


@pytest.mark.parametrize("name", ["olmo3", "gemma3", "mistral-sliding", "qwen2-sliding"])
def test_plugin_refuses_sliding_window_models(name, toy_tokenizer):
    """vLLM applies sliding windows to physical KV slots, which compaction shifts: the plugin
    refuses every model with a sliding-window layer (the check runs before vLLM loads weights)."""
    from architectures import build
    from memento.integrations.vllm.config import check_model

    with pytest.raises(ValueError, match="sliding-window attention layers"):
        check_model(build(name, toy_tokenizer).config)


@pytest.mark.parametrize("name", ["qwen3", "llama", "phi3"])
def test_plugin_accepts_full_attention_models(name, toy_tokenizer):
    from architectures import build
    from memento.integrations.vllm.config import check_model

    check_model(build(name, toy_tokenizer).config)


def test_cpu_kv_space_is_sized_explicitly(monkeypatch, toy_model_dir):
    """vLLM's CPU default (92% of the machine) does not start on a shared machine: on CPU the
    command always carries an explicit KV size: room for 16 full-length sequences of the model,
    capped by the free memory, unless given."""
    from memento.integrations.vllm import serve

    monkeypatch.setattr(serve, "available_memory_bytes", lambda: 8 * serve.GIB)
    size, note = serve.kv_cache_bytes(None, [], "cpu")  # model unknown: the cap
    assert size == 2 * serve.GIB and "25% of 8.0 GiB free" in note
    # the toy model: 4 layers x K,V x 2 heads x 32 dims x 4 bytes = 2 KiB per token, 4096 tokens
    size, note = serve.kv_cache_bytes(None, [], "cpu", str(toy_model_dir))
    assert size == 16 * 4096 * 2048 and "16 sequences of 4096 tokens" in note
    size, _ = serve.kv_cache_bytes(None, ["--max-model-len", "1024"], "cpu", str(toy_model_dir))
    assert size == 16 * 1024 * 2048
    monkeypatch.setattr(serve, "available_memory_bytes", lambda: 64 * serve.GIB)
    assert serve.kv_cache_bytes(None, [], "cpu")[0] == 4 * serve.GIB  # capped
    assert serve.kv_cache_bytes(1.5, [], "cpu") == (
        int(1.5 * serve.GIB),
        "KV cache 1.50 GiB (--kv-cache-gib)",
    )
    assert serve.kv_cache_bytes(None, ["--gpu-memory-utilization", "0.3"], "cpu")[0] is None
    assert serve.kv_cache_bytes(None, ["--kv-cache-memory-bytes=100"], "cpu")[0] is None
    assert serve.kv_cache_bytes(None, [], "cuda")[0] is None
    cmd = build_command("/m", python="/py", kv_bytes=123)
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == "123"


def test_cli_dry_run_sizes_kv_and_refuses_sliding_models(toy_tokenizer, tmp_path):
    from architectures import save

    ok = save("qwen3", toy_tokenizer, tmp_path / "qwen3")
    result = CliRunner().invoke(_app(), ["vllm-serve", str(ok), "--python", "/py", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--kv-cache-memory-bytes" in shlex.split(result.output.strip().splitlines()[-1])
    olmo = save("olmo3", toy_tokenizer, tmp_path / "olmo3")
    result = CliRunner().invoke(_app(), ["vllm-serve", str(olmo), "--python", "/py", "--dry-run"])
    assert result.exit_code == 2 and "sliding-window attention layers" in result.stderr
    assert "Traceback" not in result.output
