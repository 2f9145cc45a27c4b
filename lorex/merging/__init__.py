"""Data-free merging of experts fine-tuned from one base: one small module per method behind one
interface (``MergeMethod``) and a registry, streamed tensor by tensor (``merge_models``)."""

import lorex.merging.methods  # noqa: F401  (registers every method)
from lorex.merging.base import MERGE_METHODS, MergeContext, MergeMethod, register_merge_method
from lorex.merging.run import check_experts, merge_models, method_from_name
from lorex.merging.sources import ModelSource

__all__ = [
    "MERGE_METHODS",
    "MergeContext",
    "MergeMethod",
    "ModelSource",
    "check_experts",
    "merge_models",
    "method_from_name",
    "register_merge_method",
]
