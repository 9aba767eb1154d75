"""Two-stage SFT (`memento train`): a config dataclass, a thin HF `Trainer` subclass, and `train()`.

Stage 1 (`full`) teaches the format with ordinary causal attention; Stage 2 (`memento`) trains
with the block mask the engine evicts with, so the model learns to carry what it needs in its
mementos. Defaults are the MEMENTO paper's recipe (App. A.2.1): 5 epochs, global batch 512
(gradient accumulation over the per-device batch and the processes), 32,768 tokens with
truncation, AdamW (0.9, 0.999), no weight decay, lr 8e-5 cosine with 5% warmup, grad clip 1.0,
a checkpoint every 50 steps, gradient checkpointing and bf16 on GPU (fp32 on CPU). With
`select_by`, every checkpoint is evaluated on a validation benchmark at the end and `best` points
at the winner (Stage 2 starts from it). Runs as is under `accelerate launch`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memento.masking import BlockMaskingConfig
from memento.train.collator import STAGES
from memento.train.data import FORMATS, OVERLONG, DataStats
from memento.train.options import options_from_dict

ATTENTION = ("auto", "sdpa", "eager", "flex")
CONFIG_FILE_NAME = "memento_train.json"
PAPER_GLOBAL_BATCH = 512


@dataclass
class SFTConfig:
    """Everything `memento train` needs; the same keys work in a YAML/JSON config file.

    `resume`: None (fresh), "latest" (the newest checkpoint-* in output_dir, fresh if none), or a
    checkpoint path. `attention`: "auto" = sdpa with a dense mask, except flex_attention on CUDA
    for Stage 2 once a sample is longer than `flex_threshold` tokens. `bf16`: None = on iff CUDA
    supports it. `max_steps` > 0 overrides `epochs`.

    Batch: `global_batch_size` samples per optimizer step (the paper's 512), reached by gradient
    accumulation over `batch_size` per device and the processes; or give `grad_accum` instead (it
    wins; the global batch is then whatever it makes). `gradient_checkpointing`: None = on with
    CUDA (real models), off on CPU (toy models, where it only costs time).

    `select_by`: a benchmark JSONL; after training every `checkpoint-N` is evaluated on it
    (`select_mode`, default the stage's: full for Stage 1, memento for Stage 2; `select_n` samples
    per problem, default the paper's per benchmark; `select_limit` problems) and `best` links to
    the most accurate (ties: the later step).
    """

    model: str
    data: str
    output_dir: str
    stage: str = "full"
    format: str = "memento"
    system_prompt: str | None = None
    max_length: int = 32768
    overlong: str = "truncate"
    masking: BlockMaskingConfig = field(default_factory=BlockMaskingConfig)
    attention: str = "auto"
    flex_threshold: int = 4096
    max_steps: int = -1
    epochs: float = 5.0
    lr: float = 8e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    batch_size: int = 1
    global_batch_size: int | None = PAPER_GLOBAL_BATCH
    grad_accum: int | None = None
    save_steps: int = 50
    save_total_limit: int | None = None
    logging_steps: int = 10
    seed: int = 42
    resume: str | None = None
    gradient_checkpointing: bool | None = None
    bf16: bool | None = None
    progress: bool = True
    select_by: str | None = None
    select_mode: str | None = None
    select_n: int | None = None
    select_limit: int | None = None
    select_max_new_tokens: int = 32000

    def __post_init__(self) -> None:
        if isinstance(self.masking, dict):
            self.masking = BlockMaskingConfig.from_dict(self.masking)
        if not isinstance(self.masking, BlockMaskingConfig):
            raise ValueError(f"masking must be a dict of block-masking options, got {self.masking!r}")
        for name, allowed in (
            ("stage", STAGES),
            ("format", FORMATS),
            ("overlong", OVERLONG),
            ("attention", ATTENTION),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.stage == "memento" and self.format == "control":
            raise ValueError(
                "--format control has no blocks, so the Stage-2 mask would be plain causal; "
                "train the Control row with --stage full"
            )
        if self.masking.restart_mode and self.stage != "memento":
            raise ValueError("restart_mode is a Stage-2 mask: use it with --stage memento")
        if self.masking.restart_mode and self.attention == "flex":
            raise ValueError(
                "restart_mode trains over virtual sequences with a dense mask; use sdpa or eager"
            )
        for name in (
            "max_length",
            "batch_size",
            "save_steps",
            "logging_steps",
            "flex_threshold",
            "select_max_new_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("global_batch_size", "grad_accum", "select_n", "select_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (or unset), got {value!r}")
        if self.grad_accum is not None and self.global_batch_size not in (None, PAPER_GLOBAL_BATCH):
            raise ValueError(
                "give global_batch_size or grad_accum, not both (grad_accum fixes the accumulation; "
                "global_batch_size derives it)"
            )
        if self.grad_accum is None and self.global_batch_size is None:
            raise ValueError("set global_batch_size or grad_accum")
        if self.grad_accum is not None:
            self.global_batch_size = None  # the accumulation decides; the run records the real one
        if self.select_mode is not None:
            from memento.masking import MODES

            if self.select_mode not in MODES:
                raise ValueError(f"select_mode must be one of {MODES}, got {self.select_mode!r}")
        if self.select_by is None and any(
            v is not None for v in (self.select_mode, self.select_n, self.select_limit)
        ):
            raise ValueError(
                "select_mode/select_n/select_limit shape the checkpoint selection: set select_by"
            )
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps == 0:
            raise ValueError(
                f"max_steps must be a positive integer or -1 (use epochs), got {self.max_steps!r}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0 or self.epochs <= 0:
            raise ValueError("lr and epochs must be positive")
        if self.resume is not None and not isinstance(self.resume, str):
            raise ValueError(f"resume must be 'latest' or a checkpoint path, got {self.resume!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SFTConfig:
        """Build from a dict (keys as in the config file; `-` and `_` both accepted).

        Unknown keys are errors: a typo must not silently train with a default."""
        return options_from_dict(cls, values, "training", required=("model", "data", "output_dir"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["masking"] = self.masking.to_dict()
        return out


@dataclass
class TrainResult:
    """What a run produced; `tokens_per_s` counts real (non-padding) tokens over all processes."""

    output_dir: str
    global_step: int
    final_loss: float | None
    mean_loss: float | None
    train_tokens: int
    tokens_per_s: float
    seconds: float
    attention: str
    world_size: int
    resumed_from: str | None
    data: DataStats
    log_history: list[dict] = field(default_factory=list)
    grad_accum: int = 1
    global_batch_size: int = 1  # samples per optimizer step, over all processes
    selection: dict | None = None  # with select_by: each checkpoint's score and the best one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def world_size() -> int:
    """Processes in this run (`accelerate launch` / torchrun set WORLD_SIZE; 1 otherwise)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_accumulation(cfg: SFTConfig, world: int) -> tuple[int, int]:
    """(gradient accumulation steps, samples per optimizer step) for `world` processes.

    `grad_accum` given: it is used as is. Else the accumulation that reaches `global_batch_size`
    from `batch_size` x `world` (rounded up when it does not divide; the caller says so)."""
    per_step = cfg.batch_size * world
    if cfg.grad_accum is not None:
        return cfg.grad_accum, per_step * cfg.grad_accum
    if per_step > cfg.global_batch_size:
        raise ValueError(
            f"--batch-size {cfg.batch_size} x {world} process(es) = {per_step} samples per micro-step, more than "
            f"--global-batch-size {cfg.global_batch_size}; lower --batch-size or raise --global-batch-size"
        )
    accum = -(-cfg.global_batch_size // per_step)
    return accum, per_step * accum


def _trainer_class():
    """Defined lazily so importing memento.train does not import transformers."""
    from transformers import Trainer

    from memento.train.flex import block_mask_from_kill_times

    class MementoTrainer(Trainer):
        """HF Trainer that turns the collator's Stage-2 mask into what the attention backend needs
        (BlockMask for flex, additive float for eager) and counts the real tokens it trains on."""

        def __init__(self, *args, attention: str = "sdpa", **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.attention = attention
            self.tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            lengths = inputs.pop("lengths", None)
            kill = inputs.pop("kill_times", None)
            if kill is not None:
                inputs["attention_mask"] = block_mask_from_kill_times(kill)
            mask = inputs.get("attention_mask")
            if self.attention == "eager" and isinstance(mask, torch.Tensor) and mask.ndim == 4:
                dtype = next(model.parameters()).dtype
                inputs["attention_mask"] = torch.zeros(
                    mask.shape, dtype=dtype, device=mask.device
                ).masked_fill(~mask.bool(), torch.finfo(dtype).min)
            if lengths is not None and model.training:
                self.tokens_seen += int(lengths.sum())
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return MementoTrainer


def prepare_model_and_tokenizer(model_dir: str, fmt: str = "memento", *, dtype: torch.dtype = torch.float32):
    """Load any HF causal LM; add and initialise the markers if missing; ensure a chat template.

    Markers are added for the memento format only (the Control row keeps the base vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memento.tokens import MarkerIds, add_memento_tokens, ensure_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise ValueError(
            f"--model {model_dir}: cannot load a causal LM + tokenizer ({type(exc).__name__}: {exc})"
        ) from None
    added = False
    if fmt == "memento":
        rows = model.get_input_embeddings().num_embeddings  # also right when ZeRO-3 partitions weights
        try:
            ids = MarkerIds.from_tokenizer(tokenizer)
            needs = max(ids.block_markers) >= rows
        except ValueError:
            needs = True
        if needs:
            add_memento_tokens(tokenizer, model)
            added = True
    ensure_chat_template(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{model_dir}: the tokenizer has no chat template and no ChatML tokens to use ours; "
            "add a chat_template to tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return model, tokenizer, added


def choose_attention(cfg: SFTConfig, longest: int, cuda: bool, sliding: bool = False) -> str:
    """Resolve `attention="auto"`; flex has no backward on CPU, so it is refused there. A Stage-2
    model with sliding-window layers needs a mask per window, which only sdpa (memento_sdpa) takes."""
    if cfg.attention == "flex" and not cuda:
        raise ValueError("--attention flex needs CUDA (flex_attention has no backward pass on CPU); use sdpa")
    if sliding and cfg.stage == "memento" and cfg.attention in ("flex", "eager"):
        raise ValueError(
            f"--attention {cfg.attention} cannot apply a different Stage-2 mask per sliding-window layer; "
            "this model has sliding-window layers: use --attention sdpa"
        )
    if cfg.attention != "auto":
        return cfg.attention
    restart = cfg.masking.restart_mode
    if cuda and cfg.stage == "memento" and longest > cfg.flex_threshold and not sliding and not restart:
        return "flex"
    return "sdpa"


def resolve_resume(cfg: SFTConfig) -> str | None:
    """The checkpoint to resume from (None = fresh start)."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        out = Path(cfg.output_dir)
        return get_last_checkpoint(str(out)) if out.is_dir() else None
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(
            f"{path}: not a checkpoint directory (no trainer_state.json); pass 'latest' or a checkpoint-N dir"
        )
    return str(path)


def train(
    cfg: SFTConfig,
    *,
    callbacks: list | None = None,
    selector: Callable[[Path], float] | None = None,
) -> TrainResult:
    """Run one SFT stage end to end and save a loadable model + tokenizer to `cfg.output_dir`.

    The dataset is read and validated before the model is loaded, so a bad line fails fast.
    `selector(checkpoint_dir) -> score` picks the best checkpoint (higher is better) instead of
    `cfg.select_by`'s benchmark accuracy: the evaluation hook of the checkpoint selection."""
    from transformers import TrainingArguments, set_seed

    from memento.format import read_traces
    from memento.tokens import MarkerIds
    from memento.train.collator import MementoCollator
    from memento.train.data import tokenize_traces
    from memento.user_errors import check_input_file, check_model_dir, check_output_dir

    # Everything a user can get wrong is checked before the (possibly long) model load.
    data_path = check_input_file(cfg.data, "--data")
    traces = read_traces(data_path)
    if not traces:
        raise ValueError(f"{data_path}: no traces in file (expected JSONL lines with problem/blocks/answer)")
    check_model_dir(cfg.model, "--model")
    check_output_dir(cfg.output_dir)
    if cfg.select_by is not None:
        from memento.eval.benchmarks import load_benchmark

        load_benchmark(check_input_file(cfg.select_by, "--select-by"), limit=cfg.select_limit)
    resume_from = resolve_resume(cfg)
    world = world_size()
    grad_accum, global_batch = resolve_accumulation(cfg, world)

    cuda = torch.cuda.is_available()
    bf16 = (cuda and torch.cuda.is_bf16_supported()) if cfg.bf16 is None else cfg.bf16
    if bf16 and not cuda:
        raise ValueError("bf16 training needs a GPU here; leave bf16 unset on CPU (fp32)")
    choose_attention(cfg, 0, cuda)  # refuses flex without CUDA before the model loads
    checkpointing = cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    set_seed(cfg.seed)
    # Arguments first: under `accelerate launch` with ZeRO-3 they make from_pretrained shard at load.
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        optim="adamw_torch",
        max_grad_norm=cfg.max_grad_norm,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        bf16=bf16,
        use_cpu=not cuda,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    model, tokenizer, _ = prepare_model_and_tokenizer(cfg.model, cfg.format)
    samples, stats = tokenize_traces(
        traces,
        tokenizer,
        fmt=cfg.format,
        system_prompt=cfg.system_prompt,
        max_length=cfg.max_length,
        overlong=cfg.overlong,
    )
    longest = max(len(s) for s in samples)
    from memento.hf import check_model

    windows = check_model(model.config)  # refuses layer types MEMENTO cannot evict from
    attention = choose_attention(cfg, longest, cuda, sliding=any(w is not None for w in windows))
    if attention != "sdpa":
        model.set_attn_implementation("flex_attention" if attention == "flex" else "eager")
    elif cfg.stage == "memento":
        # Same sdpa kernel, but the masked (non-causal-flag) path skips the upper triangle.
        from memento.hf import register_attention

        model.set_attn_implementation(register_attention())

    markers = MarkerIds.from_tokenizer(tokenizer) if cfg.stage == "memento" else None
    collator = MementoCollator(
        pad_token_id=tokenizer.pad_token_id,
        stage=cfg.stage,
        markers=markers,
        masking=cfg.masking,
        mask_format="kill_times" if attention == "flex" else "dense",
        return_lengths=True,
        layer_windows=windows,
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=samples,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        attention=attention,
    )
    main = trainer.is_world_process_zero()
    if main:  # on stderr, and also with --no-progress: truncated/dropped counts change what is learned
        print(
            f"[memento train] stage={cfg.stage} format={cfg.format} attention={attention} data: {stats.summary()}",
            file=sys.stderr,
        )
        print(
            f"[memento train] global batch {global_batch} = {cfg.batch_size} per device x {world} process(es) x "
            f"{grad_accum} accumulation steps; gradient checkpointing {'on' if checkpointing else 'off'}",
            file=sys.stderr,
        )
        if cfg.grad_accum is None and global_batch != cfg.global_batch_size:
            print(f"[memento train] note: {cfg.global_batch_size} is not a multiple of {cfg.batch_size * world}: "
                  f"each step takes {global_batch} samples", file=sys.stderr)  # fmt: skip
        if stats.samples < global_batch:
            print(
                f"[memento train] note: {stats.samples} samples is less than one global batch of {global_batch}: "
                "every epoch is a single optimizer step (lower --global-batch-size for small data)",
                file=sys.stderr,
            )
        if cfg.resume:
            print(
                f"[memento train] resuming from {resume_from}"
                if resume_from
                else "[memento train] no checkpoint to resume; starting fresh",
                file=sys.stderr,
            )

    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    tokens = trainer.tokens_seen
    if trainer.accelerator.num_processes > 1:
        t = torch.tensor([tokens], device=trainer.accelerator.device)
        tokens = int(trainer.accelerator.reduce(t, reduction="sum").item())
    if attention != "sdpa" or cfg.stage == "memento":
        model.set_attn_implementation("sdpa")  # the saved model must load without our registration
    trainer.save_model(cfg.output_dir)  # model + tokenizer (processing_class), main process writes

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    mean_loss = output.metrics.get("train_loss") if output.metrics else None
    result = TrainResult(
        output_dir=str(cfg.output_dir),
        global_step=trainer.state.global_step,
        final_loss=float(losses[-1]) if losses else (float(mean_loss) if mean_loss is not None else None),
        mean_loss=float(mean_loss) if mean_loss is not None and math.isfinite(mean_loss) else None,
        train_tokens=tokens,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        attention=attention,
        world_size=trainer.accelerator.num_processes,
        resumed_from=resume_from,
        data=stats,
        log_history=list(trainer.state.log_history),
        grad_accum=grad_accum,
        global_batch_size=global_batch,
    )
    if main and (cfg.select_by is not None or selector is not None):
        from memento.train.select import select_checkpoint

        result.selection = select_checkpoint(cfg, selector=selector)
    if main:
        record = {
            "config": cfg.to_dict(),
            "result": {k: v for k, v in result.to_dict().items() if k != "log_history"},
        }
        (Path(cfg.output_dir) / CONFIG_FILE_NAME).write_text(json.dumps(record, indent=2, default=str))
    return result
