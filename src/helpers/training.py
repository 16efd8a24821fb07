"""The training loop: AdamW on the trainable tensors, warmup + cosine, clipping, accumulation, periodic validation."""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from .engine import check_engine, check_rows, is_fsdp, shard, world_and_rank
from .evaluation import next_token_nll
from .progress import tqdm
from .strategies import StrategyInfo

HISTORY_COLUMNS = ["step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "seconds"]


@dataclass
class TrainConfig:
    """Hyper-parameters of `train`; one optimizer step consumes grad_accum batches (notebook 03)."""

    steps: int = 30
    lr: float = 3e-4
    warmup_steps: int = 3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 10
    eval_batches: int | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: bool = False
    progress: bool = True
    min_lr_ratio: float = 0.1
    eval_at_start: bool = True
    patience: int = 0
    """Early stopping: stop after this many validations in a row without a new lowest validation loss, and restore
    the weights of the lowest one (0: train every step, keep the last weights)."""
    min_steps: int = 0
    """Early stopping waits for this step: a run that must read its data once is not stopped before the end of it."""

    def check(self) -> None:
        """Raise ValueError naming the first field with an impossible value (called by train, notebook 03)."""
        rules = [  # (field, whether its value is impossible, what it must be)
            ("steps", self.steps < 1, "must be at least 1"),
            ("lr", not self.lr > 0, "must be positive"),
            ("warmup_steps", not 0 <= self.warmup_steps <= self.steps, f"must lie between 0 and steps ({self.steps})"),
            ("grad_accum", self.grad_accum < 1, "must be at least 1"),
            ("eval_every", self.eval_every < 0, "must be >= 0 (0 = only at the end)"),
            ("eval_batches", self.eval_batches is not None and self.eval_batches < 1,
             "must be None (all) or at least 1"),
            ("min_lr_ratio", not 0 <= self.min_lr_ratio <= 1, "must lie in [0, 1]"),
            ("patience", self.patience < 0, "must be >= 0 (0 = no early stopping)"),
            ("min_steps", not 0 <= self.min_steps <= self.steps, f"must lie between 0 and steps ({self.steps})"),
        ]
        for name, impossible, rule in rules:
            if impossible:
                raise ValueError(f"TrainConfig.{name} {rule}; got {getattr(self, name)}.")
        if self.patience and not self.eval_every:
            raise ValueError("TrainConfig.patience needs validations during training: set eval_every >= 1.")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Return the base rate's multiplier at optimizer step `step` (1-based): warmup, then cosine (notebook 03)."""
    if config.warmup_steps and step <= config.warmup_steps:
        return step / config.warmup_steps
    # The first step after warmup runs at the full rate and the last at min_lr_ratio x the rate.
    span = max(config.steps - config.warmup_steps - 1, 1)
    progress = min(max(step - config.warmup_steps - 1, 0) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _batch_tensors(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return (input_ids, attention_mask or None, next-token targets with -100 where nothing is predicted)."""
    if isinstance(batch, dict):
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    else:
        ids, mask, labels = batch[0] if isinstance(batch, (list, tuple)) else batch, None, None
    ids = ids.to(device)
    targets = (ids if labels is None else labels.to(device))[:, 1:]
    if mask is not None:
        mask = mask.to(device)
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    return ids, mask, targets


def _loss_sum(model: nn.Module, batch, device: torch.device, autocast) -> tuple[torch.Tensor, int]:
    """Return (summed next-token NLL, number of predicted tokens) of one batch, scoring only real targets."""
    ids, mask, targets = _batch_tensors(batch, device)
    keep = targets != -100
    n = int(keep.sum())
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    if n < keep.numel():
        # Padding and ignored positions never reach the loss: select the scored positions first.
        logits, targets = logits[keep], targets[keep]
    return next_token_nll(logits, targets), n


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: DataLoader, *, max_batches: int | None = None,
                  autocast=contextlib.nullcontext, accelerator=None) -> float:
    """Return the token-weighted mean next-token NLL (nats) over `data`'s first `max_batches` (notebook 03).

    With an `accelerator`, batch i is scored by rank i mod N and the sums are added over ranks, so every token
    counts once.
    """
    world, rank = world_and_rank(accelerator)
    # A DDP wrapper may broadcast buffers in its forward, a collective that ranks scoring different batches would not
    # all join; the wrapped module computes the same. FSDP's shards only compute inside the wrapper.
    scorer = model
    if accelerator and not is_fsdp(accelerator):
        scorer = accelerator.unwrap_model(model)  # engine: score with the module inside DDP's wrapper
    device = accelerator.device if accelerator else next(model.parameters()).device
    was_training = scorer.training
    scorer.eval()
    total, count = 0.0, 0
    batches = list(itertools.islice(data, max_batches))
    for i in range(rank, math.ceil(len(batches) / world) * world, world):
        if i < len(batches):
            loss, n = _loss_sum(scorer, batches[i], device, autocast)
            total, count = total + loss.item(), count + n
        elif is_fsdp(accelerator):  # every rank joins every FSDP forward: score a batch and discard it
            _loss_sum(scorer, batches[0], device, autocast)
    scorer.train(was_training)
    if accelerator:
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        total, count = accelerator.reduce(sums, reduction="sum").tolist()  # engine: loss and tokens over ranks
    if count == 0:
        raise ValueError("The validation data holds no tokens to predict; pass a non-empty DataLoader.")
    return total / count


def _rss() -> int:
    """Return the bytes the process holds in memory now (its resident set)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import resource  # ru_maxrss is KiB on Linux, bytes on macOS; only used when /proc is absent

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakMemory(threading.Thread):
    """Track peak memory while training: CUDA's allocator peak, or the process's resident set polled on the CPU."""

    def __init__(self, device: torch.device):
        super().__init__(daemon=True)
        self.device, self.cuda, self.done = device, device.type == "cuda", threading.Event()
        # What the process holds before training (weights included): the peak minus this is what training added.
        self.at_start = self.peak = torch.cuda.memory_allocated(device) if self.cuda else _rss()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> "_PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.join()
            self.peak = max(self.peak, _rss())


def _batches(data: DataLoader):
    """Yield batches forever, starting a new pass over `data` whenever one ends."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("The training DataLoader is empty; it needs at least one batch.")


def _precision(device: torch.device, config: TrainConfig, accelerator) -> tuple[object, str, object]:
    """Return (autocast factory, precision label, fp16 loss scaler or None): bf16/fp16 only on CUDA when asked."""
    if accelerator:  # engine: Accelerate autocasts inside the prepared model and scales fp16 losses itself
        label = {"bf16": "bf16", "fp16": "fp16"}.get(str(accelerator.mixed_precision), "fp32")
        return contextlib.nullcontext, label, None
    if not config.mixed_precision or device.type != "cuda":
        return contextlib.nullcontext, "fp32", None
    if torch.cuda.is_bf16_supported():
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16), "bf16", None
    return functools.partial(torch.autocast, "cuda", dtype=torch.float16), "fp16", torch.amp.GradScaler("cuda")


def _enable_checkpointing(model: nn.Module, on: bool) -> bool:
    """Turn gradient checkpointing on if asked; return whether it was on before, so that it can be restored."""
    before = bool(getattr(model, "is_activation_checkpointing", False))
    if on:
        if not hasattr(model, "activation_checkpointing_enable"):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; "
                             "set gradient_checkpointing=False.")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return before


def _check_finite(loss: float, step: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"The training loss became {loss} at step {step} (learning rate {lr:.3g}). "
                                 "Lower TrainConfig.lr, keep grad_clip on, or check the data for empty blocks.")


def _backward(model, batches: list, step: int, lr: float, device, autocast, scaler,
              accelerator) -> tuple[float, int, int]:
    """Return (summed loss, predicted tokens, input tokens) of one step's micro-batches, their gradients accumulated."""
    world, rank = world_and_rank(accelerator)
    if accelerator:
        check_rows(batches, world, step)
    on_cpu = [_batch_tensors(b, torch.device("cpu")) for b in batches]
    total_targets = max(sum(int((targets != -100).sum()) for _, _, targets in on_cpu), 1)
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        if accelerator is None:
            loss, _ = _loss_sum(model, batch, device, autocast)
            _check_finite(loss.item(), step, lr)
            # Scale so the accumulated gradient is that of the token-weighted mean over all micro-batches.
            scaled = loss / total_targets
            (scaler.scale(scaled) if scaler else scaled).backward()
        else:
            mine = shard(batch, rank, world)  # engine: this rank's rows of the global batch
            last = i == len(batches) - 1  # gradients are averaged over the ranks once, after the last micro-batch
            with contextlib.nullcontext() if last else accelerator.no_sync(model):  # engine: all-reduce once a step
                loss, _ = _loss_sum(model, mine, device, autocast)
                # DDP averages gradients over the ranks; times `world`, that is the global token-weighted mean.
                accelerator.backward(loss * world / total_targets)  # engine: replaces loss.backward()
        loss_sum += loss.item()
    if accelerator:
        step_loss = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        loss_sum = accelerator.reduce(step_loss, reduction="sum").item()  # engine: the step's loss over ranks
        _check_finite(loss_sum, step, lr)
    # Input tokens, padding included: what the model processes.
    return loss_sum, total_targets, sum(ids.numel() for ids, _, _ in on_cpu)


class _EarlyStopping:
    """Keep a copy of the tracked tensors at the lowest validation loss; count validations without a new best."""

    def __init__(self, tracked: list[torch.Tensor], patience: int):
        self.tracked, self.patience = tracked, patience
        self.val, self.step, self.weights, self.misses = math.inf, None, None, 0

    def record(self, val: float, step: int) -> None:
        if not self.patience:
            return
        if val < self.val:
            self.val, self.step, self.misses = val, step, 0
            self.weights = [p.detach().clone() for p in self.tracked]
        else:
            self.misses += 1

    def should_stop(self) -> bool:
        return bool(self.patience) and self.misses >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.tracked, self.weights or []):
            p.copy_(saved)


def _optimizer(model: nn.Module, config: TrainConfig, device, accelerator):
    """Return (optimizer groups' tensors, wrapped model, optimizer, scheduler)."""
    info = getattr(model, "strategy_info", None) or StrategyInfo("")
    groups = [dict(g, params=list(g["params"])) for g in info.param_groups(model, config.lr)]
    for g in groups:
        g.setdefault("weight_decay", config.weight_decay)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters: every tensor has requires_grad=False. "
            "Apply a strategy that leaves something to train (helpers.apply_strategy) before calling train()."
        )
    fused = {"fused": True} if device.type in ("cpu", "cuda") and not is_fsdp(accelerator) else {}
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, **fused)
    wrapped = model
    if accelerator:
        wrapped, optimizer = accelerator.prepare(model, optimizer)  # engine: DDP or FSDP wrapping, device placement
    # The schedule steps once per optimizer step; an Accelerate-prepared scheduler would step once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(getattr(optimizer, "optimizer", optimizer),
                                                  lambda s: lr_factor(s + 1, config))
    return [p for g in groups for p in g["params"]], wrapped, optimizer, scheduler


