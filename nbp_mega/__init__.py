"""nbp_mega: Next-Block-Prediction video generation (PyTorch, DeepSpeed, Megatron-core)."""
