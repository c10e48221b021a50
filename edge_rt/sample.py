"""Choose the next token from logits: greedy at temperature 0, otherwise top-k, then
top-p, then temperature, as llama.cpp's default sampler chain orders them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self):
        # greedy decoding draws nothing: numpy.random (~7 MiB resident with what it imports) stays unloaded
        self.rng = np.random.default_rng(self.seed) if self.temperature > 0 else None

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(logits.argmax())
        k = min(self.top_k, logits.size) if self.top_k > 0 else logits.size
        top = np.argpartition(logits, -k)[-k:]
        top = top[np.argsort(logits[top])[::-1]]  # best first
        z = logits[top].astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            top, p = top[:keep], p[:keep] / p[:keep].sum()
        return int(self.rng.choice(top, p=p))
