"""LoRA layers: a frozen ``nn.Linear`` or ``nn.Conv2d`` plus any number of named low-rank updates.

``y = base(x) + sum_a w_a * s_a * B_a A_a dropout(x)`` over the active adapters ``a`` with weights
``w_a`` (1 for a single active adapter). For a convolution ``A`` is a convolution with the base's
kernel, stride and padding into ``r`` channels and ``B`` a 1x1 convolution out of them, as in PEFT.
Parameter names follow PEFT (``base_layer``, ``lora_A.<name>``, ``lora_B.<name>``) so state dicts
map one to one onto PEFT's files.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorex.errors import LorexError


class LoraLayer(nn.Module, abc.ABC):
    """Adapter bookkeeping shared by every wrapped layer type: add, delete, merge, activate."""

    base_type: type[nn.Module] = nn.Module

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.active: dict[str, float] = {}  # adapter name -> weight in the weighted sum
        self.merged: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        """Fall back to the base layer, so code that reads ``proj.in_channels`` or ``fc.weight``
        keeps working on the wrapped module (PEFT's layers do the same for weight and bias)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)

    # Subclasses say how A and B are built, how B A becomes a weight, and how the base runs.
    @abc.abstractmethod
    def _make_pair(self, r: int, **factory) -> tuple[nn.Module, nn.Module]:
        """The (A, B) modules of a rank-``r`` update for this layer type."""

    @abc.abstractmethod
    def _base(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen layer's output, with ``weight`` in place of its own when given."""

    @abc.abstractmethod
    def _low_rank(self, x: torch.Tensor, y: torch.Tensor, name: str, w: float) -> torch.Tensor:
        """``y`` plus ``w`` times adapter ``name``'s scaled update of ``x``."""

    @abc.abstractmethod
    def _rows(self, x: torch.Tensor) -> int:
        """How many times the weight is applied in one call (tokens, or output pixels)."""

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0) -> None:
        """A new update with A Kaiming-uniform (a = sqrt 5, as PEFT and nn.Linear) and B zero."""
        weight = self.base_layer.weight
        a, b = self._make_pair(r, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name] = scaling
        self.dropout_p[name] = dropout

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:  # take only this one out of the weights; the others stay merged
            others = [n for n in self.merged if n != name]
            self.unmerge()
            self.merge(others)
        for container in (self.lora_A, self.lora_B):
            del container[name]
        self.scaling.pop(name)
        self.dropout_p.pop(name)
        self.active.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The exact dense update ``s * B @ A``, in float32, shaped like the base weight."""
        a = self.lora_A[name].weight.float().flatten(1)
        b = self.lora_B[name].weight.float().flatten(1)
        return ((b @ a) * self.scaling[name]).view(self.base_layer.weight.shape)

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

    def _live(self) -> list[tuple[str, float]]:
        """Active adapters that still act through this layer's forward (not merged, weight != 0)."""
        if self.disabled:
            return []
        return [(n, w) for n, w in self.active.items() if w != 0 and n not in self.merged]

    def _fold_per_call(self, x: torch.Tensor, live: list[tuple[str, float]]) -> bool:
        """Whether to add the updates to the weight for this call instead of to the output.

        Exact either way (up to float rounding). Folding adds ``in*out*r`` multiply-adds, at most
        the base's ``rows*in*out`` when ``r <= rows``; the low-rank path adds fewer, but its
        skinny rank-r matmuls run far below peak on CPUs (measured: unmerged vit-tiny at batch 1
        took 1.31x the bare model low-rank, 0.97x folded). Folding is used only when no adapter
        weight needs a gradient (autograd would build a dense weight gradient), no dropout is
        active, and the base is exactly the type this layer wraps (not a subclass).
        """
        if type(self.base_layer) is not self.base_type:
            return False
        if self._rows(x) < sum(self.lora_A[name].weight.shape[0] for name, _ in live):
            return False
        for name, _ in live:
            if self.training and self.dropout_p[name]:
                return False
            if torch.is_grad_enabled() and (
                self.lora_A[name].weight.requires_grad or self.lora_B[name].weight.requires_grad
            ):
                return False
        return True

    def _dropout(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.dropout_p[name]
        return F.dropout(x, p, training=True) if p and self.training else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = self._live()
        if not live:
            return self._base(x)
        if self._fold_per_call(x, live):
            shape = self.base_layer.weight.shape
            weight = self.base_layer.weight.flatten(1)
            for name, w in live:
                a = self.lora_A[name].weight.flatten(1)
                b = self.lora_B[name].weight.flatten(1)
                weight = torch.addmm(weight, b, a, alpha=self.scaling[name] * w)
            return self._base(x, weight.view(shape))
        y = self._base(x)
        for name, w in live:
            y = self._low_rank(x, y, name, w)
        return y

    def extra_repr(self) -> str:
        return f"adapters={list(self.scaling)}, active={self.active}, merged={self.merged}"


class LoraLinear(LoraLayer):
    base_type = nn.Linear

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _make_pair(self, r: int, **factory) -> tuple[nn.Module, nn.Module]:
        a = nn.Linear(self.in_features, r, bias=False, **factory)
        return a, nn.Linear(r, self.out_features, bias=False, **factory)

    def _rows(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_features

    def _base(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The base output; a plain ``nn.Linear`` is called functionally, because a module call
        costs as much as a rank-8 matmul at batch 1 on a CPU."""
        base = self.base_layer
        if type(base) is nn.Linear:
            return F.linear(x, base.weight if weight is None else weight, base.bias)
        return base(x)

    def _low_rank(self, x: torch.Tensor, y: torch.Tensor, name: str, w: float) -> torch.Tensor:
        h = F.linear(self._dropout(x, name), self.lora_A[name].weight)
        # One fused kernel adds s * h B^T to y: no full-width temporaries, no module calls.
        y2d = torch.addmm(
            y.reshape(-1, self.out_features),
            h.reshape(-1, h.shape[-1]),
            self.lora_B[name].weight.t(),
            alpha=self.scaling[name] * w,
        )
        return y2d.view(y.shape)


class LoraConv2d(LoraLayer):
    base_type = nn.Conv2d

    def __init__(self, base_layer: nn.Conv2d):
        if (
            base_layer.groups != 1
            or base_layer.padding_mode != "zeros"
            or isinstance(base_layer.padding, str)
        ):
            raise LorexError(
                "LoRA on nn.Conv2d needs groups=1 and numeric zero padding (got "
                f"groups={base_layer.groups}, padding={base_layer.padding!r}, "
                f"padding_mode={base_layer.padding_mode!r})"
            )
        super().__init__(base_layer)

    def _make_pair(self, r: int, **factory) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        a = nn.Conv2d(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            **factory,
        )
        return a, nn.Conv2d(r, base.out_channels, 1, bias=False, **factory)

    def _rows(self, x: torch.Tensor) -> int:
        base = self.base_layer
        size = x.shape[-2:]
        out = 1
        dims = zip(size, base.kernel_size, base.stride, base.padding, base.dilation, strict=True)
        for n, k, s, p, d in dims:
            out *= max(0, (n + 2 * p - d * (k - 1) - 1) // s + 1)
        return out * (x.numel() // (base.in_channels * size[0] * size[1]))

    def _base(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base_layer
        if weight is None:
            return base(x)
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)

    def _low_rank(self, x: torch.Tensor, y: torch.Tensor, name: str, w: float) -> torch.Tensor:
        h = self.lora_A[name](self._dropout(x, name))
        return y + self.lora_B[name](h) * (self.scaling[name] * w)


WRAPPERS: dict[type[nn.Module], type[LoraLayer]] = {nn.Linear: LoraLinear, nn.Conv2d: LoraConv2d}


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class for ``module`` (subclasses of a supported type included), or None."""
    for base_type, wrapper in WRAPPERS.items():
        if isinstance(module, base_type):
            return wrapper
    return None
