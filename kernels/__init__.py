"""Triton device code (``@triton.jit`` only) for precision_ce; host code lives in precision_ce."""
