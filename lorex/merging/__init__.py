"""Data-free merging of experts fine-tuned from one base: one small module per method behind one
interface (``MergeMethod``), listed in ``lorex.merging.methods``, streamed tensor by tensor
(``merge_models``)."""

from lorex.merging.base import MERGE_METHODS, MergeContext, MergeMethod, register_merge_method
from lorex.merging.lora_out import merge_to_lora
from lorex.merging.merge import check_experts, merge_models
from lorex.merging.methods import METHOD_CLASSES, method_from_name
from lorex.merging.recipe import Recipe, read_recipe, recipe_text, write_recipe
from lorex.merging.sources import ModelSource

__all__ = [
    "MERGE_METHODS",
    "METHOD_CLASSES",
    "MergeContext",
    "MergeMethod",
    "ModelSource",
    "Recipe",
    "check_experts",
    "merge_models",
    "merge_to_lora",
    "method_from_name",
    "read_recipe",
    "recipe_text",
    "register_merge_method",
    "write_recipe",
]
