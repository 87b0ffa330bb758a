"""What every model family shares: the pretrained-model interface and the family registry."""

from ._pretrained import PretrainedMixin, unbound_registry
from ._registry import clear_model_cache, families_with, load_model, model_class

__all__ = [
    "PretrainedMixin",
    "clear_model_cache",
    "families_with",
    "load_model",
    "model_class",
    "unbound_registry",
]
