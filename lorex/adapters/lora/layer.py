"""``LoraLinear``: a frozen ``nn.Linear`` plus any number of named low-rank updates.

``y = W x + b + sum_a w_a * s_a * B_a A_a dropout(x)`` over the active adapters ``a`` with weights
``w_a`` (1 for a single active adapter). The parameter names follow PEFT (``base_layer``,
``lora_A.<name>``, ``lora_B.<name>``) so state dicts map one to one onto PEFT's files.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: dict[str, float] = {}  # adapter name -> weight in the weighted sum
        self.merged: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0) -> None:
        """A new update with A Kaiming-uniform (a = sqrt 5, as PEFT and nn.Linear) and B zero."""
        dtype, device = self.base_layer.weight.dtype, self.base_layer.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:  # take only this one out of the weights; the others stay merged
            others = [n for n in self.merged if n != name]
            self.unmerge()
            self.merge(others)
        for container in (self.lora_A, self.lora_B, self.lora_dropout):
            del container[name]
        self.scaling.pop(name)
        self.active.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The exact dense update ``s * B @ A``, in float32, shaped like the base weight."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight: zero overhead at inference."""
        with torch.no_grad():
            for name in names:
                if name in self.merged:
                    continue
                w = self.base_layer.weight
                w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
                self.merged.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged:
                name = self.merged.pop()
                w = self.base_layer.weight
                w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        for name, weight in self.active.items():
            if name in self.merged or weight == 0:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            # Scale the rank-r activation, not the full-width output: r << out elements to touch.
            y = y + b(a(self.lora_dropout[name](x)) * (self.scaling[name] * weight))
        return y

    def extra_repr(self) -> str:
        return f"adapters={list(self.scaling)}, active={self.active}, merged={self.merged}"
