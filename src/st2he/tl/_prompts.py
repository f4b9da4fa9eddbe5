"""Prompt sets for zero-shot classification of H&E tiles with pathology CLIP models.

A prompt set is a mapping from each class to one or more names of it, plus templates that put a name into a
sentence. The text embedding of a class is the mean over all its names and all templates (a prompt ensemble,
as in MI-Zero and CONCH), L2-normalised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

#: Default templates (CONCH / MI-Zero style); ``{}`` is replaced by a class name.
TEMPLATES: tuple[str, ...] = (
    "{}.",
    "a photomicrograph showing {}.",
    "a photomicrograph of {}.",
    "an image of {}.",
    "an image showing {}.",
    "an example of {}.",
    "{} is shown.",
    "this is {}.",
    "there is {}.",
    "a histopathological image showing {}.",
    "a histopathological image of {}.",
    "a histopathological photograph of {}.",
    "a histopathological photograph showing {}.",
    "shows {}.",
    "presence of {}.",
    "{} is present.",
    "an H&E stained image of {}.",
    "an H&E stained image showing {}.",
    "an H&E image showing {}.",
    "an H&E image of {}.",
    "a histopathology image of {}.",
    "{}, H&E stain.",
    "{}, H&E.",
)

_PROMPTS: dict[str, dict[str, tuple[str, ...]]] = {
    # non-small cell lung cancer subtypes (TCGA LUAD vs LUSC; MI-Zero / CONCH names)
    "nsclc": {
        "LUAD": ("adenocarcinoma", "lung adenocarcinoma", "adenocarcinoma of the lung", "LUAD"),
        "LUSC": (
            "squamous cell carcinoma",
            "lung squamous cell carcinoma",
            "squamous cell carcinoma of the lung",
            "LUSC",
        ),
    },
    # Kaposi's sarcoma vs normal skin
    "kaposi": {
        "KS": (
            "Kaposi's sarcoma",
            "Kaposi sarcoma",
            "Kaposi's sarcoma of the skin",
            "spindle cell proliferation with slit-like vascular spaces",
            "vascular tumor of the skin",
        ),
        "normal": ("normal skin", "normal epidermis and dermis", "healthy skin", "benign skin tissue"),
    },
    # breast cancer vs normal breast
    "breast": {
        "tumor": (
            "breast cancer",
            "invasive breast carcinoma",
            "invasive ductal carcinoma",
            "breast carcinoma",
            "malignant breast tissue",
        ),
        "normal": ("normal breast tissue", "benign breast tissue", "normal breast ducts and lobules", "healthy breast"),
    },
    # colorectal tissue classes of Kather et al. (NCT-CRC-HE-100K / CRC-VAL-HE-7K)
    "crc": {
        "ADI": ("adipose", "adipose tissue", "adipocytes", "fat", "fat cells"),
        "BACK": ("background", "penmarking", "empty space", "background artifacts"),
        "DEB": ("debris", "colorectal adenocarcinoma debris and necrosis", "necrosis", "necrotic debris"),
        "LYM": ("lymphocytes", "lymphoid aggregate", "immune cells", "lymphoid infiltrate", "inflammatory cells"),
        "MUC": ("mucus", "mucin", "mucus pool", "mucin pool"),
        "MUS": ("smooth muscle", "smooth muscle tissue", "muscle", "muscularis propria", "muscularis mucosa"),
        "NORM": ("normal colon mucosa", "uninvolved colon mucosa", "normal colonic mucosa", "benign epithelium"),
        "STR": ("cancer-associated stroma", "tumor-associated stroma", "stromal cells", "stromal tissue", "stroma"),
        "TUM": (
            "colorectal adenocarcinoma epithelium",
            "colorectal adenocarcinoma",
            "tumor",
            "adenocarcinoma",
            "malignant epithelium",
        ),
    },
}
_ALIASES = {
    "lung": "nsclc",
    "luad_lusc": "nsclc",
    "ks": "kaposi",
    "kaposi_sarcoma": "kaposi",
    "brca": "breast",
    "breast_cancer": "breast",
    "kather": "crc",
    "colorectal": "crc",
    "crc100k": "crc",
}

#: Built-in prompt sets, read-only: ``PROMPTS["nsclc"]`` maps ``"LUAD"`` and ``"LUSC"`` to their names.
#: Keys: ``"nsclc"`` (LUAD vs LUSC), ``"kaposi"`` (Kaposi's sarcoma vs normal skin), ``"breast"``
#: (breast cancer vs normal breast) and ``"crc"`` (the nine colorectal tissue classes of Kather et al.:
#: ADI, BACK, DEB, LYM, MUC, MUS, NORM, STR, TUM).
PROMPTS = MappingProxyType({name: MappingProxyType(dict(classes)) for name, classes in _PROMPTS.items()})


def get_prompts(name: str) -> dict[str, list[str]]:
    """Return a copy of a built-in prompt set: class -> list of names.

    Parameters
    ----------
    name
        ``"nsclc"``, ``"kaposi"``, ``"breast"`` or ``"crc"`` (aliases such as ``"lung"`` or ``"kather"`` work too).

    Returns
    -------
    A new dict that can be edited (e.g. to drop the ``"BACK"`` class) and passed as ``classes``.
    """
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in _PROMPTS:
        msg = f"Unknown prompt set {name!r}; the built-in sets are {sorted(_PROMPTS)}, or pass a dict class -> names."
        raise KeyError(msg)
    return {cls: list(names) for cls, names in _PROMPTS[key].items()}


def resolve_classes(classes) -> dict[str, list[str]]:
    """Normalise ``classes`` (a prompt-set name, a mapping class -> name(s), or a list of names) to class -> names."""
    if isinstance(classes, str):
        return get_prompts(classes)
    if isinstance(classes, Mapping):
        out: dict[str, list[str]] = {}
        for cls, names in classes.items():
            if isinstance(names, str):
                names = [names]
            names = [str(n).strip() for n in (names if names is not None else [])]
            names = [n for n in names if n]
            if not names:
                msg = f"Class {cls!r} has no names to build prompts from; give it at least one name, e.g. {{{cls!r}: ['...']}}."
                raise ValueError(msg)
            out[str(cls)] = names
    elif isinstance(classes, Sequence):
        out = {}
        for cls in classes:
            if not isinstance(cls, str) or not cls.strip():
                msg = f"Class names must be non-empty strings, got {cls!r}."
                raise ValueError(msg)
            out[cls] = [cls]
    else:
        msg = f"classes must be a prompt-set name, a dict class -> names, or a list of names; got {type(classes).__name__}."
        raise TypeError(msg)
    if len(out) < 2:
        msg = f"Zero-shot classification needs at least two classes, got {list(out)}."
        raise ValueError(msg)
    return out


def resolve_templates(templates) -> list[str]:
    """Normalise ``templates``: ``None`` -> :data:`TEMPLATES`; each template must contain ``{}`` (or ``CLASSNAME``)."""
    if templates is None:
        return list(TEMPLATES)
    if isinstance(templates, str):
        templates = [templates]
    out = []
    for t in templates:
        t = str(t).replace("CLASSNAME", "{}")
        if "{}" not in t:
            msg = f"Template {t!r} has no '{{}}' placeholder for the class name."
            raise ValueError(msg)
        out.append(t)
    if not out:
        msg = "templates is empty; pass None for the default templates."
        raise ValueError(msg)
    return out


def build_prompts(classes, templates=None) -> dict[str, list[str]]:
    """Every prompt of every class: class -> [template.format(name) for name in names for template in templates]."""
    classes = resolve_classes(classes)
    templates = resolve_templates(templates)
    return {cls: [t.replace("{}", name) for name in names for t in templates] for cls, names in classes.items()}