def train(model: nn.Module, train_data: DataLoader, val_data: DataLoader, config: TrainConfig | None = None, *,
          accelerator=None, callback=None) -> pd.DataFrame:
    """Return the history (step, tokens, train_loss, val_loss, val_ppl, lr, seconds), training `model` (notebook 03).

    With an Accelerate `accelerator` (helpers.engine.make_accelerator) it trains through it, in one process or N
    data-parallel ones; the lines marked as engine lines differ (notebook 10). Ctrl-C returns the history so far; a NaN
    loss raises FloatingPointError; `config.patience` stops early and keeps the best validation's weights.
    """
    config = config or TrainConfig()
    config.check()
    check_engine(model, train_data, accelerator)
    device = accelerator.device if accelerator else next(model.parameters()).device
    torch.manual_seed(config.seed)
    tracked, wrapped, optimizer, scheduler = _optimizer(model, config, device, accelerator)
    autocast, precision, scaler = _precision(device, config, accelerator)
    info, was_training = getattr(model, "strategy_info", None), model.training
    checkpointing_before = _enable_checkpointing(model, config.gradient_checkpointing)
    wrapped.train()
    history, best, memory = [], _EarlyStopping(tracked, config.patience), _PeakMemory(device)
    stats = {"tokens": 0, "train_seconds": 0.0, "interrupted": False, "stopped_early_at": None}
    bar, stream = _progress_bar(config, precision, accelerator), _batches(train_data)

    def validate(step: int) -> float:
        val = evaluate_loss(wrapped, val_data, max_batches=config.eval_batches, autocast=autocast,
                            accelerator=accelerator)
        best.record(val, step)
        return val

    try:
        with memory:
            if config.eval_at_start:
                history.append(_row(0, stats, float("nan"), 0.0, validate(0)))
            for step in range(1, config.steps + 1):
                start, lr_now = time.perf_counter(), optimizer.param_groups[0]["lr"]
                batches = [next(stream) for _ in range(config.grad_accum)]  # global batches, alike on every rank
                loss_sum, targets, tokens = _backward(wrapped, batches, step, lr_now, device, autocast, scaler,
                                                      accelerator)
                _optimizer_step(optimizer, tracked, config.grad_clip, scaler, accelerator)
                scheduler.step()
                stats["tokens"] += tokens
                stats["train_seconds"] += time.perf_counter() - start
                if info is not None:
                    info.on_step(model, step)  # e.g. gradual unfreezing opens the next block
                due = (config.eval_every and step % config.eval_every == 0) or step == config.steps
                history.append(_row(step, stats, loss_sum / targets, lr_now, validate(step) if due else math.nan))
                _report(bar, history[-1], callback)
                if best.should_stop() and config.min_steps <= step < config.steps:
                    stats["stopped_early_at"] = step
                    break
    except KeyboardInterrupt:
        stats["interrupted"] = True
        optimizer.zero_grad(set_to_none=True)
    finally:
        bar.close()
        best.restore()
        if config.gradient_checkpointing and not checkpointing_before:
            model.activation_checkpointing_disable()
        model.train(was_training)
    return _history_frame(history, config, precision, stats, memory, best, accelerator)


