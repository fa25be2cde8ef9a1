"""Draft-head training: self-distillation data, teacher-forced head features and losses, the
trainer, head accuracy and tree search on measured accuracies; Medusa-2's joint training of the
heads with LoRA adapters on the backbone (lora, joint) and the adapted backbone's quality
against the original (quality).

Imports torch, numpy, safetensors and the standard library only; knows no text (the commands
tokenize) and prints nothing (progress goes through callbacks)."""
