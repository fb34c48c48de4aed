"""AdamW, learning-rate schedules with warmup, gradient clipping: on flat float32 vectors."""

import math

import numpy as np
from pyllm.base import PyllmError

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, iters: int, lr: float, schedule: str = "cosine", warmup: int = 0) -> float:
    """The learning rate of optimizer step `step` (0-based) of `iters`.

    Warmup rises linearly, lr * (step + 1) / warmup for the first `warmup` steps; then
    cosine decays as lr * (1 + cos(pi * progress)) / 2 and linear as lr * (1 - progress),
    progress = (step - warmup) / (iters - warmup) going from 0 towards 1 (both reach 0 only
    after the last step); constant stays at lr."""
    if schedule not in SCHEDULES:
        raise PyllmError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, iters - warmup)
    if schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(grad: np.ndarray, max_norm: float) -> float:
    """Scale grad in place so its L2 norm is at most max_norm (<= 0: no clipping).
    Returns the norm before clipping."""
    norm = float(np.sqrt(np.dot(grad.astype(np.float64), grad.astype(np.float64))))
    if max_norm > 0 and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)
    return norm


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW:
    p <- p * (1 - lr * wd), then p <- p - lr * m_hat / (sqrt(v_hat) + eps)."""

    def __init__(self, size: int, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.m = np.zeros(size, dtype=np.float32)
        self.v = np.zeros(size, dtype=np.float32)
        self.t = 0

    def step(self, params: np.ndarray, grad: np.ndarray, lr: float):
        self.t += 1
        if self.weight_decay:
            params *= np.float32(1.0 - lr * self.weight_decay)
        self.m *= np.float32(self.b1)
        self.m += np.float32(1.0 - self.b1) * grad
        self.v *= np.float32(self.b2)
        self.v += np.float32(1.0 - self.b2) * grad * grad
        m_hat_scale = 1.0 / (1.0 - self.b1 ** self.t)
        v_hat_scale = 1.0 / (1.0 - self.b2 ** self.t)
        denom = np.sqrt(self.v * np.float32(v_hat_scale)) + np.float32(self.eps)
        params -= np.float32(lr * m_hat_scale) * self.m / denom

    def state(self) -> dict:
        return {"adam_m": self.m, "adam_v": self.v, "adam_t": np.int64(self.t)}

    def load(self, state: dict):
        if state["adam_m"].shape != self.m.shape or state["adam_v"].shape != self.v.shape:
            raise PyllmError("the checkpoint's optimizer state does not fit this adapter")
        self.m[...] = state["adam_m"]
        self.v[...] = state["adam_v"]
        self.t = int(state["adam_t"])
