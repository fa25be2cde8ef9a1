"""Draft-head training: self-distillation data, teacher-forced head features and losses, the
trainer, head accuracy and tree search on measured accuracies.

Imports torch, numpy, safetensors and the standard library only; knows no text (the commands
tokenize) and prints nothing (progress goes through callbacks)."""
