"""Tools: virtual H&E, generator training, evaluation, zero-shot subtyping and expression from H&E."""

from ._evaluate import evaluate_he
from ._evaluate_expression import evaluate_expression
from ._expression import predict_expression, train_expression
from ._prompts import PROMPTS, TEMPLATES, get_prompts
from ._cycle import cycle_check
from ._register import register_he
from ._super_resolve import super_resolve
from ._train import train_generator
from ._train_super_resolution import train_super_resolution
from ._virtual_he import virtual_he
from ._zero_shot import evaluate_zero_shot, zero_shot

__all__ = [
    "PROMPTS",
    "TEMPLATES",
    "cycle_check",
    "evaluate_expression",
    "evaluate_he",
    "evaluate_zero_shot",
    "get_prompts",
    "predict_expression",
    "register_he",
    "super_resolve",
    "train_expression",
    "train_generator",
    "train_super_resolution",
    "virtual_he",
    "zero_shot",
]
