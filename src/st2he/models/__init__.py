"""st2he.models: the one-step pix2pix-turbo generator (and, from helper modules, pathology CLIP models).

Importing this package never imports spatialdata, so the training core runs wherever torch, diffusers, transformers
and peft are installed.
"""

from ._clip import ClipModel, load_clip
from ._config import CONFIGS, get_config
from ._io import from_pretrained, load_model, read_published, save_base, save_pretrained, save_published
from ._pix2pix import Pix2PixTurbo, default_prompt
from ._tokenizer import HashingWordTokenizer
from ._training import TrainConfig

__all__ = [
    "CONFIGS",
    "ClipModel",
    "HashingWordTokenizer",
    "Pix2PixTurbo",
    "TrainConfig",
    "default_prompt",
    "from_pretrained",
    "get_config",
    "load_clip",
    "load_model",
    "read_published",
    "save_base",
    "save_pretrained",
    "save_published",
]
