"""A Llama base and four "fine-tuned" experts in Hugging Face format, built once and cached.

The merge benchmark needs LLM-shaped checkpoints without downloading any: a ``LlamaForCausalLM``
with random weights (seeded) as the base, and experts ``base + perturbation`` whose change looks
like fine-tuning: small dense noise on every tensor plus a low-rank part on every matrix.

dtype: bfloat16, because that is what LLM checkpoints are published in and what mergekit users
merge (mergekit's ``dtype: bfloat16``). bf16 keeps ~3 significant digits (relative step 2^-8),
so the dense noise is 5e-3 of the tensor's RMS and the low-rank part 1e-2: a 1e-3 change would
mostly round back to the base.

    python benchmarks/make_llama_experts.py --out /tmp/llama-experts [--layers 4]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

NOISE_RELATIVE = 5e-3  # dense noise RMS / tensor RMS
LOW_RANK_RELATIVE = 1e-2  # low-rank part RMS / tensor RMS
LOW_RANK = 8
DONE = "built.json"


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 768
    layers: int = 9
    intermediate: int = 2048
    heads: int = 12
    vocab: int = 32000
    experts: int = 4
    seed: int = 0
    dtype: str = "bfloat16"

    def name(self) -> str:
        return (
            f"llama-h{self.hidden}-l{self.layers}-i{self.intermediate}-v{self.vocab}"
            f"-e{self.experts}-s{self.seed}-{self.dtype}"
        )


#: ~113 M parameters: the ~110M Llama of the benchmark (exact count in ``built.json``).
FULL = LlamaShape()
#: A few layers of the same widths: for profiling.
PROFILE = LlamaShape(layers=4)
#: Tiny: the --quick smoke test.
QUICK = LlamaShape(hidden=64, layers=2, intermediate=128, heads=4, vocab=512)


def _perturbation(tensor: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Dense noise plus, for a matrix, a rank-``LOW_RANK`` part; float32, seeded by ``g``."""
    t = tensor.float()
    rms = float(t.square().mean().sqrt()) or 1.0
    delta = torch.randn(t.shape, generator=g) * (NOISE_RELATIVE * rms)
    if t.ndim == 2:
        m, n = t.shape
        a = torch.randn(m, LOW_RANK, generator=g)
        b = torch.randn(LOW_RANK, n, generator=g)
        delta += (a @ b) * (LOW_RANK_RELATIVE * rms / LOW_RANK**0.5)
    return delta


def build(shape: LlamaShape, root: Path) -> dict:
    """Build (once) ``root/<name>/{base,expert_0..}``; returns the record in ``built.json``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / shape.name()
    if (folder / DONE).is_file():
        return json.loads((folder / DONE).read_text())
    dtype = getattr(torch, shape.dtype)
    config = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder / "base", safe_serialization=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for e in range(shape.experts):
        g = torch.Generator().manual_seed(shape.seed * 1000 + e + 1)
        with torch.no_grad():
            for name, param in model.state_dict().items():
                base = state[name]
                param.copy_((base.float() + _perturbation(base, g)).to(dtype))
        model.save_pretrained(folder / f"expert_{e}", safe_serialization=True)
    record = {
        "shape": asdict(shape),
        "parameters": sum(v.numel() for v in state.values()),
        "noise_relative": NOISE_RELATIVE,
        "low_rank_relative": LOW_RANK_RELATIVE,
        "low_rank": LOW_RANK,
        "base": str(folder / "base"),
        "experts": [str(folder / f"expert_{e}") for e in range(shape.experts)],
    }
    (folder / DONE).write_text(json.dumps(record, indent=2))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="cache folder")
    parser.add_argument("--layers", type=int, default=FULL.layers)
    parser.add_argument("--quick", action="store_true", help="the tiny smoke-test Llama")
    args = parser.parse_args()
    shape = QUICK if args.quick else LlamaShape(layers=args.layers)
    print(json.dumps(build(shape, args.out), indent=2))


if __name__ == "__main__":
    main()
