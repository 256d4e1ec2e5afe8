"""Triton kernels of fastnorm, installed as fastnorm.triton_kernels (never a top-level package)."""
