"""Optional GPU kernels (Triton) for the decode step's small operations. Each has a torch
fallback with the same contract, taken on CPUs, without Triton, or when MEDUSA_KERNELS=torch;
the core library (model, heads, decoding, training) calls only these wrappers, so it still
works with torch alone. Triton ships with torch's CUDA builds; it is never a requirement."""
