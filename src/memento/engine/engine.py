"""The evicting generation engine: an own decode loop over any HF causal LM.

Per request a `BlockTracker` (memento.masking) decides what to evict; the engine removes those KV
entries right after sampling the trigger token and before the forward that consumes it (sync
contract), and every token keeps its original position id. Many requests run at once in a padded
batched cache whose rows evict independently; requests join and leave between steps under a
KV-token budget.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from memento.engine.cache import BatchedKVCache
from memento.engine.runner import ModelRunner
from memento.engine.sampling import SamplingParams, make_generator, sample_rows
from memento.engine.scheduler import Scheduler
from memento.engine.sequence import ComputeOp, EvictOp, Plan, RequestOutput, Sequence
from memento.masking import BlockMaskingConfig, config_for_mode
from memento.tokens import IM_END, MarkerIds, ensure_chat_template, resolve_token_id

LogitsHook = Callable[[Sequence, torch.Tensor], torch.Tensor]


class Engine:
    """Generate with block eviction. Build with `Engine.from_pretrained(dir)` or from a loaded
    model + tokenizer (`markers` may replace the tokenizer in tests). `prefill_batch_tokens` caps
    the padded tokens of one batched-prefill forward; `direct_forward=False` keeps the HF forward
    for Llama-family models too (see `memento.engine.direct`)."""

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        markers: MarkerIds | None = None,
        mode: str = "memento",
        masking: BlockMaskingConfig | None = None,
        kv_budget_tokens: int | None = None,
        max_batch_size: int = 16,
        prefill_chunk_tokens: int = 2048,
        prefill_batch_tokens: int = 8192,
        logits_hook: LogitsHook | None = None,
        direct_forward: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer is not None:
            ensure_chat_template(tokenizer)
        if markers is None:
            if tokenizer is None:
                raise ValueError("Engine needs a tokenizer or explicit markers")
            markers = MarkerIds.from_tokenizer(tokenizer)
        self.markers = markers
        self.mode = mode
        self.config = config_for_mode(mode, masking)
        self.kv_budget_tokens = kv_budget_tokens
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_batch_tokens = max(prefill_batch_tokens, prefill_chunk_tokens)
        self.logits_hook = logits_hook  # research/testing: rewrite one request's logits before sampling
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.cache = BatchedKVCache(
            text.num_hidden_layers,
            kv_heads,
            head_dim,
            dtype=self.dtype,
            device=self.device,
            rows=max_batch_size,
            capacity=256,
        )
        self.runner = ModelRunner(model, self.cache, direct=direct_forward)
        self.stop_ids = self._default_stop_ids()
        self.last_run: dict = {}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        mode: str = "memento",
        masking: BlockMaskingConfig | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        kv_budget_tokens: int | None = None,
        max_batch_size: int = 16,
        **kwargs,
    ) -> Engine:
        """Load any HF causal LM + tokenizer from a local directory."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        ).to(device)
        return cls(
            model,
            tokenizer,
            mode=mode,
            masking=masking,
            kv_budget_tokens=kv_budget_tokens,
            max_batch_size=max_batch_size,
            **kwargs,
        )

    def _default_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for source in (eos, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(t) for t in source)
        if self.tokenizer is not None:
            im_end = resolve_token_id(self.tokenizer, IM_END)
            if im_end is not None:
                ids.add(im_end)
        return ids

    # --- user API ------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> str:
        """Render messages with the chat template plus the generation prompt."""
        if self.tokenizer is None:
            raise ValueError("chat_prompt needs a tokenizer")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Seq[str | Seq[int]],
        sampling: SamplingParams | Seq[SamplingParams] = SamplingParams(),
        progress: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (`n` samples each); outputs ordered by (prompt, sample)."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
        seqs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
            ids = self.encode(prompt)
            for k in range(params.n):
                seqs.append(self._new_sequence(len(seqs), i, k, ids, params))
        return self._run(seqs, progress)

    def replay(
        self,
        prompts: Seq[str | Seq[int]],
        outputs: Seq[Seq[int]],
        progress: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Teacher forcing: feed given output token streams through the real model compute as if
        they were sampled (same scheduler, eviction and budget). Fills `RequestOutput.logprobs`
        with the model's log-softmax at each given token under this engine's mode and masking
        (scoring / perplexity under eviction); also measures KV and speed on realistic block
        structure without a trained model."""
        if len(outputs) != len(prompts):
            raise ValueError(f"got {len(outputs)} output streams for {len(prompts)} prompts")
        seqs = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
            script = [int(t) for t in out]
            if not script:
                raise ValueError(f"output stream {i} is empty")
            params = SamplingParams(temperature=0, max_new_tokens=len(script))
            seqs.append(self._new_sequence(i, i, 0, self.encode(prompt), params, script))
        return self._run(seqs, progress)

    # --- the loop --------------------------------------------------------------------------

    def _new_sequence(self, request_id, prompt_index, sample, ids, params, script=None) -> Sequence:
        if not ids:
            raise ValueError(f"prompt {prompt_index} is empty")
        seed = None if params.seed is None else params.seed + sample
        generator, seed = make_generator(seed, self.device)
        seq = Sequence(
            request_id,
            prompt_index,
            sample,
            list(ids),
            params,
            self.markers,
            self.config,
            generator,
            seed,
            script,
        )
        if self.mode != "full" and self.config.require_assistant_section and not seq.tracker.gate_open:
            if sample == 0:
                warnings.warn(
                    f"prompt {prompt_index} has no '<|im_start|>assistant' header: the block gate never opens "
                    "and nothing will be evicted (render it with the chat template, or disable "
                    "require_assistant_section)",
                    stacklevel=3,
                )
        return seq

    @torch.inference_mode()
    def _run(self, seqs: list[Sequence], progress) -> list[RequestOutput]:
        scheduler = Scheduler(self.kv_budget_tokens, self.max_batch_size, self.prefill_chunk_tokens)
        self.cache.num_rows = 0
        owners: list[Sequence | None] = [None] * self.cache.row_capacity
        start = time.perf_counter()
        for seq in seqs:
            seq.started = start
            scheduler.add(seq)
        outputs: dict[int, RequestOutput] = {}
        steps = peak_total = 0

        def release(seq: Sequence) -> None:
            moved = self.cache.release_row(seq.row)
            if moved is not None:
                owners[seq.row] = owners[moved]
                owners[seq.row].row = seq.row
            owners[self.cache.num_rows] = None
            seq.row = None

        while scheduler.has_work:
            admitted = scheduler.admit()
            for seq, _ in admitted:
                seq.row = self.cache.add_row()
                if len(owners) < self.cache.row_capacity:
                    owners += [None] * (self.cache.row_capacity - len(owners))
                owners[seq.row] = seq
            if admitted:
                peak_total = max(peak_total, self._execute_many(admitted))
            for seq in scheduler.preempt_for_growth():
                release(seq)
                seq.reset_cache()
            running = owners[: self.cache.num_rows]
            if not running:
                continue
            logits = self.runner.decode(
                [s.tokens[s.pending_position] for s in running], [s.pending_position for s in running]
            )
            steps += 1
            peak_total = max(peak_total, self.cache.total_tokens())
            tokens, scores = self._pick_all(running, logits)
            for seq, token, score in zip(running, tokens, scores, strict=True):
                seq.slot_pos.append(seq.pending_position)
                seq.computed = seq.pending_position + 1
                seq.kv_trace.append(seq.cached)
                if score is not None:
                    seq.logprobs.append(score[0])
                    seq.forced.append(score[1])
                seq.append(token)
                done = self._finish_reason(seq, token)
                if done:
                    seq.finish_reason = done
                    seq.finished = time.perf_counter()
                    scheduler.finish(seq)
                    release(seq)
                    out = self._output(seq)
                    outputs[seq.request_id] = out
                    if progress is not None:
                        progress(out)
                else:
                    self._execute(seq, seq.plan(self.prefill_chunk_tokens))
        self.last_run = {
            "requests": len(seqs),
            "steps": steps,
            "seconds": time.perf_counter() - start,
            "generated_tokens": sum(len(o.output_ids) for o in outputs.values()),
            "peak_total_kv": peak_total,
            "preemptions": scheduler.num_preemptions,
        }
        return [outputs[s.request_id] for s in sorted(seqs, key=lambda s: (s.prompt_index, s.sample))]

    def _pick_all(
        self, running: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[int], list[tuple[float, bool] | None]]:
        """The next token of every running row: one argmax over the batch, the sampling filters
        batched over the rows that share their SamplingParams, one host transfer each. Also, for
        rows that asked for them, `(logprob, forced)` of the picked token (see `RequestOutput`)."""
        if self.logits_hook is not None:
            logits = torch.stack([self.logits_hook(seq, logits[i]) for i, seq in enumerate(running)])
        tokens = torch.argmax(logits, dim=-1).tolist()
        forced = [False] * len(running)
        sampled: dict[SamplingParams, list[int]] = {}
        for i, seq in enumerate(running):
            if seq.script is not None:
                tokens[i] = seq.script[len(seq.output_ids)]
            elif seq.cap.must_close:
                tokens[i] = self.markers.block_end
                forced[i] = True
            elif not seq.params.greedy:
                sampled.setdefault(seq.params, []).append(i)
        drawn_logprobs: dict[int, float] = {}
        for params, rows in sampled.items():
            drawn, scores = sample_rows(logits[rows], params, [running[i].generator for i in rows])
            for i, token in zip(rows, drawn.tolist(), strict=True):
                tokens[i] = token
            if scores is not None:
                drawn_logprobs.update(zip(rows, scores.tolist(), strict=True))
        wanted = [i for i, seq in enumerate(running) if seq.wants_logprobs and i not in drawn_logprobs]
        out: list[tuple[float, bool] | None] = [None] * len(running)
        if wanted:  # the model's own log-softmax at the picked token: one gather, one transfer
            rows = torch.tensor(wanted, device=logits.device)
            picked = torch.tensor([tokens[i] for i in wanted], device=logits.device)
            own = logits[rows].float().log_softmax(-1).gather(-1, picked[:, None])[:, 0].tolist()
            drawn_logprobs.update(zip(wanted, own, strict=True))
        for i, seq in enumerate(running):
            if seq.wants_logprobs:
                out[i] = (drawn_logprobs[i], forced[i])
        return tokens, out

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        n_out = len(seq.tokens) - seq.prompt_len
        if seq.script is not None:
            if n_out < len(seq.script):
                return None
            return "stop" if token in self.stop_ids or token in seq.params.stop_token_ids else "length"
        if token in self.stop_ids or token in seq.params.stop_token_ids:
            return "stop"
        if n_out >= seq.params.max_new_tokens:
            return "length"
        return None

    def _execute(self, seq: Sequence, plan: Plan) -> None:
        """Run a plan's cache ops for one sequence, then adopt its bookkeeping."""
        self._execute_many([(seq, plan)])

    def _execute_many(self, items: list[tuple[Sequence, Plan]]) -> int:
        """Run the plans of several sequences (requests admitted in the same step): each row's
        evictions alone, the compute chunks of different rows batched into one padded forward
        (round k runs every plan's k-th chunk). Plans are grouped in admission order so that the
        sum of their transient peaks fits the KV budget (the scheduler checked them one at a time);
        a group's forward holds at most `prefill_batch_tokens` padded tokens. Returns the most
        cached tokens seen."""
        items = [(s, p) for s, p in items if p.ops]
        budget = self.kv_budget_tokens
        peak = self.cache.total_tokens()
        while items:
            base = self.cache.total_tokens()
            size = 1
            if budget is None:
                size = len(items)
            else:
                total = base + items[0][1].peak - items[0][0].cached
                while size < len(items) and total + items[size][1].peak - items[size][0].cached <= budget:
                    total += items[size][1].peak - items[size][0].cached
                    size += 1
            group, items = items[:size], items[size:]
            peak = max(peak, self._execute_group(group))
        return peak

    def _execute_group(self, group: list[tuple[Sequence, Plan]]) -> int:
        todo = [(seq, list(plan.ops)) for seq, plan in group]
        peak = self.cache.total_tokens()
        while todo:
            chunks: list[tuple[Sequence, ComputeOp]] = []
            for seq, ops in todo:
                while ops and isinstance(ops[0], EvictOp):
                    op = ops.pop(0)
                    self.cache.remove_slots(seq.row, op.first, op.last)
                    if op.truncate_to is not None:
                        self.cache.truncate(seq.row, op.truncate_to)
                if ops:
                    chunks.append((seq, ops.pop(0)))
            todo = [(seq, ops) for seq, ops in todo if ops]
            while chunks:  # one forward per batch of at most prefill_batch_tokens padded tokens
                batch = [chunks.pop(0)]
                width = len(batch[0][1].positions)
                while chunks:
                    w = max(width, len(chunks[0][1].positions))
                    if w * (len(batch) + 1) > self.prefill_batch_tokens:
                        break
                    batch.append(chunks.pop(0))
                    width = w
                self.runner.extend_batch(
                    [seq.row for seq, _ in batch],
                    [[seq.tokens[p] for p in op.positions] for seq, op in batch],
                    [op.positions for _, op in batch],
                    [op.key_positions for _, op in batch],
                    [op.kill for _, op in batch],
                )
                peak = max(peak, self.cache.total_tokens())
        for seq, plan in group:
            seq.slot_pos, seq.applied, seq.computed = list(plan.slot_pos), plan.applied, plan.computed
            assert self.cache.lengths[seq.row] == len(seq.slot_pos), "cache and bookkeeping diverged"
        return peak

    def _output(self, seq: Sequence) -> RequestOutput:
        seconds = (seq.finished or time.perf_counter()) - seq.started
        out_ids = seq.output_ids
        text = self.tokenizer.decode(out_ids, skip_special_tokens=False) if self.tokenizer is not None else ""
        return RequestOutput(
            prompt_index=seq.prompt_index,
            sample=seq.sample,
            prompt_ids=list(seq.prompt_ids),
            output_ids=list(out_ids),
            text=text,
            finish_reason=seq.finish_reason or "length",
            evictions=list(seq.tracker.evictions),
            kv_trace=list(seq.kv_trace),
            peak_kv=max(seq.kv_trace, default=0),
            auc_kv=sum(seq.kv_trace),
            num_preemptions=seq.num_preemptions,
            seconds=seconds,
            tokens_per_s=len(out_ids) / seconds if seconds > 0 else 0.0,
            seed=seq.seed,
            logprobs=list(seq.logprobs) if seq.wants_logprobs else None,
            forced=list(seq.forced) if seq.params.logprobs and seq.script is None else None,
        )
