"""Medusa-2: draft heads trained jointly with LoRA adapters on the backbone, the backbone's
quality kept by the paper's three devices:
- self-distillation: the backbone's loss is the KL divergence from the original model's
  distribution (the same model with its adapters switched off) to the adapted one's, at every
  position that predicts a response token, so the data (the model's own outputs) pulls it
  nowhere;
- a combined loss: kl_weight * KL + heads_weight * (the heads' losses weighted by depth, as the
  heads-only trainer computes them, teacher loss included: the heads' teacher is the original's
  distribution, the one the adapted backbone is held to);
- warm-up: the heads start trained (`medusa train --init-heads`), the adapters learn with a
  smaller learning rate (adapter_lr_scale times the heads'), optionally frozen for the first
  adapter_start steps.

Everything else (schedule, checkpoints and resume, time limit, held-out evaluation after each
epoch) is the heads-only `Trainer`'s; the checkpoint also holds the adapters. Knows nothing of
files beyond the checkpoint, or of the CLI."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medusa.errors import HeadsMismatchError
from medusa.training.features import base_hidden, model_hidden, teacher_positions
from medusa.training.lora import LoRAConfig, adapters_disabled, apply_lora, lora_modules, lora_parameters, lora_tensors
from medusa.training.losses import kl_loss, teacher_probs
from medusa.training.trainer import TrainConfig, Trainer


@dataclass(frozen=True)
class JointConfig:
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapter_lr_scale: float = 0.1  # the adapters' learning rate: the heads' times this
    kl_weight: float = 1.0  # weight of the backbone's self-distillation loss
    heads_weight: float = 0.2  # weight of the heads' combined loss (the paper's lambda_0)
    adapter_start: int = 0  # optimiser steps with the adapters frozen (heads alone) first

    def check(self) -> None:
        self.lora.check()
        if not self.adapter_lr_scale > 0:
            raise ValueError(f"the adapters' learning rate must be positive (scale {self.adapter_lr_scale})")
        if self.kl_weight < 0 or self.heads_weight <= 0:
            raise ValueError("the KL weight must be >= 0 and the heads' weight > 0")
        if self.adapter_start < 0:
            raise ValueError(f"adapter_start must be >= 0, got {self.adapter_start}")


class JointTrainer(Trainer):
    """Trainer of heads plus backbone adapters. `base` gets LoRA modules (`apply_lora`) unless it
    carries them already (set up by the caller, e.g. to load trained adapters into them)."""

    shared_logit_tables, logits_memory_share = 3, 0.5  # the KL's tables; room for the backbone's activations

    def __init__(self, base, heads, train, heldout, cfg: TrainConfig, joint: JointConfig,
                 checkpoint_dir: str | Path | None = None):
        joint.check()
        self.joint = joint
        mods = lora_modules(base) or apply_lora(base, joint.lora)
        for name, m in mods.items():
            if m.lora_A.shape[0] != joint.lora.rank or m.scale != joint.lora.scale:
                raise ValueError(f"{name} carries LoRA of another rank or alpha than this run's")
        super().__init__(base, heads, train, heldout, cfg, checkpoint_dir)
        for p in lora_parameters(base):  # Trainer froze the whole base
            p.requires_grad_(True)

    def _extra_groups(self) -> list[dict]:
        return [{"params": lora_parameters(self.base), "weight_decay": 0.0, "lr_scale": self.joint.adapter_lr_scale,
                 "adapters": True}]

    def _lr_scale(self, group: dict) -> float:
        if group.get("adapters") and self.state.step < self.joint.adapter_start:
            return 0.0
        return group.get("lr_scale", 1.0)

    def _losses(self, tokens: torch.Tensor, mask: torch.Tensor):
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        needed = teacher_positions(mask)  # [B, T]: positions that predict a response token
        with adapters_disabled(self.base):
            original = base_hidden(self.base, tokens)  # [B, T, D], no grad: the teacher
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            teacher, row = teacher_probs(original, needed, self.base.lm_head)  # [N, V], [B, T]
            del original
            hidden = model_hidden(self.base, tokens)  # [B, T, D], through the adapters
            kl = kl_loss(hidden, needed, teacher, self.base.lm_head, checkpointed=self.recompute)
            # the heads learn from the adapted hidden states; their teacher is the original's distribution
            heads_loss, per_head = self._head_losses(tokens, mask, hidden, teacher, row)
        total = self.joint.kl_weight * kl.loss + self.joint.heads_weight * heads_loss
        extra = {"kl": (kl.loss.detach() * kl.rows, kl.rows), "agree": (kl.agree, kl.rows)}
        return total, per_head, extra

    # ------------------------------------------------------------------ checkpoints and results

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return lora_tensors(self.base)

    def _checkpoint_extra(self) -> dict:
        return {"adapters": {k: v.cpu() for k, v in self.adapter_tensors().items()},
                "lora": dataclasses.asdict(self.joint.lora)}

    def _load_extra(self, ck: dict, path: Path) -> None:
        if "adapters" not in ck:
            raise HeadsMismatchError(f"checkpoint {path} is of heads-only training: remove it or use another --out for --joint")
        have = {**ck["lora"], "targets": tuple(ck["lora"]["targets"])}
        if have != dataclasses.asdict(self.joint.lora):
            raise HeadsMismatchError(f"checkpoint {path} holds adapters of rank {have['rank']}, alpha {have['alpha']}, "
                                     f"targets {','.join(have['targets'])}: use the same LoRA settings to resume, or another --out")
        mods = lora_modules(self.base)
        with torch.no_grad():
            for name, m in mods.items():
                m.lora_A.copy_(ck["adapters"][f"{name}.lora_A"])
                m.lora_B.copy_(ck["adapters"][f"{name}.lora_B"])