def _report(bar, row: dict, callback) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{row['train_loss']:.3f}")
    if callback is not None:
        callback(dict(row))


def _row(step: int, stats: dict, train_loss: float, lr: float, val: float) -> dict:
    """Return one history row; val is NaN where the step did not validate."""
    return {"step": step, "tokens": stats["tokens"], "train_loss": train_loss, "val_loss": val,
            "val_ppl": math.nan if math.isnan(val) else math.exp(min(val, 700.0)), "lr": lr,
            "seconds": stats["train_seconds"]}


def _optimizer_step(optimizer, tracked: list[torch.Tensor], grad_clip: float, scaler, accelerator) -> None:
    """Clip the gradient norm (after unscaling fp16 gradients), step and clear the gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip:
        params = [p for p in tracked if p.grad is not None]
        if accelerator:
            accelerator.clip_grad_norm_(params, grad_clip)  # engine: unscales, and works on FSDP shards
        else:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _progress_bar(config: TrainConfig, precision: str, accelerator):
    if accelerator is None:
        detail, main = ", checkpointing" if config.gradient_checkpointing else "", True
    else:
        world = accelerator.num_processes
        detail, main = f", {world} process{'es' if world > 1 else ''}", accelerator.is_main_process
    return tqdm(total=config.steps, desc=f"train ({precision}{detail})", disable=not (config.progress and main))


def _history_frame(history: list[dict], config: TrainConfig, precision: str, stats: dict, memory: _PeakMemory,
                   best: _EarlyStopping, accelerator) -> pd.DataFrame:
    """Return the history as a DataFrame whose attrs say how the run went."""
    frame = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    peak, seconds = memory.peak, stats["train_seconds"]
    if accelerator:
        peak = torch.tensor(float(peak), device=accelerator.device)
        peak = accelerator.reduce(peak, reduction="max").item()  # engine: the largest peak of any rank
    frame.attrs.update({
        "precision": precision, "gradient_checkpointing": config.gradient_checkpointing,
        "interrupted": stats["interrupted"], "train_seconds": seconds, "tokens": stats["tokens"],
        "tokens_per_second": stats["tokens"] / seconds if seconds else float("nan"), "peak_memory_mb": peak / 2**20,
        "config": asdict(config), "stopped_early_at": stats["stopped_early_at"], "best_step": best.step,
        "best_val_loss": best.val if best.step is not None else None,
    })
    if accelerator:
        frame.attrs.update({"memory_at_start_mb": memory.at_start / 2**20, "world_size": accelerator.num_processes,
                            "distributed_type": str(accelerator.distributed_type).split(".")[-1]})
    if stats["interrupted"]:
        print(f"Training interrupted after {len(frame[frame.step > 0])} of {config.steps} steps; "
              "returning the history so far.")
    return frame


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return {name: tensor} of the trainable parameters, tied ones once, on the CPU (notebook 06)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trained(model: nn.Module, path: str | Path) -> Path:
    """Return the path of a safetensors file holding only the trainable tensors of `model` (notebook 06)."""
    from safetensors.torch import save_file

    state = trained_state(model)
    if not state:
        raise ValueError(f"{type(model).__name__} has no trainable tensors to save; apply a strategy first.")
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = getattr(model, "strategy_info", None)
    save_file(state, str(path), metadata={"strategy": getattr(info, "name", ""), "model": type(model).__name__})
    return path


@torch.no_grad()
def load_trained(model: nn.Module, path: str | Path) -> nn.Module:
    """Return `model` with the tensors saved by `save_trained` copied in, names and shapes checked (notebook 06)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with helpers.save_trained(model, path).")
    state, params = load_file(str(path)), dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"{path} holds tensors that {type(model).__name__} lacks: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}. Load it into the same model (and the same strategy "
                         "wrapper, e.g. LoRA) it was saved from.")
    for name, tensor in state.items():
        target = params[name]
        if target.shape != tensor.shape:
            raise ValueError(f"Tensor {name} has shape {tuple(tensor.shape)} in {path} "
                             f"but {tuple(target.shape)} in the model.")
        target.copy_(tensor.to(target.device, target.dtype))
    return model


