"""Rotary position embedding tables: cos/sin of every (position, pair), as llama.cpp computes them.

For pair i of n_dims rotated dims at position p (ggml/src/ggml-cpu/ops.cpp, ggml_rope_cache_init
and rope_yarn; the ramp's bounds from ggml.c, ggml_rope_yarn_corr_dims):

    theta_extrap = p * base^(-2i/n_dims) / freq_factors[i]     (freq_factors: Llama-3's rope_freqs)
    theta_interp = theta_extrap / factor                       (freq_scale = 1/factor)
    none:   theta = theta_extrap
    linear: theta = theta_interp
    yarn:   theta = theta_interp * (1 - r_i) + theta_extrap * r_i,  r_i = 1 - clamp((i - low) / (high - low), 0, 1)
    cos, sin = cos(theta) * mscale, sin(theta) * mscale

low/high are the pair indices that turn beta_fast and beta_slow rotations over the original
context (floored / ceiled, as transformers' YaRN with truncate=True). mscale is
rope.scaling.attn_factor (default 1), times 1 + 0.1 ln(factor) for YaRN with factor > 1: in
llama.cpp that product is what reaches the rotation after src/llama-context.cpp divides its
own yarn_attn_factor by the 1 + 0.1 ln(factor) that rope_yarn multiplies back in. Scaling
cos and sin scales both q and k, as transformers' attention_scaling does.
"""

import math
from dataclasses import dataclass

import numpy as np

SCALING_TYPES = ("none", "linear", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """How positions are stretched beyond the training context (GGUF rope.scaling.*)."""

    type: str = "none"  # "none", "linear" or "yarn"
    factor: float = 1.0  # context extension: angles are divided by it (where interpolated)
    original_context_length: int = 0  # yarn: the context the model was pre-trained with
    attn_factor: float = 1.0  # rope.scaling.attn_factor: multiplies cos and sin, any type
    beta_fast: float = 32.0  # yarn: rotations at which the ramp starts (pure extrapolation below)
    beta_slow: float = 1.0  # yarn: rotations at which it ends (pure interpolation above)

    def mscale(self) -> float:
        """The factor cos and sin are multiplied by."""
        m = self.attn_factor
        if self.type == "yarn" and self.factor > 1.0:
            m *= 1.0 + 0.1 * math.log(self.factor)
        return m


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float) -> tuple:
    """(low, high) pair indices of YaRN's ramp: where beta_fast / beta_slow full rotations fit
    into the original context, floored / ceiled and clamped to 0..n_dims-1."""

    def dim(n_rot):
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    return max(0.0, math.floor(dim(beta_fast))), min(n_dims - 1.0, math.ceil(dim(beta_slow)))


def inv_freqs(n_dims: int, base: float, scaling: RopeScaling = RopeScaling(), freq_factors=None) -> np.ndarray:
    """Angle per position of each pair: theta(p, i) = p * inv_freqs[i].  (n_dims/2,) float64"""
    extrap = base ** (-np.arange(0, n_dims, 2, dtype=np.float64) / n_dims)  # (n_dims/2,)
    if freq_factors is not None:
        extrap = extrap / np.asarray(freq_factors, dtype=np.float64)
    if scaling.type == "none":
        return extrap
    interp = extrap / scaling.factor
    if scaling.type == "linear":
        return interp
    low, high = yarn_corr_dims(n_dims, scaling.original_context_length, base, scaling.beta_fast, scaling.beta_slow)
    i = np.arange(n_dims // 2, dtype=np.float64)
    ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)  # 1: extrapolate, 0: interpolate
    return interp * (1.0 - ramp) + extrap * ramp


def rope_tables(n_ctx: int, n_dims: int, base: float, scaling: RopeScaling = RopeScaling(), freq_factors=None):
    """cos and sin of every position's angles, times mscale: (n_ctx, n_dims/2) float32 each."""
    angles = np.outer(np.arange(n_ctx, dtype=np.float64), inv_freqs(n_dims, base, scaling, freq_factors))
    m = scaling.mscale()
    return (np.cos(angles) * m).astype(np.float32), (np.sin(angles) * m).astype(np.float32)
