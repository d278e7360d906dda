"""Where models come from, and the architecture table that says where their parts are."""

from lmscope.models._architectures import (
    FAMILIES,
    UNSUPPORTED,
    Architecture,
    Family,
    Fused,
    architecture_of,
    family_of,
)
from lmscope.models._loading import (
    EMBEDDED_DEFAULT,
    LoadedModel,
    available_models,
    cache_dir,
    load_model,
)
from lmscope.models._unembed import Unembed

__all__ = [
    "EMBEDDED_DEFAULT",
    "FAMILIES",
    "UNSUPPORTED",
    "Architecture",
    "Family",
    "Fused",
    "LoadedModel",
    "Unembed",
    "architecture_of",
    "available_models",
    "cache_dir",
    "family_of",
    "load_model",
]
