"""st2he.models: the one-step pix2pix-turbo generator, the expression and super-resolution models, pathology CLIP.

Importing this package never imports spatialdata, so the training core runs wherever torch, diffusers, transformers
and peft are installed.
"""

from importlib.util import find_spec as _find_spec

_missing = [name for name in ("torch", "diffusers", "peft", "transformers", "open_clip", "safetensors") if _find_spec(name) is None]
if _missing:
    _msg = (
        f"st2he.models needs {', '.join(_missing)}, which are not installed. Install the models extra: "
        "pip install 'st2he[models]' (reading, rasterising and evaluating work without it)."
    )
    raise ImportError(_msg)

from ._clip import ClipModel, load_clip
from ._config import CONFIGS, get_config
from ._expression import (
    ExpressionModel,
    build_expression_model,
    load_expression_model,
    pool_units,
    save_expression_model,
)
from ._io import from_pretrained, load_model, read_published, save_base, save_pretrained, save_published
from ._pix2pix import Pix2PixTurbo, default_prompt
from ._super_resolution import (
    SuperResolutionModel,
    build_super_resolution_model,
    load_super_resolution_model,
    save_super_resolution_model,
)
from ._tokenizer import HashingWordTokenizer
from ._training import TrainConfig

__all__ = [
    "CONFIGS",
    "ClipModel",
    "ExpressionModel",
    "HashingWordTokenizer",
    "Pix2PixTurbo",
    "SuperResolutionModel",
    "TrainConfig",
    "build_expression_model",
    "build_super_resolution_model",
    "default_prompt",
    "from_pretrained",
    "get_config",
    "load_clip",
    "load_expression_model",
    "load_model",
    "load_super_resolution_model",
    "pool_units",
    "read_published",
    "save_base",
    "save_expression_model",
    "save_pretrained",
    "save_published",
    "save_super_resolution_model",
]
