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

from memento.engine.cache import PAGE_SIZE, PagedKVCache
from memento.engine.runner import ModelRunner
from memento.engine.sampling import SamplingParams, filter_logits, make_generator, sample_rows
from memento.engine.scheduler import BudgetError, Scheduler
from memento.engine.sequence import ComputeOp, EvictOp, Plan, RequestOutput, Sequence
from memento.hf import check_model
from memento.masking import BlockMaskingConfig, config_for_mode
from memento.tokens import IM_END, MarkerIds, ensure_chat_template, resolve_token_id

LogitsHook = Callable[[Sequence, torch.Tensor], torch.Tensor]


class Engine:
    """Generate with block eviction. Build with `Engine.from_pretrained(dir)` or from a loaded
    model + tokenizer (`markers` may replace the tokenizer in tests). `prefill_batch_tokens` caps
    the padded tokens of one batched-prefill forward; `direct_forward=False` keeps the HF forward
    for Llama-family models too (see `memento.engine.direct`). Models with layers MEMENTO cannot
    evict from exactly (linear attention, soft-capped attention, ...) are refused here
    (`memento.hf.UnsupportedModel`); sliding-window layers apply their window in original
    positions (`memento.masking.in_window`). The KV cache is paged (`kv_page_size` tokens per
    page, `memento.engine.cache`): with `kv_budget_tokens` its pool never holds more than
    `ceil(kv_budget_tokens / kv_page_size) + max_batch_size` pages."""

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
        kv_page_size: int = PAGE_SIZE,
    ) -> None:
        check_model(model.config)  # unsupported layer types / attention variants: refused here
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
        self.masking = masking or BlockMaskingConfig()
        self.config = config_for_mode(mode, self.masking)
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
        # paged: with a budget, the pool never exceeds ceil(budget / page) + max_batch_size pages
        self.cache = PagedKVCache(
            text.num_hidden_layers,
            kv_heads,
            head_dim,
            dtype=self.dtype,
            device=self.device,
            page_size=kv_page_size,
            max_tokens=kv_budget_tokens,
            max_rows=max_batch_size,
        )
        self.runner = ModelRunner(model, self.cache, direct=direct_forward)
        self.stop_ids = self._default_stop_ids()
        self.scheduler = Scheduler(kv_budget_tokens, max_batch_size, prefill_chunk_tokens)
        self.cut_at_budget = False  # see step()
        self._owners: list[Sequence | None] = [None] * self.cache.row_capacity  # request of each cache row
        self._next_request_id = 0
        # counters since construction (a server exports them); peak_total_kv since the last generate/replay
        self.num_steps = 0
        self.num_evictions = 0
        self.peak_total_kv = 0
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
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        check_model(AutoConfig.from_pretrained(model_dir))  # refuse before loading any weight
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
        self._start_run()
        seqs: list[Sequence] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
                ids = self.encode(prompt)
                for k in range(params.n):
                    seqs.append(self._queue(ids, params, prompt_index=i, sample=k))
        except BaseException:
            for seq in seqs:
                self.abort(seq)
            raise
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
        scripts = [[int(t) for t in out] for out in outputs]
        for i, script in enumerate(scripts):
            if not script:
                raise ValueError(f"output stream {i} is empty")
        self._start_run()
        seqs: list[Sequence] = []
        try:
            for i, (prompt, script) in enumerate(zip(prompts, scripts, strict=True)):
                params = SamplingParams(temperature=0, max_new_tokens=len(script))
                seqs.append(self._queue(self.encode(prompt), params, prompt_index=i, script=script))
        except BaseException:
            for seq in seqs:
                self.abort(seq)
            raise
        return self._run(seqs, progress)

    # --- the incremental API: add requests at any time, step, abort ---------------------------

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams = SamplingParams(),
        *,
        prompt_index: int = 0,
        sample: int = 0,
        mode: str | None = None,
        masking: BlockMaskingConfig | None = None,
    ) -> Sequence:
        """Queue one sample of one prompt; it joins the batch at a later `step()`. `params.n` is
        ignored here: add one request per sample (sample k draws with seed `seed + k`). `mode` and
        `masking` override the engine's for this request only. Raises `BudgetError` if the prompt
        cannot fit in the KV budget even alone, before anything is queued."""
        config = self.config
        if mode is not None or masking is not None:
            config = config_for_mode(mode or self.mode, masking or self.masking)
        return self._queue(
            self.encode(prompt), params, prompt_index=prompt_index, sample=sample, config=config
        )

    @property
    def has_work(self) -> bool:
        """Requests are waiting or running."""
        return self.scheduler.has_work

    def abort(self, seq: Sequence) -> None:
        """Drop a waiting or running request now (call it between steps): its KV row is freed at
        once and its `finish_reason` becomes "abort". A finished request is left alone."""
        if seq.finish_reason is not None:
            return
        if seq in self.scheduler.running:
            self.scheduler.finish(seq)
            self._release(seq)
        elif seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        self._finish(seq, "abort")

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One iteration of continuous batching: admit the waiting requests whose prefill fits,
        preempt the youngest if the next step would overflow the budget, then one decode step for
        every running request (one token each; the evictions it triggers are applied at once).
        Returns the requests that got a token or finished (`finish_reason` set) in this step.

        With `cut_at_budget`, a request that alone has no room left for one more token finishes
        with "length" instead of raising `BudgetError` (what a server wants)."""
        changed: list[Sequence] = []
        try:
            admitted = self.scheduler.admit()
        except BudgetError as exc:  # a resumed request outgrew the budget while nothing else runs
            if not self.cut_at_budget or exc.seq is None:
                raise
            self.scheduler.waiting.remove(exc.seq)
            self._finish(exc.seq, "length")
            return [exc.seq]
        for seq, _ in admitted:
            seq.row = self.cache.add_row()
            if len(self._owners) < self.cache.row_capacity:
                self._owners += [None] * (self.cache.row_capacity - len(self._owners))
            self._owners[seq.row] = seq
        if admitted:
            self.peak_total_kv = max(self.peak_total_kv, self._execute_many(admitted))
        victims, overflow = self.scheduler.preempt_for_growth()
        for seq in victims:
            self._release(seq)
            seq.reset_cache()
        if overflow is not None:
            if not self.cut_at_budget:
                raise BudgetError(
                    f"request {overflow.prompt_index} (sample {overflow.sample}) alone needs "
                    f"{overflow.cached + 1} KV tokens but kv_budget_tokens={self.kv_budget_tokens}; "
                    "raise the budget or lower max_new_tokens",
                    overflow,
                )
            self.scheduler.finish(overflow)
            self._release(overflow)
            self._finish(overflow, "length")
            changed.append(overflow)
        running = self._owners[: self.cache.num_rows]
        if not running:
            return changed
        logits = self.runner.decode(
            [s.tokens[s.pending_position] for s in running], [s.pending_position for s in running]
        )
        self.num_steps += 1
        self.peak_total_kv = max(self.peak_total_kv, self.cache.total_tokens())
        tokens, scores = self._pick_all(running, logits)
        for seq, token, score in zip(running, tokens, scores, strict=True):
            seq.slot_pos.append(seq.pending_position)
            seq.computed = seq.pending_position + 1
            seq.kv_trace.append(seq.cached)
            if score is not None:
                seq.logprobs.append(score[0])
                seq.forced.append(score[1])
                if score[2] is not None:
                    seq.top_logprobs.append(score[2])
            self.num_evictions += len(seq.append(token))
            changed.append(seq)
            done = self._finish_reason(seq, token)
            if done:
                self.scheduler.finish(seq)
                self._release(seq)
                self._finish(seq, done)
            else:
                self._execute(seq, seq.plan(self.prefill_chunk_tokens))
        return changed

    def output(self, seq: Sequence) -> RequestOutput:
        """A request's result (final once its `finish_reason` is set)."""
        return self._output(seq)

    # --- the loop --------------------------------------------------------------------------

    def _queue(self, ids, params, *, prompt_index=0, sample=0, config=None, script=None) -> Sequence:
        if not ids:
            raise ValueError(f"prompt {prompt_index} is empty")
        config = config or self.config
        seed = None if params.seed is None else params.seed + sample
        generator, seed = make_generator(seed, self.device)
        seq = Sequence(
            self._next_request_id,
            prompt_index,
            sample,
            list(ids),
            params,
            self.markers,
            config,
            generator,
            seed,
            script,
        )
        evicting = config.keep_last_n_blocks != -1 or config.restart_mode
        if evicting and config.require_assistant_section and not seq.tracker.gate_open and sample == 0:
            warnings.warn(
                f"prompt {prompt_index} has no '<|im_start|>assistant' header: the block gate never opens "
                "and nothing will be evicted (render it with the chat template, or disable "
                "require_assistant_section)",
                stacklevel=3,
            )
        self.scheduler.check_fits(seq)
        self._next_request_id += 1
        self.scheduler.add(seq)
        return seq

    def _start_run(self) -> None:
        """Reset the batch for a `generate`/`replay` call (refused while requests are in flight)."""
        if self.has_work:
            raise RuntimeError("the engine is serving requests (add_request/step); let them finish first")
        self.cache.reset()
        self._owners = [None] * self.cache.row_capacity
        self.peak_total_kv = 0
        self.cache.peak_pages = self.cache.num_pages

    def _release(self, seq: Sequence) -> None:
        moved = self.cache.release_row(seq.row)
        if moved is not None:
            self._owners[seq.row] = self._owners[moved]
            self._owners[seq.row].row = seq.row
        self._owners[self.cache.num_rows] = None
        seq.row = None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.finished = time.perf_counter()

    def _run(self, seqs: list[Sequence], progress) -> list[RequestOutput]:
        """Step until every request of a `generate`/`replay` call is done."""
        start = time.perf_counter()
        steps, preemptions = self.num_steps, self.scheduler.num_preemptions
        for seq in seqs:
            seq.started = start
        outputs: dict[int, RequestOutput] = {}
        while self.has_work:
            for seq in self.step():
                if seq.finish_reason is not None:
                    out = outputs[seq.request_id] = self._output(seq)
                    if progress is not None:
                        progress(out)
        self.last_run = {
            "requests": len(seqs),
            "steps": self.num_steps - steps,
            "seconds": time.perf_counter() - start,
            "generated_tokens": sum(len(o.output_ids) for o in outputs.values()),
            "peak_total_kv": self.peak_total_kv,
            "preemptions": self.scheduler.num_preemptions - preemptions,
            # memory: the pool as allocated (used or not), the most of it in use, per-token size
            "kv_allocated_bytes": self.cache.allocated_bytes(),
            "peak_kv_used_bytes": self.cache.peak_pages * self.cache.page_size * self.cache.bytes_per_token,
            "kv_bytes_per_token": self.cache.bytes_per_token,
        }
        return [outputs[s.request_id] for s in sorted(seqs, key=lambda s: (s.prompt_index, s.sample))]

    def _pick_all(
        self, running: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[int], list[tuple[float, bool, list[tuple[int, float]] | None] | None]]:
        """The next token of every running row: one argmax over the batch, the sampling filters
        batched over the rows that share their SamplingParams, one host transfer each. Also, for
        rows that asked for them, `(logprob, forced, top_logprobs)` of the picked token (see `RequestOutput`)."""
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
                out[i] = (drawn_logprobs[i], forced[i], self._top_logprobs(seq, logits[i], forced[i]))
        return tokens, out

    def _top_logprobs(
        self, seq: Sequence, logits: torch.Tensor, forced: bool
    ) -> list[tuple[int, float]] | None:
        """The `top_logprobs` most likely (token, log-prob) of the distribution the row's log-prob
        is reported under: the filtered, tempered one for a sampled token, else the model's own."""
        k = seq.params.top_logprobs
        if not k or seq.script is not None:
            return None
        logits = logits.float()
        if not (seq.params.greedy or forced):
            logits = filter_logits(logits, seq.params)
        values, ids = torch.topk(logits.log_softmax(-1), min(k, logits.shape[-1]))
        return list(zip(ids.tolist(), values.tolist(), strict=True))

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
            top_logprobs=list(seq.top_logprobs) if seq.params.top_logprobs and seq.script is None else None,
        )
