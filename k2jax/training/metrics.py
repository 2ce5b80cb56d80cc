"""Training metrics to JSON lines and TensorBoard event files (process 0 writes; others are silent).

    w = MetricWriter(workdir)
    w.write(step, {"loss": 2.3, "tokens_per_s": 1e5, ...})   # scalars; [layers, heads]-shaped values are
    w.close()                                                 # summarised (max) for TensorBoard, kept in JSONL
"""

from __future__ import annotations

import json
import os

import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for name, value in metrics.items():
            a = np.asarray(value)
            row[name] = a.item() if a.ndim == 0 else a.tolist()
            if self._tb is not None:
                self._tb.add_scalar(name if a.ndim == 0 else f"{name}/max", float(np.max(a)) if a.size else 0.0,
                                    int(step))
        self._jsonl.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """Every row of workdir/metrics.jsonl (a resumed run appends; later rows for a step win)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
