"""Bad input never crashes and never lies: every command through every class of bad input (issue 19).

One row of ``ROWS`` is one bad input: a command line, the exit status it must end with and a
fragment of the message it must print. For every row the runner checks that

* the exit status is the expected one (2 for a user mistake; 0 for input that must simply work,
  such as CJK text or a prompt past the model's position limit, which only warns);
* for an error: stderr holds exactly one error line, ``error: ...`` (or click's ``Error: ...``
  for an unknown flag), containing the fragment, besides any ``note:``/``warning:`` lines, and
  stdout holds nothing;
* no traceback appears anywhere;
* nothing was written: the scratch folder holding the inputs and every output path is unchanged
  (file names, sizes and modification times).

Adding a command (``serve``, ``probe``, ``rl``, ...) means adding rows, nothing else::

    Row("probe", "missing model", "probe --model {missing} -o {out}", 2, "no such directory"),

``argv`` is split with shlex after filling the placeholders: ``{out}`` (a folder that does not
exist yet), ``{model}`` (the toy checkpoint; ``{short_model}`` knows only 64 positions), ``{tmp}``
(the scratch folder) and every name in
``FILES`` (``{empty}``, ``{binary}``, ``{bench}``, ...; add a file there when a new class needs
one). A row whose case says "cuda here" or "without CUDA" checks what a machine without a GPU
says and is skipped where CUDA is available. Rows run in-process and most stop before any model loads, so the table stays fast; a row
that must load a model uses the tiny toy checkpoint. ``COUNTS`` at the bottom tallies rows per
command for the issue's closing note.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine_helpers import one_thread  # noqa: F401 (fixture)
from memento.cli import app
from memento.toy import make_toy_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only contends

CJK = "这是一个中文推理过程，我们一步一步计算。"
THINK = "Let me add 2 and 3. That gives 5. Wait, check: 2 + 3 = 5. So the answer is 5.\n\n" * 3


def _jsonl(*records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _trace(**over) -> dict:
    return {"id": "t0", "problem": "Add 2 and 3.", "cot": f"<think>{THINK}</think>The answer is 5.", **over}


BENCH = _jsonl(
    {"id": "a", "problem": "Add 2 and 3.", "answer": "5"}, {"id": "b", "problem": "4+4?", "answer": "8"}
)
MEMENTO_TRACE = {"problem": "Add.", "blocks": [{"reasoning": "2 + 3 = 5", "memento": "5"}], "answer": "5"}

# name -> file content (str: UTF-8 text; bytes: written as is; None: a directory)
FILES: dict[str, str | bytes | None] = {
    # classes shared by every command
    "empty": "",
    "blank": "\n  \n\n",
    "binary": b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 8,
    "notjson": '{"id": 1,\n',
    "array": "[1, 2, 3]\n",
    "string": '"just a string"\n',
    "adir": None,
    "afile": "some text\n",
    # annotate
    "raw": _jsonl(_trace()),
    "cot_int": _jsonl(_trace(cot=123)),
    "problem_list": _jsonl(_trace(problem=["Add", "2"])),
    "wrong_fields": _jsonl({"id": "x", "question": "q", "reasoning": "<think>x</think>"}),
    "id_dict": _jsonl(_trace(id={"a": 1})),
    "dup_ids": _jsonl(_trace(), _trace()),
    "cjk_only": _jsonl(_trace(cot=f"<think>{CJK}</think>5")),
    "unclosed": _jsonl(_trace(cot=f"<think>{THINK}")),
    "conv_dict": _jsonl({"id": "c", "conversations": {"from": "human"}}),
    "raw_huge": _jsonl(_trace(cot=f"<think>{THINK * 400}</think>5")),
    "bad.json": "{not json",
    "scalar.json": "42",
    "bad.parquet": "PAR1 this is not parquet",
    # eval
    "bench": BENCH,
    "bench_no_problem": _jsonl({"id": "a", "answer": "5"}),
    "bench_no_answer": _jsonl({"id": "a", "problem": "p"}),
    "bench_problem_int": _jsonl({"id": "a", "problem": 7, "answer": "5"}),
    "bench_answer_dict": _jsonl({"id": "a", "problem": "p", "answer": {"x": 1}}),
    "bench_answer_null": _jsonl({"id": "a", "problem": "p", "answer": None}),
    "bench_dup": _jsonl(
        {"id": "a", "problem": "p", "answer": "1"}, {"id": "a", "problem": "q", "answer": "2"}
    ),
    "bench_cjk": _jsonl({"id": "c", "problem": CJK, "answer": "5"}),
    "resp": _jsonl({"id": "a", "response": "\\boxed{5}"}, {"id": "b", "response": "\\boxed{8}"}),
    "resp_cjk": _jsonl({"id": "c", "response": CJK + " \\boxed{5}"}),
    "resp_huge": _jsonl({"id": "a", "response": "x" * 300_000 + " \\boxed{5}"}),
    "resp_no_response": _jsonl({"id": "a"}),
    "resp_unknown_id": _jsonl({"id": "zz", "response": "5"}),
    "resp_list": _jsonl({"id": "a", "response": ["5"]}),
    "resp_sample_str": _jsonl({"id": "a", "response": "5", "sample": "x"}),
    "resp_sample_neg": _jsonl({"id": "a", "response": "5", "sample": -1}),
    "resp_sample_bool": _jsonl({"id": "a", "response": "5", "sample": True}),
    "resp_dup": _jsonl({"id": "a", "response": "5", "sample": 0}, {"id": "a", "response": "6", "sample": 0}),
    "resp_ids_str": _jsonl({"id": "a", "response": "5", "token_ids": ["1", "2"]}),
    "resp_ids_neg": _jsonl({"id": "a", "response": "5", "token_ids": [1, -2]}),
    "resp_ids_oov": _jsonl({"id": "a", "response": "5", "token_ids": [1, 999_999]}),
    "resp_id_dict": _jsonl({"id": {"a": 1}, "response": "5"}),
    "resp_mode_int": _jsonl({"id": "a", "response": "5", "mode": 3}),
    "resp_mode_m": _jsonl({"id": "a", "response": "5", "mode": "m"}),
    "resp_mode_m2": _jsonl({"id": "a", "response": "5", "mode": "m"}),
    "nomodel": None,
    "badconfig/config.json": "{not json",
    "notok/config.json": json.dumps({"model_type": "qwen3"}),
    "prev/results.jsonl": _jsonl({"mode": "memento", "id": "a", "sample": 0, "correct": True}),
    "prev/run_config.json": json.dumps({"benchmark": "bench", "model": "/elsewhere"}),
    # generate / bench
    "prompts_none": _jsonl({"text": "hi"}),
    "prompts_msgs_str": _jsonl({"messages": "hi"}),
    "prompts_msgs_empty": _jsonl({"messages": []}),
    "prompts_no_role": _jsonl({"messages": [{"content": "hi"}]}),
    "prompts_content_int": _jsonl({"messages": [{"role": "user", "content": 5}]}),
    "prompts_msg_str": _jsonl({"messages": ["hi"]}),
    "prompts_empty_prompt": _jsonl({"prompt": ""}),
    "prompts_cjk": _jsonl({"messages": [{"role": "user", "content": CJK}]}),
    "prompts_long": _jsonl({"prompt": "a " * 80}),
    "replay_none": _jsonl({"nothing": 1}),
    "replay_ids_str": _jsonl({"token_ids": ["1", "2", "3"]}),
    "replay_ids_float": _jsonl({"token_ids": [1.5, 2, 3]}),
    "replay_ids_neg": _jsonl({"token_ids": [1, -2, 3]}),
    "replay_ids_empty": _jsonl({"token_ids": []}),
    "replay_ids_bool": _jsonl({"token_ids": [True, False, True]}),
    "replay_ids_oov": _jsonl({"token_ids": [1, 2, 999_999], "prompt_len": 1}),
    "replay_ids_one": _jsonl({"token_ids": [5]}),
    "replay_cut0": _jsonl({"token_ids": [1, 2, 3], "prompt_len": 0}),
    "replay_cut_all": _jsonl({"token_ids": [1, 2, 3], "prompt_len": 3}),
    "replay_cut_str": _jsonl({"token_ids": [1, 2, 3], "prompt_len": "1"}),
    "replay_text_empty": _jsonl({"text": ""}),
    "replay_text_int": _jsonl({"text": 5}),
    "replay_prompt_int": _jsonl({"text": "a", "prompt": 5}),
    "replay_bad_trace": _jsonl({"problem": "p", "blocks": [{"reasoning": 1}]}),
    "replay_cjk": _jsonl({"text": "<think><|block_start|>中文<|block_end|></think>5"}),
    # kv
    "gen": _jsonl({"id": "g", "text": "<think><|block_start|>a b<|block_end|></think>5"}),
    "gen_cjk": _jsonl({"id": "g", "text": f"<think><|block_start|>{CJK}<|block_end|></think>5"}),
    "gen_none": _jsonl({"nothing": 1}),
    "gen_msgs_user_last": _jsonl({"messages": [{"role": "user", "content": "hi"}]}),
    "gen_msgs_no_role": _jsonl({"messages": [{"content": "hi"}]}),
    "gen_segments_bad": _jsonl({"segments": [{"type": "weird", "text": "x"}]}),
    "gen_segments_str": _jsonl({"segments": ["x"]}),
    "gen_trace_bad": _jsonl({"problem": "p", "blocks": "x"}),
    "gen_problem_int": _jsonl({"text": "a", "problem": 5}),
    "gen_empty.json": "[]",
    "kvconfig.json": json.dumps({"hidden_size": 64}),
    # train
    "traces": _jsonl(MEMENTO_TRACE),
    "traces_no_blocks": _jsonl({"problem": "p", "answer": "a"}),
    "traces_blocks_str": _jsonl({"problem": "p", "blocks": "x"}),
    "traces_block_int": _jsonl({"problem": "p", "blocks": [{"reasoning": 1, "memento": "m"}]}),
    "train_unknown.yaml": "model: x\ndata: y\noutput_dir: z\nlearning_rate: 3\n",
    "train_bad.yaml": "model: [unclosed\n",
    "train_list.yaml": "- a\n- b\n",
}


@dataclass(frozen=True)
class Row:
    command: str  # for the per-command tally
    case: str  # the class of bad input, in words
    argv: str  # the command line after `memento`, with {placeholders}
    code: int  # expected exit status
    fragment: str  # must appear in the message (stderr)
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables (name, value)


R = Row
# fmt: off
ROWS: list[Row] = [
    # ---------------------------------------------------------------- annotate
    R("annotate", "missing file", "annotate {tmp}/missing.jsonl -o {out}", 2, "does not exist"),
    R("annotate", "empty file", "annotate {empty} -o {out}", 2, "no rows"),
    R("annotate", "blank lines only", "annotate {blank} -o {out}", 2, "no rows"),
    R("annotate", "binary file", "annotate {binary} -o {out}", 2, "not UTF-8"),
    R("annotate", "line not JSON", "annotate {notjson} -o {out}", 2, "not valid JSON"),
    R("annotate", "line is an array", "annotate {array} -o {out}", 2, "expected a JSON object"),
    R("annotate", "line is a string", "annotate {string} -o {out}", 2, "expected a JSON object"),
    R("annotate", "folder, not a dataset", "annotate {adir} -o {out}", 2, "not a datasets.save_to_disk"),
    R("annotate", "cot is a number", "annotate {cot_int} -o {out}", 2, "field 'cot' is int"),
    R("annotate", "problem is a list", "annotate {problem_list} -o {out}", 2, "field 'problem' is list"),
    R("annotate", "wrong field names", "annotate {wrong_fields} -o {out}", 2, "--cot-field"),
    R("annotate", "--cot-field absent", "annotate {raw} -o {out} --cot-field nope", 2, "no field 'nope'"),
    R("annotate", "--problem-field absent", "annotate {raw} -o {out} --problem-field q", 2, "no field 'q'"),
    R("annotate", "--id-field absent", "annotate {raw} -o {out} --id-field uid", 2, "no field 'uid'"),
    R("annotate", "id is an object", "annotate {id_dict} -o {out}", 2, "expected a string or an integer"),
    R("annotate", "duplicate ids", "annotate {dup_ids} -o {out}", 2, "duplicate id"),
    R("annotate", "only CJK traces", "annotate {cjk_only} -o {out}", 2, "cjk_characters 1"),
    R("annotate", "no closing think tag", "annotate {unclosed} -o {out}", 2, "--allow-incomplete"),
    R("annotate", "conversations not a list", "annotate {conv_dict} -o {out}", 2, "expected a list"),
    R("annotate", "huge trace over --max-chars", "annotate {raw_huge} -o {out} --max-chars 1000", 2, "too_long 1"),
    R("annotate", ".json not JSON", "annotate {bad_json} -o {out}", 2, "not valid JSON"),
    R("annotate", ".json not a list", "annotate {scalar_json} -o {out}", 2, "expected a JSON list"),
    R("annotate", "corrupt parquet", "annotate {bad_parquet} -o {out}", 2, "cannot read parquet"),
    R("annotate", "--shard out of range", "annotate {raw} -o {out} --shard 2/2", 2, "--shard"),
    R("annotate", "--shard not i/n", "annotate {raw} -o {out} --shard x", 2, "--shard"),
    R("annotate", "--workers 0", "annotate {raw} -o {out} --workers 0", 2, "--workers must be >= 1"),
    R("annotate", "--limit 0", "annotate {raw} -o {out} --limit 0", 2, "--limit must be >= 1"),
    R("annotate", "--limit negative", "annotate {raw} -o {out} --limit -3", 2, "--limit must be >= 1"),
    R("annotate", "--min-block-tokens negative", "annotate {raw} -o {out} --min-block-tokens -1", 2, "--min-block-tokens"),
    R("annotate", "--variance-penalty negative", "annotate {raw} -o {out} --variance-penalty -0.5", 2, "--variance-penalty"),
    R("annotate", "--max-iterations 0", "annotate {raw} -o {out} --max-iterations 0", 2, "--max-iterations"),
    R("annotate", "--score-threshold 11", "annotate {raw} -o {out} --score-threshold 11", 2, "--score-threshold"),
    R("annotate", "--concurrency 0", "annotate {raw} -o {out} --concurrency 0", 2, "--concurrency"),
    R("annotate", "--timeout 0", "annotate {raw} -o {out} --timeout 0", 2, "--timeout"),
    R("annotate", "--max-attempts 0", "annotate {raw} -o {out} --max-attempts 0", 2, "--max-attempts"),
    R("annotate", "--min-chars negative", "annotate {raw} -o {out} --min-chars -1", 2, "--min-chars"),
    R("annotate", "--max-chars < --min-chars", "annotate {raw} -o {out} --min-chars 10 --max-chars 5", 2, "--max-chars"),
    R("annotate", "--max-consecutive-failures 0", "annotate {raw} -o {out} --max-consecutive-failures 0", 2, "--max-consecutive-failures"),
    R("annotate", "unknown --backend", "annotate {raw} -o {out} --backend bogus", 2, "backend must be one of"),
    R("annotate", "openai without a key", "annotate {raw} -o {out} --backend openai", 2, "no API key",
      env=(("OPENAI_API_KEY", ""),)),  # fmt: skip
    R("annotate", "endpoint unreachable", "annotate {raw} -o {out} --backend openai --api-key x "
      "--base-url http://127.0.0.1:9/v1", 2, "cannot reach"),  # fmt: skip
    R("annotate", "-o is a file", "annotate {raw} -o {afile}", 2, "is a file"),
    R("annotate", "--tokenizer missing", "annotate {raw} -o {out} --tokenizer {tmp}/nope", 2, "no such directory"),
    R("annotate", "--tokenizer not a tokenizer", "annotate {raw} -o {out} --tokenizer {adir}", 2, "cannot load"),
    R("annotate", "unknown flag", "annotate {raw} -o {out} --colour blue", 2, "No such option"),
    # ---------------------------------------------------------------- eval
    R("eval", "benchmark missing", "eval {tmp}/nope.jsonl --responses {resp} -o {out}", 2, "no such file"),
    R("eval", "benchmark empty", "eval {empty} --responses {resp} -o {out}", 2, "the file is empty"),
    R("eval", "benchmark blank lines", "eval {blank} --responses {resp} -o {out}", 2, "no problems found"),
    R("eval", "benchmark binary", "eval {binary} --responses {resp} -o {out}", 2, "not UTF-8"),
    R("eval", "benchmark line not JSON", "eval {notjson} --responses {resp} -o {out}", 2, "not valid JSON"),
    R("eval", "benchmark line an array", "eval {array} --responses {resp} -o {out}", 2, "expected a JSON object"),
    R("eval", "benchmark is a folder", "eval {adir} --responses {resp} -o {out}", 2, "is a directory"),
    R("eval", "benchmark without problem", "eval {bench_no_problem} --responses {resp} -o {out}", 2, "--problem-field"),
    R("eval", "benchmark without answer", "eval {bench_no_answer} --responses {resp} -o {out}", 2, "--answer-field"),
    R("eval", "problem is a number", "eval {bench_problem_int} --responses {resp} -o {out}", 2, "non-empty string"),
    R("eval", "gold answer an object", "eval {bench_answer_dict} --responses {resp} -o {out}", 2, "gold answer"),
    R("eval", "gold answer null", "eval {bench_answer_null} --responses {resp} -o {out}", 2, "gold answer"),
    R("eval", "duplicate benchmark ids", "eval {bench_dup} --responses {resp} -o {out}", 2, "duplicate id"),
    R("eval", "--problem-field absent", "eval {bench} --responses {resp} -o {out} --problem-field q", 2, "no field 'q'"),
    R("eval", "--kind unknown", "eval {bench} --responses {resp} -o {out} --kind poetry", 2, "unknown benchmark kind"),
    R("eval", "--kind choice on math", "eval {bench} --responses {resp} -o {out} --kind choice", 2, "gold letters"),
    R("eval", "neither --model nor --responses", "eval {bench} -o {out}", 2, "exactly one"),
    R("eval", "both --model and --responses", "eval {bench} --model {model} --responses {resp} -o {out}", 2, "exactly one"),
    R("eval", "responses missing", "eval {bench} --responses {tmp}/r.jsonl -o {out}", 2, "no such file"),
    R("eval", "responses empty", "eval {bench} --responses {empty} -o {out}", 2, "the file is empty"),
    R("eval", "responses blank lines", "eval {bench} --responses {blank} -o {out}", 2, "no responses"),
    R("eval", "responses binary", "eval {bench} --responses {binary} -o {out}", 2, "not UTF-8"),
    R("eval", "responses not JSON", "eval {bench} --responses {notjson} -o {out}", 2, "not valid JSON"),
    R("eval", "responses a folder", "eval {bench} --responses {adir} -o {out}", 2, "is a directory"),
    R("eval", "response missing", "eval {bench} --responses {resp_no_response} -o {out}", 2, "needs 'id' and 'response'"),
    R("eval", "id not in benchmark", "eval {bench} --responses {resp_unknown_id} -o {out}", 2, "not in benchmark"),
    R("eval", "response a list", "eval {bench} --responses {resp_list} -o {out}", 2, "'response' must be a string"),
    R("eval", "sample a string", "eval {bench} --responses {resp_sample_str} -o {out}", 2, "'sample' must be"),
    R("eval", "sample negative", "eval {bench} --responses {resp_sample_neg} -o {out}", 2, "'sample' must be"),
    R("eval", "sample a bool", "eval {bench} --responses {resp_sample_bool} -o {out}", 2, "'sample' must be"),
    R("eval", "sample twice", "eval {bench} --responses {resp_dup} -o {out}", 2, "duplicate response"),
    R("eval", "token ids strings", "eval {bench} --responses {resp_ids_str} -o {out}", 2, "'token_ids' must be"),
    R("eval", "token ids negative", "eval {bench} --responses {resp_ids_neg} -o {out}", 2, "'token_ids' must be"),
    R("eval", "id an object", "eval {bench} --responses {resp_id_dict} -o {out}", 2, "'id' must be"),
    R("eval", "mode a number", "eval {bench} --responses {resp_mode_int} -o {out}", 2, "'mode' must be a string"),
    R("eval", "same file twice", "eval {bench} --responses {resp} --responses {resp} -o {out}", 2, "given twice"),
    R("eval", "same key in two files", "eval {bench} --responses {resp_mode_m} --responses {resp_mode_m2} -o {out}", 2, "is also at"),
    R("eval", "--mode with two files", "eval {bench} --responses {resp} --responses {resp_mode_m} --mode x -o {out}", 2, "--mode names the column"),
    R("eval", "--temperature with responses", "eval {bench} --responses {resp} -o {out} --temperature 1", 2, "--temperature applies to --model"),
    R("eval", "--n with responses", "eval {bench} --responses {resp} -o {out} --n 4", 2, "--n applies to --model"),
    R("eval", "--device with responses", "eval {bench} --responses {resp} -o {out} --device cuda", 2, "--device applies to --model"),
    R("eval", "--tokenizer missing", "eval {bench} --responses {resp} -o {out} --tokenizer {tmp}/t", 2, "no such directory"),
    R("eval", "--tokenizer not a tokenizer", "eval {bench} --responses {resp} -o {out} --tokenizer {adir}", 2, "cannot load a tokenizer"),
    R("eval", "token ids outside vocab", "eval {bench} --responses {resp_ids_oov} -o {out} --tokenizer {model}", 2, "outside the tokenizer's vocabulary"),
    R("eval", "--limit 0", "eval {bench} --responses {resp} -o {out} --limit 0", 2, "--limit must be >= 1"),
    R("eval", "--limit -1", "eval {bench} --responses {resp} -o {out} --limit -1", 2, "--limit must be >= 1"),
    R("eval", "--plot-id unknown", "eval {bench} --responses {resp} -o {out} --plot-id zz", 2, "--plot-id 'zz'"),
    R("eval", "--model-config and --kv-preset", "eval {bench} --responses {resp} -o {out} --model-config {kvconfig_json} --kv-preset qwen3-8b", 2, "at most one"),
    R("eval", "--kv-preset unknown", "eval {bench} --responses {resp} -o {out} --kv-preset nope", 2, "nope"),
    R("eval", "--model-config missing", "eval {bench} --responses {resp} -o {out} --model-config {tmp}/c.json", 2, "c.json"),
    R("eval", "--model-config lacks keys", "eval {bench} --responses {resp} -o {out} --model-config {kvconfig_json}", 2, "model config lacks"),
    R("eval", "--prompt-template without {problem}", "eval {bench} --responses {resp} -o {out} --prompt-template hi", 2, "{problem}"),
    R("eval", "-o is a file", "eval {bench} --responses {resp} -o {afile}", 2, "is a file"),
    R("eval", "--model missing", "eval {bench} --model {tmp}/nope -o {out}", 2, "no such directory"),
    R("eval", "--model a hub id", "eval {bench} --model Qwen/Qwen3-0.6B -o {out}", 2, "downloads nothing"),
    R("eval", "--model a file", "eval {bench} --model {afile} -o {out}", 2, "is a file"),
    R("eval", "--model not a model", "eval {bench} --model {nomodel} -o {out}", 2, "no config.json"),
    R("eval", "--model bad config.json", "eval {bench} --model {tmp}/badconfig -o {out}", 2, "not a readable JSON model config"),
    R("eval", "--model without tokenizer", "eval {bench} --model {tmp}/notok -o {out}", 2, "no tokenizer files"),
    R("eval", "--mode unknown", "eval {bench} --model {model} -o {out} --mode fast", 2, "--mode 'fast'"),
    R("eval", "--mode twice", "eval {bench} --model {model} -o {out} --mode full --mode full", 2, "--mode given twice"),
    R("eval", "--dtype unknown", "eval {bench} --model {model} -o {out} --dtype bogus", 2, "--dtype 'bogus'"),
    R("eval", "--device cuda here", "eval {bench} --model {model} -o {out} --device cuda", 2, "--device cuda"),
    R("eval", "--device unknown", "eval {bench} --model {model} -o {out} --device toaster", 2, "--device 'toaster'"),
    R("eval", "--batch-size 0", "eval {bench} --model {model} -o {out} --batch-size 0", 2, "--batch-size must be >= 1"),
    R("eval", "--batch-size -1", "eval {bench} --model {model} -o {out} --batch-size -1", 2, "--batch-size must be >= 1"),
    R("eval", "--kv-budget-tokens 0", "eval {bench} --model {model} -o {out} --kv-budget-tokens 0", 2, "--kv-budget-tokens must be >= 2"),
    R("eval", "--n 0", "eval {bench} --model {model} -o {out} --n 0", 2, "--n must be >= 1"),
    R("eval", "--max-new-tokens 0", "eval {bench} --model {model} -o {out} --max-new-tokens 0", 2, "--max-new-tokens"),
    R("eval", "--temperature negative", "eval {bench} --model {model} -o {out} --temperature -1", 2, "temperature"),
    R("eval", "--top-p 0", "eval {bench} --model {model} -o {out} --top-p 0", 2, "top_p"),
    R("eval", "--top-p 1.5", "eval {bench} --model {model} -o {out} --top-p 1.5", 2, "top_p"),
    R("eval", "--top-k negative", "eval {bench} --model {model} -o {out} --top-k -1", 2, "top_k"),
    R("eval", "--prompt-template (model)", "eval {bench} --model {model} -o {out} --prompt-template x", 2, "{problem}"),
    R("eval", "--tokenizer with --model", "eval {bench} --model {model} -o {out} --tokenizer {model}", 2, "--tokenizer is for --responses"),
    R("eval", "results made with other settings", "eval {bench} --model {model} -o {tmp}/prev", 2, "different settings"),
    R("eval", "unknown flag", "eval {bench} --responses {resp} -o {out} --colour blue", 2, "No such option"),
    # ---------------------------------------------------------------- generate
    R("generate", "no prompt", "generate --model {model}", 2, "exactly one of --prompt"),
    R("generate", "--prompt and --prompts", "generate --model {model} --prompt hi --prompts {empty}", 2, "exactly one of --prompt"),
    R("generate", "empty --prompt", "generate --model {model} --prompt ''", 2, "--prompt is empty"),
    R("generate", "blank --prompt", "generate --model {model} --prompt '   '", 2, "--prompt is empty"),
    R("generate", "--prompts missing", "generate --model {model} --prompts {tmp}/p.jsonl", 2, "no such file"),
    R("generate", "--prompts empty", "generate --model {model} --prompts {empty}", 2, "the file is empty"),
    R("generate", "--prompts blank lines", "generate --model {model} --prompts {blank}", 2, "holds no records"),
    R("generate", "--prompts binary", "generate --model {model} --prompts {binary}", 2, "not UTF-8"),
    R("generate", "--prompts not JSON", "generate --model {model} --prompts {notjson}", 2, "not valid JSON"),
    R("generate", "--prompts array line", "generate --model {model} --prompts {array}", 2, "expected a JSON object"),
    R("generate", "--prompts a folder", "generate --model {model} --prompts {adir}", 2, "is a directory"),
    R("generate", "no messages/prompt", "generate --model {model} --prompts {prompts_none}", 2, "expected {\"messages\""),
    R("generate", "messages a string", "generate --model {model} --prompts {prompts_msgs_str}", 2, "non-empty list"),
    R("generate", "messages empty", "generate --model {model} --prompts {prompts_msgs_empty}", 2, "non-empty list"),
    R("generate", "message without role", "generate --model {model} --prompts {prompts_no_role}", 2, "needs a 'role'"),
    R("generate", "content a number", "generate --model {model} --prompts {prompts_content_int}", 2, "needs a 'content'"),
    R("generate", "message a string", "generate --model {model} --prompts {prompts_msg_str}", 2, "needs a 'role'"),
    R("generate", "empty prompt record", "generate --model {model} --prompts {prompts_empty_prompt}", 2, "non-empty"),
    R("generate", "--raw with --prompts", "generate --model {model} --prompts {prompts_cjk} --raw", 2, "--raw applies to --prompt"),
    R("generate", "--logprobs without --json", "generate --model {model} --prompt hi --logprobs", 2, "--logprobs"),
    R("generate", "--mode unknown", "generate --model {model} --prompt hi --mode fast", 2, "--mode 'fast'"),
    R("generate", "full + --keep-last-n-blocks", "generate --model {model} --prompt hi --mode full --keep-last-n-blocks 2", 2, "no effect with --mode full"),
    R("generate", "full + --mask-delimiters", "generate --model {model} --prompt hi --mode full --mask-delimiters", 2, "no effect with --mode full"),
    R("generate", "full + --keep-last-block-for-answer", "generate --model {model} --prompt hi --mode full --keep-last-block-for-answer", 2, "no effect with --mode full"),
    R("generate", "--keep-last-n-blocks -2", "generate --model {model} --prompt hi --keep-last-n-blocks -2", 2, "keep_last_n_blocks"),
    R("generate", "--max-block-tokens -1", "generate --model {model} --prompt hi --max-block-tokens -1", 2, "max_block_tokens"),
    R("generate", "--temperature negative", "generate --model {model} --prompt hi --temperature -1", 2, "temperature"),
    R("generate", "--top-p 0", "generate --model {model} --prompt hi --top-p 0", 2, "top_p"),
    R("generate", "--top-k negative", "generate --model {model} --prompt hi --top-k -1", 2, "top_k"),
    R("generate", "--min-p 1.5", "generate --model {model} --prompt hi --min-p 1.5", 2, "min_p"),
    R("generate", "--max-new-tokens 0", "generate --model {model} --prompt hi --max-new-tokens 0", 2, "max_new_tokens"),
    R("generate", "--n 0", "generate --model {model} --prompt hi --n 0", 2, "n must be >= 1"),
    R("generate", "--dtype unknown", "generate --model {model} --prompt hi --dtype bogus", 2, "--dtype 'bogus'"),
    R("generate", "--device cuda here", "generate --model {model} --prompt hi --device cuda", 2, "--device cuda"),
    R("generate", "--device cuda:7 (no such GPU)", "generate --model {model} --prompt hi --device cuda:7", 2, "--device cuda:7"),
    R("generate", "--device unknown", "generate --model {model} --prompt hi --device toaster", 2, "--device 'toaster'"),
    R("generate", "--max-batch-size 0", "generate --model {model} --prompt hi --max-batch-size 0", 2, "--max-batch-size must be >= 1"),
    R("generate", "--kv-budget-tokens 0", "generate --model {model} --prompt hi --kv-budget-tokens 0", 2, "--kv-budget-tokens must be >= 2"),
    R("generate", "--kv-budget-tokens 1", "generate --model {model} --prompt hi --kv-budget-tokens 1", 2, "--kv-budget-tokens must be >= 2"),
    R("generate", "--model missing", "generate --model {tmp}/nope --prompt hi", 2, "no such directory"),
    R("generate", "--model a hub id", "generate --model Qwen/Qwen3-0.6B --prompt hi", 2, "downloads nothing"),
    R("generate", "--model a file", "generate --model {afile} --prompt hi", 2, "is a file"),
    R("generate", "--model not a model", "generate --model {nomodel} --prompt hi", 2, "no config.json"),
    R("generate", "--model bad config.json", "generate --model {tmp}/badconfig --prompt hi", 2, "not a readable JSON"),
    R("generate", "--model without tokenizer", "generate --model {tmp}/notok --prompt hi", 2, "no tokenizer files"),
    R("generate", "unknown flag", "generate --model {model} --prompt hi --colour blue", 2, "No such option"),
    R("generate", "CJK prompt (works)", "generate --model {model} --prompts {prompts_cjk} --max-new-tokens 2", 0, "tokens"),
    R("generate", "prompt past max positions (warns)", "generate --model {short_model} --prompts {prompts_long} --max-new-tokens 1", 0, "max_position_embeddings"),
    # ---------------------------------------------------------------- bench
    R("bench", "neither --model nor --toy", "bench --replay {gen}", 2, "exactly one of --model"),
    R("bench", "--model and --toy", "bench --replay {gen} --toy --model {model}", 2, "exactly one of --model"),
    R("bench", "--replay missing", "bench --replay {tmp}/r.jsonl --toy", 2, "no such file"),
    R("bench", "--replay empty", "bench --replay {empty} --toy", 2, "the file is empty"),
    R("bench", "--replay blank lines", "bench --replay {blank} --toy", 2, "holds no records"),
    R("bench", "--replay binary", "bench --replay {binary} --toy", 2, "not UTF-8"),
    R("bench", "--replay not JSON", "bench --replay {notjson} --toy", 2, "not valid JSON"),
    R("bench", "--replay array line", "bench --replay {array} --toy", 2, "expected a JSON object"),
    R("bench", "--replay a folder", "bench --replay {adir} --toy", 2, "is a directory"),
    R("bench", "no known fields", "bench --replay {replay_none} --toy", 2, "expected \"token_ids\""),
    R("bench", "token ids strings", "bench --replay {replay_ids_str} --toy", 2, "'token_ids' must be"),
    R("bench", "token ids floats", "bench --replay {replay_ids_float} --toy", 2, "'token_ids' must be"),
    R("bench", "token ids negative", "bench --replay {replay_ids_neg} --toy", 2, "'token_ids' must be"),
    R("bench", "token ids empty", "bench --replay {replay_ids_empty} --toy", 2, "'token_ids' must be"),
    R("bench", "token ids booleans", "bench --replay {replay_ids_bool} --toy", 2, "'token_ids' must be"),
    R("bench", "token ids outside vocab", "bench --replay {replay_ids_oov} --toy", 2, "outside the model's vocabulary"),
    R("bench", "nothing after the prompt", "bench --replay {replay_ids_one} --toy", 2, "no output after the prompt"),
    R("bench", "prompt_len 0", "bench --replay {replay_cut0} --toy", 2, "prompt_len"),
    R("bench", "prompt_len = length", "bench --replay {replay_cut_all} --toy", 2, "prompt_len"),
    R("bench", "prompt_len a string", "bench --replay {replay_cut_str} --toy", 2, "prompt_len"),
    R("bench", "text empty", "bench --replay {replay_text_empty} --toy", 2, "'text' must be"),
    R("bench", "text a number", "bench --replay {replay_text_int} --toy", 2, "'text' must be"),
    R("bench", "prompt a number", "bench --replay {replay_prompt_int} --toy", 2, "'prompt' must be"),
    R("bench", "malformed trace", "bench --replay {replay_bad_trace} --toy", 2, "blocks[0]"),
    R("bench", "--repeat 0", "bench --replay {gen} --toy --repeat 0", 2, "--repeat must be >= 1"),
    R("bench", "--repeat -1", "bench --replay {gen} --toy --repeat -1", 2, "--repeat must be >= 1"),
    R("bench", "--modes empty", "bench --replay {gen} --toy --modes ,", 2, "--modes is empty"),
    R("bench", "--modes unknown", "bench --replay {gen} --toy --modes full,fast", 2, "--modes 'fast'"),
    R("bench", "--modes twice", "bench --replay {gen} --toy --modes full,full", 2, "names a mode twice"),
    R("bench", "--dtype unknown", "bench --replay {gen} --toy --dtype bogus", 2, "--dtype 'bogus'"),
    R("bench", "--device cuda here", "bench --replay {gen} --toy --device cuda", 2, "--device cuda"),
    R("bench", "--max-batch-size 0", "bench --replay {gen} --toy --max-batch-size 0", 2, "--max-batch-size must be >= 1"),
    R("bench", "--kv-budget-tokens 1", "bench --replay {gen} --toy --kv-budget-tokens 1", 2, "--kv-budget-tokens must be >= 2"),
    R("bench", "--keep-last-n-blocks -5", "bench --replay {gen} --toy --keep-last-n-blocks -5", 2, "keep_last_n_blocks"),
    R("bench", "--model missing", "bench --replay {gen} --model {tmp}/nope", 2, "no such directory"),
    R("bench", "--model a hub id", "bench --replay {gen} --model Qwen/Qwen3-0.6B", 2, "downloads nothing"),
    R("bench", "--model not a model", "bench --replay {gen} --model {nomodel}", 2, "no config.json"),
    R("bench", "unknown flag", "bench --replay {gen} --toy --colour blue", 2, "No such option"),
    R("bench", "CJK text (works)", "bench --replay {replay_cjk} --model {model} --modes memento --json", 0, ""),
    # ---------------------------------------------------------------- kv
    R("kv", "file missing", "kv {tmp}/g.jsonl", 2, "no such file"),
    R("kv", "file empty", "kv {empty}", 2, "the file is empty"),
    R("kv", "blank lines only", "kv {blank}", 2, "no records found"),
    R("kv", "binary file", "kv {binary}", 2, "not UTF-8"),
    R("kv", "line not JSON", "kv {notjson}", 2, "not valid JSON"),
    R("kv", "line an array", "kv {array}", 2, "expected a JSON object"),
    R("kv", "a folder", "kv {adir}", 2, "is a directory"),
    R("kv", "no generation", "kv {gen_none}", 2, "no generation found"),
    R("kv", "messages end with the user", "kv {gen_msgs_user_last}", 2, "must end with the assistant"),
    R("kv", "message without role", "kv {gen_msgs_no_role}", 2, "messages[0]"),
    R("kv", "unknown segment type", "kv {gen_segments_bad}", 2, "unknown type"),
    R("kv", "segment a string", "kv {gen_segments_str}", 2, "segment 0 is str"),
    R("kv", "trace blocks a string", "kv {gen_trace_bad}", 2, "'blocks' must be a list"),
    R("kv", "problem a number", "kv {gen_problem_int}", 2, "'problem' must be a string"),
    R("kv", ".json not JSON", "kv {bad_json}", 2, "not valid JSON"),
    R("kv", ".json empty list", "kv {gen_empty_json}", 2, "empty list"),
    R("kv", "--preset unknown", "kv {gen} --preset nope", 2, "nope"),
    R("kv", "--model-config missing", "kv {gen} --model-config {tmp}/c.json", 2, "c.json"),
    R("kv", "--model-config lacks keys", "kv {gen} --model-config {kvconfig_json}", 2, "model config lacks"),
    R("kv", "--preset and --model-config", "kv {gen} --preset qwen3-8b --model-config {kvconfig_json}", 2, "at most one"),
    R("kv", "--plot in a missing folder", "kv {gen} --plot {tmp}/missing/dir/x.png", 2, "does not exist"),
    R("kv", "--plot a folder", "kv {gen} --plot {adir}", 2, "is a directory"),
    R("kv", "--plot unknown format", "kv {gen} --plot {tmp}/x.bmpx", 2, "unknown image format"),
    R("kv", "--plot-index out of range", "kv {gen} --plot {tmp}/x.png --plot-index 5", 2, "--plot-index 5"),
    R("kv", "--plot-index without --plot", "kv {gen} --plot-index 1", 2, "--plot-index picks"),
    R("kv", "--tokenizer missing", "kv {gen} --tokenizer {tmp}/t", 2, "no such directory"),
    R("kv", "--tokenizer not a tokenizer", "kv {gen} --tokenizer {adir}", 2, "cannot load a tokenizer"),
    R("kv", "--keep-last-n-blocks -2", "kv {gen} --keep-last-n-blocks -2", 2, "keep_last_n_blocks"),
    R("kv", "unknown flag", "kv {gen} --colour blue", 2, "No such option"),
    R("kv", "CJK text (works)", "kv {gen_cjk} --json", 0, ""),
    # ---------------------------------------------------------------- train
    R("train", "nothing given", "train", 2, "missing required option"),
    R("train", "--model a hub id", "train --model Qwen/Qwen3-0.6B --data {traces} --output-dir {out}", 2, "downloads nothing"),
    R("train", "--model missing", "train --model {tmp}/nope --data {traces} --output-dir {out}", 2, "no such directory"),
    R("train", "--model a file", "train --model {afile} --data {traces} --output-dir {out}", 2, "is a file"),
    R("train", "--model not a model", "train --model {nomodel} --data {traces} --output-dir {out}", 2, "no config.json"),
    R("train", "--data missing", "train --model {model} --data {tmp}/d.jsonl --output-dir {out}", 2, "no such file"),
    R("train", "--data empty", "train --model {model} --data {empty} --output-dir {out}", 2, "the file is empty"),
    R("train", "--data blank lines", "train --model {model} --data {blank} --output-dir {out}", 2, "no traces"),
    R("train", "--data binary", "train --model {model} --data {binary} --output-dir {out}", 2, "not UTF-8"),
    R("train", "--data not JSON", "train --model {model} --data {notjson} --output-dir {out}", 2, "not valid JSON"),
    R("train", "--data array line", "train --model {model} --data {array} --output-dir {out}", 2, "expected a JSON object"),
    R("train", "--data a folder", "train --model {model} --data {adir} --output-dir {out}", 2, "is a directory"),
    R("train", "trace without blocks", "train --model {model} --data {traces_no_blocks} --output-dir {out}", 2, "missing field 'blocks'"),
    R("train", "blocks a string", "train --model {model} --data {traces_blocks_str} --output-dir {out}", 2, "'blocks' must be a list"),
    R("train", "reasoning a number", "train --model {model} --data {traces_block_int} --output-dir {out}", 2, "blocks[0]"),
    R("train", "--output-dir a file", "train --model {model} --data {traces} --output-dir {afile}", 2, "is a file"),
    R("train", "--stage unknown", "train --model {model} --data {traces} --output-dir {out} --stage two", 2, "stage must be one of"),
    R("train", "--format unknown", "train --model {model} --data {traces} --output-dir {out} --format x", 2, "format must be one of"),
    R("train", "memento stage, control format", "train --model {model} --data {traces} --output-dir {out} --stage memento --format control", 2, "--format control"),
    R("train", "full stage + --keep-last-n-blocks", "train --model {model} --data {traces} --output-dir {out} --keep-last-n-blocks 1", 2, "no effect with --stage full"),
    R("train", "full stage + --masking-config", "train --model {model} --data {traces} --output-dir {out} --masking-config '{{}}'", 2, "no effect with --stage full"),
    R("train", "full stage + --mask-delimiters", "train --model {model} --data {traces} --output-dir {out} --stage full --mask-delimiters", 2, "no effect with --stage full"),
    R("train", "--masking-config not JSON", "train --model {model} --data {traces} --output-dir {out} --stage memento --masking-config '{{x'", 2, "--masking-config"),
    R("train", "--masking-config a list", "train --model {model} --data {traces} --output-dir {out} --stage memento --masking-config '[1]'", 2, "--masking-config must be a JSON object"),
    R("train", "--masking-config unknown key", "train --model {model} --data {traces} --output-dir {out} --stage memento --masking-config '{{\"keep\": 1}}'", 2, "unknown block-masking option"),
    R("train", "--masking-config restart_mode, stage full", "train --model {model} --data {traces} --output-dir {out} --stage full --masking-config '{{\"restart_mode\": true}}'", 2, "restart_mode"),
    R("train", "--max-length 0", "train --model {model} --data {traces} --output-dir {out} --max-length 0", 2, "max_length"),
    R("train", "--batch-size 0", "train --model {model} --data {traces} --output-dir {out} --batch-size 0", 2, "batch_size"),
    R("train", "--grad-accum 0", "train --model {model} --data {traces} --output-dir {out} --grad-accum 0", 2, "grad_accum"),
    R("train", "--save-steps 0", "train --model {model} --data {traces} --output-dir {out} --save-steps 0", 2, "save_steps"),
    R("train", "--logging-steps 0", "train --model {model} --data {traces} --output-dir {out} --logging-steps 0", 2, "logging_steps"),
    R("train", "--flex-threshold 0", "train --model {model} --data {traces} --output-dir {out} --flex-threshold 0", 2, "flex_threshold"),
    R("train", "--max-steps 0", "train --model {model} --data {traces} --output-dir {out} --max-steps 0", 2, "max_steps"),
    R("train", "--warmup-ratio 1.5", "train --model {model} --data {traces} --output-dir {out} --warmup-ratio 1.5", 2, "warmup_ratio"),
    R("train", "--lr 0", "train --model {model} --data {traces} --output-dir {out} --lr 0", 2, "lr and epochs"),
    R("train", "--epochs 0", "train --model {model} --data {traces} --output-dir {out} --epochs 0", 2, "lr and epochs"),
    R("train", "--overlong unknown", "train --model {model} --data {traces} --output-dir {out} --overlong cut", 2, "overlong must be one of"),
    R("train", "--attention unknown", "train --model {model} --data {traces} --output-dir {out} --attention fast", 2, "attention must be one of"),
    R("train", "--attention flex without CUDA", "train --model {model} --data {traces} --output-dir {out} --attention flex", 2, "needs CUDA"),
    R("train", "--bf16 without CUDA", "train --model {model} --data {traces} --output-dir {out} --bf16", 2, "bf16"),
    R("train", "--resume not a checkpoint", "train --model {model} --data {traces} --output-dir {out} --resume {adir}", 2, "not a checkpoint"),
    R("train", "--config missing", "train --config {tmp}/c.yaml", 2, "cannot read config file"),
    R("train", "--config unknown key", "train --config {train_unknown_yaml}", 2, "unknown training option"),
    R("train", "--config not YAML", "train --config {train_bad_yaml}", 2, "not valid yaml"),
    R("train", "--config a list", "train --config {train_list_yaml}", 2, "expected a mapping"),
    R("train", "--config binary", "train --config {binary}", 2, "not valid"),
    R("train", "unknown flag", "train --model {model} --colour blue", 2, "No such option"),
    # ---------------------------------------------------------------- vllm-serve --dry-run
    R("vllm-serve", "--memento-config not JSON", "vllm-serve {model} --dry-run --python /py --memento-config '{{x'", 2, "--memento-config is not valid JSON"),
    R("vllm-serve", "--memento-config a list", "vllm-serve {model} --dry-run --python /py --memento-config '[1]'", 2, "must be a JSON object"),
    R("vllm-serve", "unknown option", "vllm-serve {model} --dry-run --python /py --memento-config '{{\"keep\": 1}}'", 2, "unknown memento option"),
    R("vllm-serve", "option of the wrong type", "vllm-serve {model} --dry-run --python /py --memento-config '{{\"keep_last_n_blocks\": \"a\"}}'", 2, "must be an int"),
    R("vllm-serve", "enable not a bool", "vllm-serve {model} --dry-run --python /py --memento-config '{{\"enable\": 1}}'", 2, "true or false"),
    R("vllm-serve", "marker token a list", "vllm-serve {model} --dry-run --python /py --memento-config '{{\"block_start_token\": [1]}}'", 2, "token string or id"),
    R("vllm-serve", "keep_last_n_blocks -5", "vllm-serve {model} --dry-run --python /py --memento-config '{{\"keep_last_n_blocks\": -5}}'", 2, "keep_last_n_blocks"),
    R("vllm-serve", "--port 0", "vllm-serve {model} --dry-run --python /py --port 0", 2, "--port must be in 1..65535"),
    R("vllm-serve", "--port 70000", "vllm-serve {model} --dry-run --python /py --port 70000", 2, "--port must be in 1..65535"),
    R("vllm-serve", "--device unknown", "vllm-serve {model} --dry-run --python /py --device tpu", 2, "--device 'tpu'"),
    R("vllm-serve", "valid options (works)", "vllm-serve {model} --dry-run --python /py --memento-config '{{\"keep_last_n_blocks\": 1}}'", 0, ""),
    R("vllm-serve", "--kv-cache-gib 0", "vllm-serve {model} --dry-run --python /py --kv-cache-gib 0", 2, "--kv-cache-gib must be > 0"),
    R("vllm-serve", "--kv-cache-gib negative", "vllm-serve {model} --dry-run --python /py --kv-cache-gib -2", 2, "--kv-cache-gib must be > 0"),
    # ---------------------------------------------------------------- serve (every row stops before a port opens)
    R("serve", "model missing", "serve {tmp}/nope", 2, "no such directory"),
    R("serve", "model a hub id", "serve Qwen/Qwen3-0.6B", 2, "downloads nothing"),
    R("serve", "model a file", "serve {afile}", 2, "is a file"),
    R("serve", "model not a model", "serve {nomodel}", 2, "no config.json"),
    R("serve", "model without tokenizer", "serve {tmp}/notok", 2, "no tokenizer files"),
    R("serve", "--dtype unknown", "serve {model} --dtype bogus", 2, "--dtype 'bogus'"),
    R("serve", "--device cuda here", "serve {model} --device cuda", 2, "--device cuda"),
    R("serve", "--kv-budget-tokens 1", "serve {model} --kv-budget-tokens 1", 2, "--kv-budget-tokens must be >= 2"),
    R("serve", "--max-batch-size 0", "serve {model} --max-batch-size 0", 2, "--max-batch-size must be >= 1"),
    R("serve", "--max-model-len 1", "serve {model} --max-model-len 1", 2, "--max-model-len must be >= 2"),
    R("serve", "--threads 0", "serve {model} --threads 0", 2, "--threads must be >= 1"),
    R("serve", "--port negative", "serve {model} --port -1", 2, "--port must be in"),
    R("serve", "--port 70000", "serve {model} --port 70000", 2, "--port must be in"),
    R("serve", "--api-key empty", "serve {model} --api-key ''", 2, "--api-key must not be empty"),
    R("serve", "--mode unknown", "serve {model} --mode fast", 2, "--mode must be one of"),
    R("serve", "--memento-config not JSON", "serve {model} --memento-config '{{x'", 2, "not valid JSON"),
    R("serve", "--memento-config a list", "serve {model} --memento-config '[1]'", 2, "expected a JSON object"),
    R("serve", "--memento-config unknown key", "serve {model} --memento-config '{{\"keep\": 1}}'", 2, "unknown block-masking option"),
    R("serve", "restart_mode without --mode restart", "serve {model} --memento-config '{{\"restart_mode\": true}}'", 2, "needs --mode restart"),
    R("serve", "--log-level unknown", "serve {model} --port 0 --log-level bogus", 2, "--log-level 'bogus'"),
    R("serve", "--host cannot be bound", "serve {model} --host 256.1.1.1", 2, "cannot listen there"),
    R("serve", "unknown flag", "serve {model} --colour blue", 2, "No such option"),
    # ---------------------------------------------------------------- rl (every row stops before a model loads)
    R("rl", "nothing given", "rl", 2, "missing required option"),
    R("rl", "--model a hub id", "rl --model Qwen/Qwen3-0.6B --prompts {bench} --output-dir {out}", 2, "downloads nothing"),
    R("rl", "--model missing", "rl --model {tmp}/nope --prompts {bench} --output-dir {out}", 2, "no such directory"),
    R("rl", "--model not a model", "rl --model {nomodel} --prompts {bench} --output-dir {out}", 2, "no config.json"),
    R("rl", "--prompts missing", "rl --model {model} --prompts {tmp}/p.jsonl --output-dir {out}", 2, "no such file"),
    R("rl", "--prompts empty", "rl --model {model} --prompts {empty} --output-dir {out}", 2, "the file is empty"),
    R("rl", "--prompts binary", "rl --model {model} --prompts {binary} --output-dir {out}", 2, "not UTF-8"),
    R("rl", "--prompts not JSON", "rl --model {model} --prompts {notjson} --output-dir {out}", 2, "not valid JSON"),
    R("rl", "--prompts without problem", "rl --model {model} --prompts {bench_no_problem} --output-dir {out}", 2, "--problem-field"),
    R("rl", "--eval-prompts missing", "rl --model {model} --prompts {bench} --output-dir {out} --eval-prompts {tmp}/e.jsonl", 2, "no such file"),
    R("rl", "--output-dir a file", "rl --model {model} --prompts {bench} --output-dir {afile}", 2, "is a file"),
    R("rl", "--steps 0", "rl --model {model} --prompts {bench} --output-dir {out} --steps 0", 2, "steps must be"),
    R("rl", "--group-size 0", "rl --model {model} --prompts {bench} --output-dir {out} --group-size 0", 2, "group_size"),
    R("rl", "--prompts-per-step 0", "rl --model {model} --prompts {bench} --output-dir {out} --prompts-per-step 0", 2, "prompts_per_step"),
    R("rl", "--lr negative", "rl --model {model} --prompts {bench} --output-dir {out} --lr -1", 2, "lr must be"),
    R("rl", "--temperature 0", "rl --model {model} --prompts {bench} --output-dir {out} --temperature 0", 2, "temperature"),
    R("rl", "--max-new-tokens 0", "rl --model {model} --prompts {bench} --output-dir {out} --max-new-tokens 0", 2, "max_new_tokens"),
    R("rl", "--micro-batch-size 0", "rl --model {model} --prompts {bench} --output-dir {out} --micro-batch-size 0", 2, "micro_batch_size"),
    R("rl", "--reward unknown", "rl --model {model} --prompts {bench} --output-dir {out} --reward nope", 2, "--reward must be"),
    R("rl", "--reward module missing", "rl --model {model} --prompts {bench} --output-dir {out} --reward nosuch_mod:f", 2, "nosuch_mod"),
    R("rl", "--step-reward not MODULE:FUNCTION", "rl --model {model} --prompts {bench} --output-dir {out} --step-reward nope", 2, "--step-reward must be"),
    R("rl", "--step-reward module missing", "rl --model {model} --prompts {bench} --output-dir {out} --step-reward nosuch_mod:f", 2, "nosuch_mod"),
    R("rl", "--step-weight negative", "rl --model {model} --prompts {bench} --output-dir {out} --step-weight -1", 2, "step_weight"),
    R("rl", "--mode restart", "rl --model {model} --prompts {bench} --output-dir {out} --mode restart", 2, "mode must be"),
    R("rl", "full mode + --keep-last-n-blocks", "rl --model {model} --prompts {bench} --output-dir {out} --mode full --keep-last-n-blocks 1", 2, "no effect with --mode full"),
    R("rl", "--masking-config unknown key", "rl --model {model} --prompts {bench} --output-dir {out} --masking-config '{{\"x\": 1}}'", 2, "unknown block-masking option"),
    R("rl", "--masking-config not JSON", "rl --model {model} --prompts {bench} --output-dir {out} --masking-config '{{x'", 2, "--masking-config"),
    R("rl", "--scale-rewards unknown", "rl --model {model} --prompts {bench} --output-dir {out} --scale-rewards x", 2, "scale_rewards"),
    R("rl", "--guard-tol negative", "rl --model {model} --prompts {bench} --output-dir {out} --guard-tol -1", 2, "guard_tol"),
    R("rl", "--device cuda here", "rl --model {model} --prompts {bench} --output-dir {out} --device cuda", 2, "--device cuda"),
    R("rl", "--threads 0", "rl --model {model} --prompts {bench} --output-dir {out} --threads 0", 2, "threads"),
    R("rl", "--resume not a checkpoint", "rl --model {model} --prompts {bench} --output-dir {out} --resume {adir}", 2, "not an rl checkpoint"),
    R("rl", "--config binary", "rl --config {binary}", 2, "not valid"),
    R("rl", "--config unknown key", "rl --config {train_unknown_yaml}", 2, "unknown"),
    R("rl", "unknown flag", "rl --model {model} --colour blue", 2, "No such option"),
    # ---------------------------------------------------------------- demo
    R("demo", "--scale 0", "demo --out {out} --scale 0", 2, "scale"),
    R("demo", "--scale negative", "demo --out {out} --scale -1", 2, "scale"),
    R("demo", "--threads 0", "demo --out {out} --threads 0", 2, "threads"),
    R("demo", "--out a file", "demo --out {afile}", 2, "is a file"),
    R("demo", "unknown flag", "demo --out {out} --minutes 3", 2, "No such option"),
    # ---------------------------------------------------------------- probe
    R("probe", "--threads 0", "probe --out {out} --threads 0", 2, "--threads"),
    R("probe", "--out a file", "probe --out {afile}", 2, "is a file"),
    R("probe", "--demo-run missing", "probe --out {out} --demo-run {tmp}/nope", 2, "not a finished `memento demo` run"),
    R("probe", "--demo-run not a demo", "probe --out {out} --demo-run {adir}", 2, "not a finished `memento demo` run"),
    R("probe", "--demo-run a file", "probe --out {out} --demo-run {afile}", 2, "not a finished `memento demo` run"),
    R("probe", "unknown flag", "probe --out {out} --layers 2", 2, "No such option"),
    # rl, more (the rl helper)
    R("rl", "model is a file", "rl --model {afile} --prompts {bench} --output-dir {out}", 2, "is a file"),
    R("rl", "prompts a folder", "rl --model {model} --prompts {adir} --output-dir {out}", 2, "is a directory"),
    R("rl", "prompts without answers", "rl --model {model} --prompts {bench_no_answer} --output-dir {out}", 2, "answer field"),
    R("rl", "answer is an object", "rl --model {model} --prompts {bench_answer_dict} --output-dir {out}", 2, "gold answer"),
    R("rl", "bad eval prompts", "rl --model {model} --prompts {bench} --eval-prompts {notjson} --output-dir {out}", 2, "--eval-prompts"),
    R("rl", "group of one", "rl --model {model} --prompts {bench} --output-dir {out} --group-size 1", 2, "group_size must be >= 2"),
    R("rl", "negative clip", "rl --model {model} --prompts {bench} --output-dir {out} --eps-low -0.1", 2, "eps_low"),
    R("rl", "bad config file", "rl --config {bad_json} --output-dir {out}", 2, "bad.json"),
    R("rl", "config not a mapping", "rl --config {train_list_yaml} --output-dir {out}", 2, "mapping"),
    R("rl", "demo --threads 0", "rl --demo --out {out} --threads 0", 2, "threads"),
    R("rl", "demo --seed -1", "rl --demo --out {out} --seed -1", 2, "seed"),
    R("rl", "demo --out a file", "rl --demo --out {afile}", 2, "is a file"),
    # ---------------------------------------------------------------- the accepted inputs (exit 0, may write)
    R("eval", "CJK problem and response (works)", "eval {bench_cjk} --responses {resp_cjk} -o {out} --json --no-plots", 0, ""),
    R("eval", "huge response line (works)", "eval {bench} --responses {resp_huge} -o {out} --json --no-plots", 0, ""),
]
# fmt: on

COUNTS: dict[str, int] = {}
for _row in ROWS:
    COUNTS[_row.command] = COUNTS.get(_row.command, 0) + 1


def _write_files(root: Path) -> dict[str, str]:
    """Write FILES under root; returns placeholder -> path. A name without an extension gets
    `.jsonl`; `a.b` is `{a_b}`; `dir/file` is reached as `{tmp}/dir`."""
    paths = {}
    for name, content in FILES.items():
        if "/" not in name and "." not in name and content is not None:
            name = f"{name}.jsonl"
        path = root / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        if "/" not in name:
            key = name.removesuffix(".jsonl").replace(".", "_")
            paths[key] = str(path)
    return paths


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad_inputs")
    files = _write_files(root)
    # {short_model}: a toy checkpoint trained on 64 positions, for the position-limit warning
    files["short_model"] = str(make_toy_checkpoint(tmp_path_factory.mktemp("short") / "m", max_position=64))
    return root, files


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.command}: {r.case}" for r in ROWS])
def test_bad_input(row: Row, scratch, toy_model_dir, monkeypatch):
    if ("cuda here" in row.case or "without CUDA" in row.case) and _has_cuda():
        pytest.skip("this machine has CUDA: the row checks what a machine without it says")
    root, files = scratch
    out = root / "out"
    if out.exists():  # an accepted row of the previous case wrote here
        shutil.rmtree(out)
    monkeypatch.chdir(root)  # relative names (a hub id such as Qwen/Qwen3-0.6B) resolve in here
    for name, value in row.env:
        monkeypatch.setenv(name, value)
    argv = shlex.split(row.argv.format(tmp=root, out=out, model=toy_model_dir, **files))
    before = _snapshot(root)
    result = CliRunner().invoke(app, argv)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and not isinstance(result.exception, AssertionError), output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{row.argv} raised {result.exception!r}") from result.exception
    assert result.exit_code == row.code, output
    assert row.fragment in result.stderr, result.stderr
    if row.code == 0:
        if "--json" in argv:  # one JSON document, or one per line
            text = result.stdout.strip()
            try:
                json.loads(text)
            except json.JSONDecodeError:
                [json.loads(line) for line in text.splitlines()]
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.stdout == "", result.stdout
    if "No such option" in row.fragment:  # click's usage error: usage line, hint, error line
        assert lines[-1].startswith("Error: ")
    else:
        errors = [line for line in lines if not line.startswith(("note: ", "warning: "))]
        assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert _snapshot(root) == before, "a failed command wrote or changed files"
