"""LoRA on a built base model, applied from outside: the target nn.Linear projections of every
layer (attention q/k/v/o, MLP gate/up/down) are replaced by `LoRALinear` modules that keep the
frozen linear and add `alpha / rank * B @ A x`, B starting at zero (so the adapted model first
computes exactly what the original does). The adapters can be switched off for a forward
(`adapters_disabled`): the same module then computes the original model, which is the teacher
of Medusa-2's self-distillation without a second copy of the weights.

A model whose projections were fused for inference (`Transformer.fuse_projections`) is unfused
first (its fused GEMMs would bypass the LoRA modules); the separate weights were views of the
fused ones, so nothing is copied. Knows nothing of heads, losses or files (medusa.heads.adapters
saves and merges the matrices)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medusa.heads.adapters import TARGETS, target_names


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self) -> None:
        """ValueError for settings no adapter can take."""
        if self.rank < 1:
            raise ValueError(f"the LoRA rank must be >= 1, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"the LoRA alpha must be a positive number, got {self.alpha}")
        if not self.targets:
            raise ValueError("no LoRA targets")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets must be distinct names among {', '.join(TARGETS)}, got {', '.join(self.targets)}")


class LoRALinear(nn.Module):
    """y = base(x) + scale * B (A x); `base` frozen, A [r, in] (Kaiming-uniform), B [out, r] (zero).
    The adapter matrices are float32 (trained like the heads, under autocast on a GPU)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.enabled = True
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init

    # the wrapped linear's weights under their usual names: the base fingerprint and any code
    # reading `proj.weight` see the frozen original
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """scale * B @ A [out, in], float32: what merging adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.lora_A.dtype
        h = F.linear(F.linear(x.to(dt), self.lora_A.to(dt)), self.lora_B.to(dt))  # [.., out]
        return y + (h * self.scale).to(y.dtype)


def unfuse(model) -> None:
    """Make the layers run their separate projections again (Transformer.fuse_projections):
    drop the fused buffers; the separate weights (views of them) keep the values."""
    for layer in model.layers:
        for part in (layer.self_attn, layer.mlp):
            for name in ("qkv_weight", "qkv_bias", "qkv_scale", "gate_up_weight", "gate_up_scale"):
                if getattr(part, name, None) is not None:
                    setattr(part, name, None)


def _parent_and_name(model, dotted: str):
    parent_path, _, name = dotted.rpartition(".")
    parent = model
    for part in parent_path.split("."):
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    return parent, name


def apply_lora(model, cfg: LoRAConfig) -> dict[str, LoRALinear]:
    """Replace the target projections by LoRA modules (unfusing the model first); the base
    weights stay frozen. Returns {dotted name: module}. Applying twice is refused."""
    cfg.check()
    unfuse(model)
    model.requires_grad_(False)
    out = {}
    for dotted in target_names(model, cfg.targets):
        parent, name = _parent_and_name(model, dotted)
        lin = getattr(parent, name)
        if isinstance(lin, LoRALinear):
            raise ValueError(f"{dotted} carries LoRA already")
        if type(lin) is not nn.Linear:
            raise ValueError(f"{dotted} is a {type(lin).__name__}, not a plain linear: LoRA cannot wrap it")
        wrapped = LoRALinear(lin, cfg.rank, cfg.alpha)
        setattr(parent, name, wrapped)
        out[dotted] = wrapped
    return out


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_tensors(model) -> dict[str, torch.Tensor]:
    """{dotted name}.lora_A / .lora_B of every LoRA module (what adapters.safetensors holds)."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"{n}.lora_A"] = m.lora_A.detach()
        out[f"{n}.lora_B"] = m.lora_B.detach()
    return out


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


@contextlib.contextmanager
def adapters_disabled(model):
    """Within the block the model computes the original (every LoRA module passes through)."""
    mods = list(lora_modules(model).values())
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e
