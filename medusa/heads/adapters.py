"""Medusa-2 backbone adapters: LoRA matrices for the base model's attention and MLP projections,
stored beside the heads they were trained with (`adapters.safetensors`), and merged into the
backbone's weights once when those heads load (so a decode step costs what it did).

A heads folder whose heads.json carries `extra["adapters"]` ({"file", "rank", "alpha", "targets",
"digest", "base_fingerprint"}) was trained jointly with its backbone: the model it decodes with
is the base plus `alpha / rank * B @ A` on every target projection. Loading such heads
(`medusa.heads.io.load_heads`) calls `attach_adapters`, which
- merges the adapters into a plain model in place (W += scale * B @ A, computed in float32), and
  marks the model with the original fingerprint and the adapters' digest, so that the same heads
  may load again (nothing is merged twice) while heads of the original backbone, or of other
  adapters, are refused;
- or, where the model's projections are LoRA modules kept separate (joint training, a backbone
  shared with other variants), loads the matrices into them unmerged.

Merging edits the projection weights in place, so a model whose q/k/v and gate/up projections
were fused (`Transformer.fuse_projections`: the separate weights are views of the fused ones)
sees the merged weights in its fused GEMMs too. Knows nothing of training or decoding."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medusa.errors import HeadsMismatchError

ADAPTERS = "adapters.safetensors"
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
MARK = "_medusa_adapters"  # attribute set on a model whose weights carry merged adapters


def target_names(model, targets) -> list[str]:
    """Dotted names (`layers.3.self_attn.q_proj`) of the target projections of every layer."""
    out = []
    for i, _ in enumerate(model.layers):
        for t in targets:
            if t not in TARGETS:
                raise ValueError(f"unknown LoRA target {t!r}: known {', '.join(TARGETS)}")
            out.append(f"layers.{i}.{'self_attn' if t in ATTENTION_TARGETS else 'mlp'}.{t}")
    return out


def digest_of(tensors: dict[str, torch.Tensor]) -> str:
    """16 hex digits identifying a set of adapter matrices (names, shapes and float32 values)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapters(folder: str | Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float, targets,
                  base_fingerprint: str) -> dict:
    """Write `adapters.safetensors` ({name}.lora_A [r, in], {name}.lora_B [out, r], float32) and
    return the entry for heads.json's extra["adapters"]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    meta = {"rank": str(rank), "alpha": repr(float(alpha)), "targets": ",".join(targets), "base_fingerprint": base_fingerprint}
    save_file(state, str(folder / ADAPTERS), metadata=meta)
    return {"file": ADAPTERS, "rank": int(rank), "alpha": float(alpha), "targets": list(targets),
            "digest": digest_of(state), "base_fingerprint": base_fingerprint,
            "params": int(sum(v.numel() for v in state.values()))}


def read_adapters(folder: str | Path, entry: dict) -> dict[str, torch.Tensor]:
    """The matrices named by heads.json's adapters entry, checked against its digest."""
    path = Path(folder) / str(entry.get("file", ADAPTERS))
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise HeadsMismatchError(f"the heads in {folder} were trained with backbone adapters, but {path.name} "
                                 f"cannot be read: {e}") from None
    if digest_of(tensors) != entry.get("digest"):
        raise HeadsMismatchError(f"{path} does not hold the adapters its heads.json names (digest mismatch)")
    return tensors


def backbone_fingerprint(base, config) -> str:
    """The fingerprint heads loading onto `base` must carry (`HeadsConfig.base_fingerprint`).
    A plain model: its own. A model with merged adapters: the original's for heads of those very
    adapters, otherwise a name of the adapted backbone that no heads' fingerprint equals."""
    from medusa.heads.io import fingerprint

    mark = getattr(base, MARK, None)
    if mark is None:
        return fingerprint(base)
    entry = config.extra.get("adapters") or {}
    if entry.get("digest") == mark["digest"]:
        return mark["base_fingerprint"]
    return f"{mark['base_fingerprint']}+adapters:{mark['digest']}"


def _module(model, name: str):
    m = model
    for part in name.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def merge_into(model, tensors: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B @ A for every adapted projection, in place, in float32."""
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for name in names:  # every weight checked before any changes
        A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        w = _module(model, name).weight
        if not (isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype.itemsize >= 2):
            raise HeadsMismatchError(f"cannot merge adapters into {name}: its weight is {getattr(w, 'dtype', type(w))}")
        if tuple(w.shape) != (B.shape[0], A.shape[1]) or A.shape[0] != B.shape[1]:
            raise HeadsMismatchError(f"adapter {name} is {B.shape[0]}x{A.shape[1]}, the weight {tuple(w.shape)}")
    for name in names:
        A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        w = _module(model, name).weight
        with torch.no_grad():
            delta = (B.to(w.device, torch.float32) @ A.to(w.device, torch.float32)) * scale  # [out, in]
            w.copy_((w.float() + delta).to(w.dtype))  # in place: fused weights are views of these


def attach_adapters(folder: str | Path, config, base) -> None:
    """The hook of `load_heads`: give `base` the adapters its heads were trained with (module
    docstring), or do nothing for heads of a frozen backbone."""
    entry = config.extra.get("adapters")
    if not entry:
        return
    from medusa.heads.io import fingerprint

    tensors = read_adapters(folder, entry)
    targets = list(entry.get("targets") or [])
    try:
        names = target_names(base, targets)
    except ValueError as e:
        raise HeadsMismatchError(f"{Path(folder) / ADAPTERS}: {e}") from None
    expected = {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    if set(tensors) != expected:
        raise HeadsMismatchError(f"{Path(folder) / ADAPTERS} does not hold one A and B per target projection")
    scale = float(entry["alpha"]) / int(entry["rank"])
    mark = getattr(base, MARK, None)
    if mark is not None:
        if mark["digest"] != entry["digest"]:  # backbone_fingerprint refused these heads already
            raise HeadsMismatchError("this model already carries other merged adapters: load it again for these heads")
        return  # merged before: the same adapters, nothing to do
    first = _module(base, names[0])
    if hasattr(first, "lora_A"):  # LoRA modules kept separate: load into them, unmerged
        for n in names:
            m = _module(base, n)
            if float(m.scale) != scale or tuple(m.lora_A.shape) != tuple(tensors[f"{n}.lora_A"].shape):
                raise HeadsMismatchError(f"the model's LoRA modules (rank {m.lora_A.shape[0]}, scale {m.scale}) differ "
                                         f"from the adapters in {folder} (rank {entry['rank']}, alpha {entry['alpha']})")
            with torch.no_grad():
                m.lora_A.copy_(tensors[f"{n}.lora_A"])
                m.lora_B.copy_(tensors[f"{n}.lora_B"])
        return
    original = fingerprint(base)
    merge_into(base, tensors, scale)
    setattr(base, MARK, {"base_fingerprint": original, "digest": entry["digest"]})
