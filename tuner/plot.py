"""`pyllm finetune --plot LOG.jsonl`: training and validation loss curves as LOG.png.

matplotlib is optional (pip install matplotlib, or pyllm's `plot` extra); without it this
is a one-line error, and training itself never needs it.
"""

import json
from pathlib import Path

from pyllm.base import PyllmError


def read_log(path) -> tuple:
    """([(step, loss)], [(step, val_loss)]) from a finetune jsonl log."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PyllmError(f"cannot read log {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PyllmError(f"{path} is not a finetune log (not UTF-8 text)") from None
    train, val = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise PyllmError(f"{path}:{i}: not a finetune log record") from None
        if "loss" in rec:
            train.append((step, float(rec["loss"])))
        if "val_loss" in rec:
            val.append((step, float(rec["val_loss"])))
    if not train and not val:
        raise PyllmError(f"{path}: the log has no loss records yet")
    return train, val


def plot_log(path, out=None) -> Path:
    """Draw the curves; returns the PNG's path (default: the log's, with .png)."""
    train, val = read_log(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PyllmError("--plot needs matplotlib (pip install matplotlib)") from None
    path = Path(path)
    out = Path(out) if out else path.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(path.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.partial")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(out)
    except OSError as e:
        raise PyllmError(f"cannot write {out}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return out
