"""``GatedLoraLinear``: a frozen ``nn.Linear`` plus K LoRA experts mixed by a per-sample gate.

SAGE-reID's gated layer (brief, Part A, stage 4), for any K and any token count::

    delta_k = s * B_k A_k x                      # (B, N, out) per expert k
    omega_k = delta_k / (||delta_k||_2 + eps)    # unit norm per token, over output channels
    e_k     = sum_n <omega_k[n], g[n]>           # published: g is (N, out)
            = mean_n <omega_k[n], g>             # light:     g is (out,), pooled over tokens
    w       = softmax(e / tau)                   # (B, K): per sample, over experts
    y       = W x + b + sum_k w_k delta_k

Why it runs in rank space: ``delta_k`` is never built. With ``h_k = A_k x`` (r numbers per
token) and ``B_k = Q_k R_k`` (QR), ``||delta_k|| = s ||R_k h_k||`` and
``<delta_k, g> = s h_k^T (B_k^T g)``, and the mix is one matrix product over the K*r stacked
ranks. The cost is that of K LoRA branches plus O(K r^2) per token, not O(K out) per token;
every expert is handled in the same batched products (no Python loop over experts).
``tests/test_gated.py`` checks it against the explicit per-expert sum. With ``g = 0`` (the
initial gate) every sample gets ``w = 1/K``: the uniform mix of the experts.

Under ``torch.no_grad`` the products that depend on the parameters alone (``R_k``, ``B^T g``,
the stacked ``s B``) are kept between calls and rebuilt when a parameter changes: on a GPU a
gated layer's extra cost is mostly kernel launches, and these were half of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorex.errors import LorexError


class GatedLoraLinear(nn.Module):
    """``base_layer`` (frozen) + K experts ``lora_A`` (K, r, in), ``lora_B`` (K, out, r) + gate.

    The trainable part is ``gate`` (``(tokens, out)`` published, ``(out,)`` light) and the
    temperature ``tau`` (init 1). Inputs are ``(B, N, in)`` token sequences or ``(B, in)``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        r: int,
        scaling: float,
        kind: str = "light",
        tokens: int | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise LorexError(f"a gated layer wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        k, i, o = num_experts, base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Parameter(torch.zeros(k, r, i, **factory), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(k, o, r, **factory), requires_grad=False)
        shape = (tokens, o) if kind == "published" else (o,)
        self.gate = nn.Parameter(torch.zeros(shape, **factory))
        self.tau = nn.Parameter(torch.ones((), **factory))
        self.kind, self.scaling, self.eps, self.r = kind, float(scaling), float(eps), r
        self.recorder: list[torch.Tensor] | None = None  # set by ``record_gate_weights``
        self._cache: tuple | None = None  # (parameters' versions, _products()) for inference

    @property
    def num_experts(self) -> int:
        return int(self.lora_A.shape[0])

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``h = A_k x`` for every expert at once: ``(B, N, K, r)``."""
        k, r, i = self.lora_A.shape
        return F.linear(x, self.lora_A.reshape(k * r, i)).unflatten(-1, (k, r))

    def _products(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(stats, bg, b_stack)``: the matrices that depend on the parameters alone.

        ``stats`` maps a token's stacked ``h`` to every expert's ``R_k h_k``, where ``R_k`` is the
        triangular factor of ``B_k = Q_k R_k``, so that ``||B_k h_k|| = ||R_k h_k||`` costs r
        numbers per expert; for the light gate K more columns give ``<B_k h_k, g> / tau``. ``bg``
        (N, K, r) is the published gate's ``B_k^T g[n] / tau`` (None for the light gate).
        ``b_stack`` (K r, out), row ``k r + j`` = ``s B_k[:, j]``, is contiguous so that the
        mixing product runs at full speed.
        """
        k, o, r = self.lora_B.shape
        bt = self.lora_B.transpose(1, 2)
        triangular = torch.linalg.qr(self.lora_B, mode="r")[1]  # (K, min(out, r), r)
        stats, bg = torch.block_diag(*triangular.transpose(1, 2)), None
        if self.kind == "light":
            columns = torch.block_diag(*(bt @ (self.gate / self.tau))[:, :, None])  # (K r, K)
            stats = torch.cat((stats, columns), 1)
        else:
            bg = torch.einsum("kor,no->nkr", self.lora_B, self.gate / self.tau)
        return stats, bg, bt.reshape(k * r, o) * self.scaling

    def _cached_products(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``_products`` for inference, rebuilt only when a parameter was changed in place
        (its version counter moves), moved or cast."""
        params = (self.lora_A, self.lora_B, self.gate, self.tau)
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._products())
        return self._cache[1]

    def gate_logits(self, h: torch.Tensor, products: tuple | None = None) -> torch.Tensor:
        """``e / tau`` ``(B, K)`` from ``h`` ``(B, N, K, r)``, in rank space (see the module
        doc). Written to launch few kernels: strided views are read in place, never copied."""
        b, n, k, r = h.shape
        if self.kind == "published" and n != self.gate.shape[0]:
            raise LorexError(
                f"the published gate is sized for {self.gate.shape[0]} tokens, got {n}"
            )
        stats, bg, _ = products if products is not None else self._products()
        m = min(self.lora_B.shape[1], r)  # rows of R_k
        stats = h.reshape(b * n, k * r) @ stats
        norm = torch.linalg.vector_norm(stats[:, : k * m].view(b * n, k, m), dim=-1)  # ||B h||
        dot = stats[:, k * m :] if self.kind == "light" else (h * bg).sum(-1).reshape(b * n, k)
        # <omega_k[n], g[n]> = s <h, B^T g> / (s ||B h|| + eps), with s divided out.
        score = (dot / (norm + self.eps / self.scaling)).reshape(b, n, k)
        return score.sum(1) if self.kind == "published" else score.mean(1)

    def mix_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's per-sample weights ``(B, K)`` for input ``x``."""
        h = self.low_rank(x if x.ndim == 3 else x[:, None])
        return torch.softmax(self.gate_logits(h), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.ndim == 2
        if squeeze:
            x = x[:, None]
        if x.ndim != 3:
            raise LorexError(f"a gated layer takes (B, N, in) or (B, in), got {tuple(x.shape)}")
        b, n, _ = x.shape
        k, o, r = self.lora_B.shape
        products = self._products() if torch.is_grad_enabled() else self._cached_products()
        base = self.base_layer(x).reshape(b * n, o)
        h = self.low_rank(x)
        w = torch.softmax(self.gate_logits(h, products), dim=-1)
        if self.recorder is not None:
            self.recorder.append(w.detach().float().cpu())
        mixed = (h * w[:, None, :, None]).reshape(b * n, k * r)
        # in place: no second output-sized pass
        y = base.addmm_(mixed, products[2]).reshape(b, n, o)
        return y[:, 0] if squeeze else y

    def set_expert(self, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy one expert's ``A`` (r, in) and ``B`` (out, r) into slot ``index``."""
        if a.shape != self.lora_A.shape[1:] or b.shape != self.lora_B.shape[1:]:
            raise LorexError(
                f"expert {index}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                f"A {tuple(self.lora_A.shape[1:])} and B {tuple(self.lora_B.shape[1:])}"
            )
        with torch.no_grad():
            self.lora_A[index].copy_(a)
            self.lora_B[index].copy_(b)

    def extra_repr(self) -> str:
        k, o, r = self.lora_B.shape
        return (
            f"experts={k}, r={r}, scaling={self.scaling}, gate={self.kind}{tuple(self.gate.shape)}"
        )