def save_full(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Return the folder holding the full model (and tokenizer) written by save_pretrained (notebook 07).

    A peft-wrapped model saves only its adapter this way; merge it first (model.merge_and_unload()) to export it whole.
    """
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return {name: copy} of every frozen parameter, to check after training that none moved (notebook 03)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def changed_tensors(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    """Return the names of parameters that differ (even by one bit) from `snapshot` (notebook 03)."""
    params = dict(model.named_parameters())
    return [n for n, t in snapshot.items() if not torch.equal(params[n].detach(), t)]


def train_strategy(model: nn.Module, train_data: DataLoader, val_data: DataLoader, config: TrainConfig, *,
                   frozen: dict[str, torch.Tensor] | None = None, accelerator=None, callback=None) -> pd.DataFrame:
    """Return the history of `train` on `model` (a strategy applied), checked: the one pipeline step (notebook 04).

    Ctrl-C raises KeyboardInterrupt, so that nothing half-trained is evaluated or saved; a tensor frozen from start to
    end that moved by one bit (`frozen`: a snapshot taken before, else taken here) is a bug in the strategy: it raises.
    """
    # FSDP re-lays the parameters into its shards; the strategies' frozen sets are checked in one process and on DDP.
    frozen = ({} if is_fsdp(accelerator) else frozen_snapshot(model)) if frozen is None else frozen
    history = train(model, train_data, val_data, config, accelerator=accelerator, callback=callback)
    if history.attrs["interrupted"]:
        name = getattr(getattr(model, "strategy_info", None), "name", type(model).__name__)
        raise KeyboardInterrupt(f"Training of {name} was interrupted; nothing was evaluated or saved.")
    params = dict(model.named_parameters())
    # Tensors frozen from start to end; gradual unfreezing trains some that were frozen at the start, never the reverse.
    changed = changed_tensors(model, {n: t for n, t in frozen.items() if not params[n].requires_grad})
    if changed:
        raise AssertionError(f"{len(changed)} frozen tensors changed during training: {changed[:5]}")
    return history
