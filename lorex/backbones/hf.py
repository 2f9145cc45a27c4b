"""Hugging Face ``transformers`` vision models (ViT, CLIP vision, DINOv2) as lorex backbones.

The wrapped model keeps its own parameter names, so LoRA targets and state-dict keys are the
ones Hugging Face users know. ``transformers`` is optional and only imported when needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError
from torch import nn

from lorex.errors import LorexError

Triple = tuple[float, float, float]

# model_type -> (model class name, config class name, default mean, default std)
_TYPES: dict[str, tuple[str, str, Triple, Triple]] = {
    "vit": ("ViTModel", "ViTConfig", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip_vision_model": (
        "CLIPVisionModel",
        "CLIPVisionConfig",
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    ),
    "dinov2": ("Dinov2Model", "Dinov2Config", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# A full CLIP checkpoint: only its vision tower is loaded.
_ALIASES = {"clip": "clip_vision_model"}


def _transformers() -> ModuleType:
    """Import ``transformers`` on demand so lorex works without the optional extra."""
    try:
        import transformers
    except ImportError:
        raise LorexError(
            "Hugging Face backbones need the optional 'hf' extra: pip install 'lorex[hf]'"
        ) from None
    return transformers


def _canonical_type(model_type: object) -> str:
    name = _ALIASES.get(str(model_type), str(model_type))
    if name not in _TYPES:
        supported = ", ".join([*_TYPES, *_ALIASES])
        raise LorexError(
            f"unsupported Hugging Face model_type {model_type!r}; supported: {supported}"
        )
    return name


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_hf_directory(path: str | Path) -> bool:
    """True for a ``save_pretrained`` folder (lorex's own model folders carry ``lorex_version``)."""
    config = _read_json(Path(path) / "config.json")
    return isinstance(config, dict) and "model_type" in config and "lorex_version" not in config


def _triple(values: object, source: str) -> Triple:
    try:
        a, b, c = (float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise LorexError(f"{source}: expected three numbers, got {values!r}") from None
    return a, b, c


def _image_size(hf_config: object) -> int:
    size = hf_config.image_size  # type: ignore[attr-defined]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise LorexError(f"non-square image_size {size} is not supported")
        size = size[0]
    return int(size)


class HFBackbone(nn.Module):
    """Frozen-backbone wrapper: ``[0, 1]`` images ``(B, 3, S, S)`` to pooled features ``(B, D)``."""

    #: Default LoRA targets: every layer's attention projections and both MLP layers, in the
    #: names of transformers 5 (q/k/v_proj, o_proj or out_proj, mlp.fc1/fc2) and of transformers
    #: 4's ViT and DINOv2 (query/key/value, attention.output.dense, intermediate/output.dense).
    lora_targets = (
        r"(.*\.)?layers?\.\d+\.((attention|self_attn)\.(q_proj|k_proj|v_proj|o_proj|out_proj)"
        r"|attention\.attention\.(query|key|value)|attention\.output\.dense"
        r"|intermediate\.dense|output\.dense|mlp\.(fc1|fc2))"
    )

    #: The submodule PEFT sees as the model (``lorex.adapters.lora``): adapter files name modules
    #: relative to it, so ``PeftModel.from_pretrained`` loads them on the plain transformers model.
    peft_root = "model"

    def __init__(
        self, model: nn.Module, model_type: str, image_size: int, mean: Triple, std: Triple
    ):
        super().__init__()
        self.model = model
        self.model_type = _canonical_type(model_type)
        self.num_features = int(model.config.hidden_size)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)  # exact values for to_config()
        # Not persistent: the state dict keeps exactly ``model.<hf keys>``.
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> HFBackbone:
        """Load a ``save_pretrained`` folder; mean/std come from its preprocessor config if any."""
        path = Path(path)
        config = _read_json(path / "config.json")
        if not isinstance(config, dict) or "model_type" not in config:
            raise LorexError(f"{path}: no Hugging Face config.json with a model_type")
        model_type = _canonical_type(config["model_type"])
        model_cls, _, mean, std = _TYPES[model_type]
        # Pickled weights (pytorch_model.bin, ...) are never handed to transformers to unpickle.
        if not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            what = f"only pickled weights ({pickled[0]})" if pickled else "no model.safetensors"
            raise LorexError(
                f"{path}: {what}; lorex reads safetensors only "
                "(save_pretrained(..., safe_serialization=True))"
            )
        tf = _transformers()
        kwargs = {"add_pooling_layer": False} if model_type == "vit" else {}
        verbosity = tf.logging.get_verbosity()
        tf.logging.set_verbosity_error()  # we report problems ourselves, in one line
        try:
            model, info = getattr(tf, model_cls).from_pretrained(
                str(path),
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                use_safetensors=True,
                **kwargs,
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            msg = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise LorexError(f"{path}: cannot load {model_cls}: {msg}") from None
        finally:
            tf.logging.set_verbosity(verbosity)
        # Missing or misshapen weights would be left random; a frozen backbone must be complete.
        # Unexpected keys (a classifier head, a full CLIP folder's text tower) are fine to drop.
        mismatched = sorted(str(k[0]) for k in info.get("mismatched_keys", []))
        if mismatched:
            raise LorexError(f"{path}: weight {mismatched[0]!r} does not match config.json's shape")
        missing = sorted(info.get("missing_keys", []))
        if missing:
            raise LorexError(
                f"{path}: checkpoint lacks {len(missing)} weight(s), e.g. {missing[0]!r}"
            )
        pre = _read_json(path / "preprocessor_config.json")
        if isinstance(pre, dict):
            name = path / "preprocessor_config.json"
            mean = _triple(pre.get("image_mean", mean), f"{name} image_mean")
            std = _triple(pre.get("image_std", std), f"{name} image_std")
        model = model.float().eval()
        return cls(model, model_type, _image_size(model.config), mean, std).eval()

    @classmethod
    def from_config(cls, config: dict) -> HFBackbone:
        """Rebuild the architecture with random weights; the real ones come from a state dict."""
        model_type = _canonical_type(config.get("model_type"))
        absent = [k for k in ("hf_config", "image_size", "mean", "std") if k not in config]
        if absent:
            raise LorexError(f"hf backbone config lacks {', '.join(absent)}")
        model_cls, config_cls, _, _ = _TYPES[model_type]
        size = config["image_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise LorexError(f"hf backbone image_size: expected a whole number, got {size!r}")
        if not isinstance(config["hf_config"], dict):
            raise LorexError("hf backbone hf_config: expected an object")
        mean = _triple(config["mean"], "backbone mean")
        std = _triple(config["std"], "backbone std")
        tf = _transformers()
        kwargs = {"add_pooling_layer": False} if model_type == "vit" else {}
        try:  # transformers checks the fields its own way (TypeError, ValueError, its own errors)
            hf_config = getattr(tf, config_cls).from_dict(dict(config["hf_config"]))
            model = getattr(tf, model_cls)(hf_config, **kwargs).float().eval()
        except Exception as exc:  # noqa: BLE001 - any of them means this hf_config is unusable
            msg = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise LorexError(f"hf backbone hf_config: not a valid {config_cls} ({msg})") from None
        return cls(model, model_type, size, mean, std).eval()

    def to_config(self) -> dict:
        return {
            "type": "hf",
            "model_type": self.model_type,
            "hf_config": self.model.config.to_dict(),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise LorexError(
                f"input of shape {tuple(x.shape)} does not fit this backbone: "
                f"expected (B, 3, {s}, {s})"
            )
        return (x - self.input_mean) / self.input_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self._normalise(x))
        # ViTModel's last_hidden_state is already layer-normed; the others pool for us.
        return out.last_hidden_state[:, 0] if self.model_type == "vit" else out.pooler_output

    def pool(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """``forward``'s features from the last layer's tokens (a side network refines those)."""
        if self.model_type == "clip_vision_model":
            tower = getattr(self.model, "vision_model", self.model)  # nested in transformers 4
            return tower.post_layernorm(last_tokens[:, 0])
        return self.model.layernorm(last_tokens)[:, 0]  # ViT and DINOv2: final norm, class token

    def forward_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Tokens ``(B, 1 + N, D)`` after each transformer layer, for side networks."""
        out = self.model(pixel_values=self._normalise(x), output_hidden_states=True)
        return list(out.hidden_states[1:])  # [0] is the embedding output


def module_names(config: dict, keys: list[str]) -> dict[str, str]:
    """Each checkpoint key of a ``save_pretrained`` folder -> the name its tensor has in the model
    transformers builds (the name PEFT's adapters use). transformers 5 renames some families'
    tensors on load and back on save (ViT: ``encoder.layer.N.attention.attention.query`` is
    ``layers.N.attention.q_proj``); keys it does not rename one to one, and every key without
    transformers 5, keep their name. The model is built on the meta device: no weights."""
    try:
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return {k: k for k in keys}
    try:
        hf_config = transformers.AutoConfig.for_model(**config)
        architectures = config.get("architectures") or []
        model_cls = getattr(transformers, architectures[0], None) if architectures else None
        with torch.device("meta"):
            if model_cls is not None:
                model = model_cls(hf_config)
            else:
                model = transformers.AutoModel.from_config(hf_config)
        transforms = get_model_conversion_mapping(model)
        meta_state = model.state_dict()
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build: no renames
        return {k: k for k in keys}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = {}
    for key in keys:
        name, converter = rename_source_key(
            key, renamings, converters, model.base_model_prefix, meta_state
        )
        names[key] = name if converter is None and name in meta_state else key
    return names
