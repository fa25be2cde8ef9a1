"""Train draft heads on a frozen base model: AdamW, linear warm-up then cosine decay, per-head
loss weights, optional teacher loss, bfloat16 autocast on GPU, an evaluation pass on the
held-out records after every epoch, and checkpoints that resume to the identical state
(the batch plan is a pure function of (seed, epoch), and the schedule of the step).

With `time_limit` the run fits its schedule to the time it has: after a few timed steps the
total step count is lowered to what fits, and recorded, so a resumed run keeps it.
Progress is reported through callbacks; this module prints nothing and knows no CLI. Joint
training (medusa.training.joint) extends it through the hooks `_extra_groups` (more parameters,
each group's learning rate scaled by its lr_scale), `_losses` and the checkpoint's extra state."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from medusa.training.data import Record, iterate_batches, plan_batches
from medusa.training.features import base_hidden, head_features, head_targets, teacher_positions, teacher_rows
from medusa.training.losses import head_loss, head_weights, teacher_probs


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    epochs: int = 1
    max_steps: int | None = None  # cap on optimiser steps (None: epochs decide)
    max_tokens: int = 16384  # padded tokens per batch
    max_len: int = 1024  # sequences are cut to this many tokens
    head_decay: float = 0.8  # loss weight of head i: head_decay ** i
    teacher_weight: float = 0.0  # 0: hard CE on distilled tokens; 1: soft CE on the base distribution
    seed: int = 0
    time_limit: float | None = None  # seconds; fit the schedule to it
    checkpoint_every: int = 200  # steps (0: only at the end)
    eval_batches: int = 40  # held-out batches per evaluation (0: all)
    recompute_logits: bool | None = None  # recompute head logits in backward (None: only when memory is short)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    total_steps: int = 0
    fitted: bool = False  # total_steps already fitted to the time limit
    history: list[dict] = field(default_factory=list)  # evaluation results


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then cosine."""
    warm = min(cfg.warmup_steps, max(total // 10, 1))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = min(1.0, (step - warm) / max(total - warm, 1))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    def __init__(self, base, heads, train: list[Record], heldout: list[Record], cfg: TrainConfig,
                 checkpoint_dir: str | Path | None = None):
        self.base, self.heads, self.cfg = base, heads, cfg
        self.train_records, self.heldout = train, heldout
        self.device = base.device
        self.autocast = base.dtype != torch.float32
        self.heads.to(device=self.device, dtype=torch.float32).train().requires_grad_(True)
        self.base.requires_grad_(False)
        decay = [p for n, p in heads.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in heads.named_parameters() if p.ndim < 2]
        # each group's learning rate is the schedule's times its lr_scale (joint training adds the
        # backbone's adapters as a group of their own, with a smaller scale)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}] + self._extra_groups()
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        self.weights = head_weights(heads.config.num_heads, cfg.head_decay)
        self.recompute = cfg.recompute_logits if cfg.recompute_logits is not None else not self._logits_fit()
        self.state = TrainState()
        per_epoch = len(self._plan(0))
        self.state.total_steps = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
        self.ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None

    # ------------------------------------------------------------------ pieces

    def _extra_groups(self) -> list[dict]:
        """More parameter groups to train (none: the heads alone)."""
        return []

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    # memory kept for the logits (`_logits_fit`): [rows, V] tables besides two per head, and the
    # share of the free GPU memory they may take (joint training adds the backbone's KL tables
    # and needs room for the backbone's activations)
    shared_logit_tables, logits_memory_share = 1, 0.7

    def _logits_fit(self) -> bool:
        """Whether every head's logits for a full batch can stay in memory for backward: the
        log-probabilities and the teacher rows they meet (float32, [rows, V] each), per head,
        plus the shared teacher table, within 70% of the free GPU memory. CPUs recompute."""
        if self.device.type != "cuda":
            return False
        V = self.heads.config.vocab_size
        need = self.cfg.max_tokens * V * 4 * (2 * self.heads.config.num_heads + self.shared_logit_tables)
        free, _ = torch.cuda.mem_get_info(self.device)
        return need < self.logits_memory_share * free

    def _plan(self, epoch: int) -> list[list[int]]:
        return plan_batches(self.train_records, self.cfg.max_tokens, self.cfg.max_len, self.cfg.seed, epoch)

    def _losses(self, tokens: torch.Tensor, mask: torch.Tensor):
        """Weighted loss, per-head (loss, correct, rows) and further figures {name: (sum, count)}
        on one batch (none for the heads alone)."""
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        hidden = base_hidden(self.base, tokens)  # [B, T, D], no grad
        tw = self.cfg.teacher_weight
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            # the base distribution at each position, once for all heads
            teacher, row = teacher_probs(hidden, teacher_positions(mask), self.base.lm_head) if tw > 0 else (None, None)
            loss, per_head = self._head_losses(tokens, mask, hidden, teacher, row)
        return loss, per_head, {}

    def _head_losses(self, tokens, mask, hidden, teacher, row):
        """The heads' losses on the base hidden states [B, T, D]: the depth-weighted mean and the
        per-head (loss, correct, rows). teacher, row: `teacher_probs` (used when teacher_weight > 0)."""
        tw = self.cfg.teacher_weight
        feats = head_features(self.heads, self.base, tokens, hidden)  # K x [B, T, D]
        per_head = []
        total = torch.zeros((), device=self.device)
        for i, z in enumerate(feats):
            targets, valid = head_targets(tokens, mask, i)
            hl = head_loss(z, targets, valid, lambda x, i=i: self.heads.lm_logits(i, x, self.base), teacher,
                           teacher_rows(row, i) if tw > 0 else None, tw, checkpointed=self.recompute)
            total = total + self.weights[i] * hl.loss
            per_head.append(hl)
        return total / sum(self.weights), per_head

    def train_step(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
        lr = lr_at(self.state.step, self.cfg, self.state.total_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr * self._lr_scale(g)
        self.opt.zero_grad(set_to_none=True)
        loss, per_head, extra = self._losses(tokens, mask)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._trainable(), self.cfg.grad_clip)
        self.opt.step()
        self.state.step += 1
        return {"step": self.state.step, "lr": lr, "loss": float(loss.detach()),
                "top1": [float(h.correct) / max(h.rows, 1) for h in per_head],
                **{k: float(v) / max(float(n), 1.0) for k, (v, n) in extra.items()}}

    def _lr_scale(self, group: dict) -> float:
        return group.get("lr_scale", 1.0)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.heads.eval()
        plan = plan_batches(self.heldout, self.cfg.max_tokens, self.cfg.max_len, 0, 0)
        if self.cfg.eval_batches:
            plan = plan[: self.cfg.eval_batches]
        K = self.heads.config.num_heads
        loss_sum, seen, rows, correct = 0.0, 0, [0] * K, [0] * K
        sums: dict[str, list[float]] = {}
        for b in iterate_batches(self.heldout, plan, self.cfg.max_len):
            loss, per_head, extra = self._losses(b.tokens, b.target_mask)
            loss_sum += float(loss) * b.num_targets
            seen += b.num_targets
            for i, h in enumerate(per_head):
                rows[i] += h.rows
                correct[i] += int(h.correct)
            for k, (v, n) in extra.items():
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0] += float(v)
                acc[1] += float(n)
        self.heads.train()
        return {"step": self.state.step, "epoch": self.state.epoch, "loss": loss_sum / max(seen, 1),
                "top1": [c / max(r, 1) for c, r in zip(correct, rows)], "rows": rows,
                **{k: v / max(n, 1.0) for k, (v, n) in sums.items()}}

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.ckpt)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"heads": self.heads.state_dict(), "opt": self.opt.state_dict(),
                    "state": dataclasses.asdict(self.state), "cfg": dataclasses.asdict(self.cfg),
                    "heads_config": self.heads.config.to_dict(), **self._checkpoint_extra()}, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> bool:
        path = Path(path or self.ckpt) if (path or self.ckpt) else None
        if path is None or not path.is_file():
            return False
        ck = torch.load(path, map_location=self.device, weights_only=False)
        if ck["heads_config"] != self.heads.config.to_dict():
            from medusa.errors import HeadsMismatchError

            raise HeadsMismatchError(f"checkpoint {path} holds other heads ({ck['heads_config']['head_type']}); "
                                     "remove it or use another --out")
        self._load_extra(ck, path)
        self.heads.load_state_dict(ck["heads"])
        self.opt.load_state_dict(ck["opt"])
        self.state = TrainState(**ck["state"])
        return True

    def _checkpoint_extra(self) -> dict:
        """More state for the checkpoint (joint training: the adapters)."""
        return {}

    def _load_extra(self, ck: dict, path: Path) -> None:
        """Restore what `_checkpoint_extra` saved (checking it fits this run first)."""
        if "adapters" in ck:
            from medusa.errors import HeadsMismatchError

            raise HeadsMismatchError(f"checkpoint {path} is of joint training (heads and backbone adapters): "
                                     "continue it with --joint, or remove it or use another --out")

    # ------------------------------------------------------------------ the loop

    def fit(self, on_step: Callable[[dict], None] | None = None, on_eval: Callable[[dict], None] | None = None) -> TrainState:
        """Train until total_steps (or the time limit); evaluate after each epoch and at the end."""
        t0 = time.perf_counter()
        timed_from, timed_step = None, 0
        stop = False
        while self.state.step < self.state.total_steps and not stop:
            plan = self._plan(self.state.epoch)
            for b in iterate_batches(self.train_records, plan[self.state.batch_in_epoch:], self.cfg.max_len):
                metrics = self.train_step(b.tokens, b.target_mask)
                self.state.batch_in_epoch += 1
                metrics["total_steps"] = self.state.total_steps
                if on_step:
                    on_step(metrics)
                if self.cfg.time_limit:
                    now = time.perf_counter() - t0
                    if timed_from is None and self.state.step >= 3:
                        timed_from, timed_step = now, self.state.step
                    elif not self.state.fitted and timed_from is not None and self.state.step - timed_step >= 10:
                        rate = (now - timed_from) / (self.state.step - timed_step)  # s / step
                        fits = self.state.step + int((self.cfg.time_limit * 0.92 - now) / rate)
                        self.state.total_steps = max(self.state.step + 1, min(self.state.total_steps, fits))
                        self.state.fitted = True
                    if now > self.cfg.time_limit:
                        stop = True
                if self.ckpt and self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.state.step >= self.state.total_steps or stop:
                    break
            else:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if self.heldout and self.state.step < self.state.total_steps:
                    self._record_eval(on_eval)
                if self.cfg.time_limit and self.state.fitted and timed_from is not None:
                    # re-fit (downwards only) with the evaluation time included in the rate
                    now = time.perf_counter() - t0
                    rate = (now - timed_from) / max(self.state.step - timed_step, 1)
                    fits = self.state.step + int((self.cfg.time_limit * 0.95 - now) / rate)
                    self.state.total_steps = max(self.state.step + 1, min(self.state.total_steps, fits))
        if self.heldout:
            self._record_eval(on_eval)
        if self.ckpt:
            self.save_checkpoint()
        return self.state

    def _record_eval(self, on_eval) -> None:
        result = self.evaluate()
        self.state.history.append(result)
        if on_eval:
            on_eval(result)
