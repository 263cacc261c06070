"""The networks of the paper: the DCG prior τ_D and the conditional denoiser ε_θ, as Flax modules.

fast_conv (CPU-fast convolution), layers (PyTorch-parity init, BatchNorm, Conv), resnet (the
trunks), dcg (global + local guidance), denoiser (ρ(x) and the noise MLP), pretrained (weights).
"""
