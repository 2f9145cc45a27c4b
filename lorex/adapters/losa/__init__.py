"""LoSA: low-rank side adaptation of a frozen backbone (Mercea et al., CVPR 2024).

``attach_losa(model, config)`` gives a ``LorexModel`` a side network; ``lorex train --method losa``
trains it and ``lorex.load_model`` runs it. The choices the paper leaves open are in docs/losa.md.
"""

from lorex.adapters.losa.config import LosaConfig
from lorex.adapters.losa.mixer import LowRankMixer, LowRankMlp
from lorex.adapters.losa.side import LosaSideNetwork


def attach_losa(model, config: LosaConfig) -> LosaSideNetwork:
    """Build a side network sized for ``model``'s backbone and attach it as ``model.side``."""
    side = LosaSideNetwork.for_backbone(model.backbone, config, model.image_size)
    model.side = side
    return side


__all__ = ["LosaConfig", "LosaSideNetwork", "LowRankMixer", "LowRankMlp", "attach_losa"]
