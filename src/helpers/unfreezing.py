"""Gradual unfreezing with discriminative learning rates (ULMFiT, Howard & Ruder 2018), as a training strategy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .strategies import StrategyInfo, find_layers

UNFREEZING_DEFAULTS: dict = {"every": 5, "factor": 2.6}
"""Default options: a block more every 5 optimizer steps; each lower block learns 2.6 times slower (ULMFiT's factor)."""


def unfreezing_stages(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Return the (label, parameters) stages of gradual unfreezing, top to bottom (notebook 08).

    Head, final norm and top block first, then each lower block, the embeddings, and "other" (last, when the model
    has any): the tensors outside embeddings, blocks, final norm and head.
    """
    layers = find_layers(model)
    seen: set[int] = set()

    def fresh(params) -> list[nn.Parameter]:
        out = [p for p in dict.fromkeys(params) if id(p) not in seen]  # a tensor belongs to the first stage it is in
        seen.update(id(p) for p in out)
        return out

    n = len(layers.blocks)
    # With a tied head the token embedding is the head's weight, so it trains from the first step with the head.
    top = [layers.head] + ([layers.final_norm] if layers.final_norm is not None else []) + [layers.blocks[n - 1]]
    stages = [(f"head, final norm, block {n - 1}", fresh(p for m in top for p in m.parameters()))]
    stages += [(f"block {i}", fresh(layers.blocks[i].parameters())) for i in range(n - 2, -1, -1)]
    last = [("embeddings", fresh(p for m in layers.embeddings for p in m.parameters())), ("other", fresh(layers.other))]
    return stages + [(label, params) for label, params in last if params]


@dataclass
class GradualUnfreezing(StrategyInfo):
    """StrategyInfo of gradual unfreezing: discriminative rates, a block more every `every` steps (notebook 08)."""

    every: int = UNFREEZING_DEFAULTS["every"]
    factor: float = UNFREEZING_DEFAULTS["factor"]
    steps_done: int = 0

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Return one optimizer group per stage, top first, at lr, lr/factor, lr/factor**2, ... (notebook 08).

        Every stage is in the optimizer from the start; AdamW skips a tensor whose gradient is None.
        """
        return [
            {"params": params, "lr": lr / self.factor**depth, "name": label}
            for depth, (label, params) in enumerate(unfreezing_stages(model))
        ]

    def on_step(self, model: nn.Module, step: int) -> None:
        """Record that `step` optimizer steps are done, so the next training forward unfreezes (notebook 08)."""
        self.steps_done = step

    def unfreeze(self, model: nn.Module) -> None:
        """Set requires_grad on the stages due after `steps_done` steps, never freezing one (notebook 08)."""
        # One stage (top first) trains in the first step, one more every `every` steps.
        for _, params in unfreezing_stages(model)[: 1 + self.steps_done // self.every]:
            for p in params:
                p.requires_grad_(True)


def _unfreeze_before_forward(module: nn.Module, args) -> None:
    info = getattr(module, "strategy_info", None)
    # Only a training forward that builds a graph needs the flags; validation runs under no_grad in eval mode.
    # Unfreezing here rather than in on_step keeps a block due after the last step out of the trainable count.
    if isinstance(info, GradualUnfreezing) and module.training and torch.is_grad_enabled():
        info.unfreeze(module)


def gradual_unfreezing(model: nn.Module, *, every: int = UNFREEZING_DEFAULTS["every"],
                       factor: float = UNFREEZING_DEFAULTS["factor"]) -> tuple[nn.Module, StrategyInfo]:
    """Return (the model with only head, final norm and top block trainable, its info) (first used in notebook 08)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every (optimizer steps between unfreezing two blocks) must be a positive int; "
                         f"got {every!r}.")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"factor (learning-rate ratio between neighbouring blocks) must be a number >= 1; "
                         f"got {factor!r}.")
    layers = find_layers(model)
    model.requires_grad_(False)
    info = GradualUnfreezing(name="gradual_unfreezing", options={"every": every, "factor": factor}, every=every,
                             factor=factor)
    info.unfreeze(model)
    if not getattr(model, "_gradual_unfreezing_hook", False):
        model.register_forward_pre_hook(_unfreeze_before_forward)
        model._gradual_unfreezing_hook = True
    n = len(layers.blocks)
    tied = (" The head is tied to the token embedding, so the embedding trains from the first step, at the head's rate."
            if layers.tied else " The untied embeddings are the last stage to unfreeze.")
    info.summary = (
        f"Gradual unfreezing: training starts with the head, the final norm and block {n - 1}; every {every} optimizer "
        f"steps the next lower block joins. Discriminative learning rates: each block below learns {factor:g} times "
        f"slower than the one above." + tied)
    return model, info
