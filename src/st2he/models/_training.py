"""The training loop of the generator, on tensors of paired images; no spatialdata here.

:func:`train` takes pairs of aligned images (input picture, real H&E), draws random crops with random flips and
rotations (tissue has no "up"), and optimises L2 + a perceptual term (LPIPS when its weights are local, else SSIM)
+ an adversarial term from a conditional PatchGAN critic, with AdamW, mixed precision on GPU and gradient
accumulation. It validates (L2, PSNR, SSIM) every ``val_every`` steps, checkpoints every ``ckpt_every`` steps, and
``resume=`` continues a run to the same result as an uninterrupted one: every random draw comes from one seeded
generator whose state is checkpointed with the weights and optimiser states.

Checkpoints are written atomically (into a hidden sibling folder, synced, then renamed), so a crash never leaves a
``checkpoint-<step>`` folder that looks complete; each records a fingerprint of the run (the settings that change the
result, the model's architecture, the prompt, the palette and a hash of the training and validation images) and the
size and hash of its files. A resume compares the fingerprint with this run's and refuses another run's checkpoint;
``resume="latest"`` skips a damaged checkpoint (with a warning) for the newest intact one.

:func:`st2he.tl.train_generator` prepares the pairs from SpatialData objects and calls this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._losses import PatchDiscriminator, hinge_d_loss, hinge_g_loss, load_lpips, psnr, ssim
from ._pix2pix import Pix2PixTurbo

logger = logging.getLogger("st2he")

STATE_NAME = "training_state.pt"
#: written last into every checkpoint: step, fingerprint of the run, size and hash of each file
MANIFEST_NAME = "checkpoint.json"
#: the finished model that :func:`st2he.tl.train_generator` writes into ``output_dir``
FINAL_NAME = "model"
#: settings that may differ when a run is resumed: how long it runs, how often it reports, and how it is computed
#: on this machine (``steps`` only with a constant learning-rate schedule: a cosine schedule is shaped by it)
RESUMABLE = (
    "steps",
    "val_every",
    "ckpt_every",
    "log_every",
    "val_batch_size",
    "time_budget",
    "calibration_steps",
    "mixed_precision",
    "channels_last",
)


@dataclass
class TrainConfig:
    """Settings of :func:`train` (all JSON-serialisable; stored with every checkpoint)."""

    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    crop_size: int = 256
    lr: float | None = None  # None: 2e-4 when every weight trains ("full"), 1e-4 for LoRA
    lr_disc: float = 2e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine"
    l2_weight: float = 1.0
    perceptual: str | None = "auto"  # "lpips", "ssim", "auto" (LPIPS if local, else SSIM) or None
    perceptual_weight: float = 1.0
    gan_weight: float = 0.05
    gan_start: int = 0
    stochastic_prob: float = 0.0
    r_range: tuple[float, float] = (0.3, 1.0)
    augment: bool = True
    mixed_precision: str = "auto"  # "auto" (bf16/fp16 on GPU), "bf16", "fp16", "no"
    channels_last: bool | str = "auto"
    train_mode: str | None = None  # None: the model's ("full" for tiny/small, "lora" for SD-Turbo)
    max_grad_norm: float | None = 1.0
    val_every: int = 100
    ckpt_every: int = 500
    log_every: int = 10
    val_batch_size: int = 8
    seed: int = 0
    time_budget: float | None = None  # seconds: after calibration_steps, lower `steps` to end within the budget
    calibration_steps: int = 50
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["r_range"] = list(self.r_range)
        return out


class PairSampler:
    """Random aligned crops of image pairs, with the 8 flips / right-angle rotations, from one torch generator."""

    def __init__(self, inputs: Sequence, targets: Sequence, crop: int) -> None:
        if len(inputs) != len(targets) or not len(inputs):
            msg = f"Need as many target as input images (and at least one), got {len(inputs)} and {len(targets)}."
            raise ValueError(msg)
        self.inputs = [_as_uint8_tensor(x, "input") for x in inputs]
        self.targets = [_as_uint8_tensor(y, "target") for y in targets]
        for i, (x, y) in enumerate(zip(self.inputs, self.targets, strict=True)):
            if x.shape[1:] != y.shape[1:]:
                msg = f"Pair {i}: input {tuple(x.shape)} and target {tuple(y.shape)} are not the same size."
                raise ValueError(msg)
            if min(x.shape[1:]) < crop:
                msg = f"Pair {i} ({tuple(x.shape[1:])} pixels) is smaller than the crop size {crop}."
                raise ValueError(msg)
        self.crop = crop
        # each image is drawn in proportion to the number of crop positions it offers
        self.weights = torch.tensor(
            [float((x.shape[1] - crop + 1) * (x.shape[2] - crop + 1)) for x in self.inputs], dtype=torch.float64
        )

    def sample(
        self, n: int, generator: torch.Generator, augment: bool = True, unit: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` aligned crops: in [-1, 1] (``unit``) or as uint8, which is a quarter of the bytes to move."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator).tolist()
        xs, ys = [], []
        for i in idx:
            x, y = self.inputs[i], self.targets[i]
            r0 = int(torch.randint(0, x.shape[1] - self.crop + 1, (1,), generator=generator))
            c0 = int(torch.randint(0, x.shape[2] - self.crop + 1, (1,), generator=generator))
            k = int(torch.randint(0, 8, (1,), generator=generator))
            xc = x[:, r0 : r0 + self.crop, c0 : c0 + self.crop]
            yc = y[:, r0 : r0 + self.crop, c0 : c0 + self.crop]
            if augment:
                xc, yc = _dihedral(xc, k), _dihedral(yc, k)
            xs.append(xc)
            ys.append(yc)
        x, y = torch.stack(xs), torch.stack(ys)
        return (_to_unit(x), _to_unit(y)) if unit else (x, y)


def _dihedral(t: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        t = t.flip(-1)
    return torch.rot90(t, k % 4, dims=(-2, -1))


def _as_uint8_tensor(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x))
    if t.ndim != 3 or t.shape[0] != 3:
        msg = f"Each {what} image must be (3, H, W) RGB, got shape {tuple(t.shape)}."
        raise ValueError(msg)
    if t.dtype != torch.uint8:
        msg = f"Each {what} image must be uint8, got {t.dtype}."
        raise TypeError(msg)
    return t.contiguous()


def _to_unit(t: torch.Tensor) -> torch.Tensor:
    return t.float() / 127.5 - 1.0


def _amp_dtype(setting: str, device: torch.device):
    if setting == "no" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


#: Learning-rate schedules of st2he's trainings: constant, or a cosine decay to 5 % of the base rate at the last step.
LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, base: float, *, steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of ``step`` (0-based): linear warm-up, then constant or a cosine decay to 5 % at ``steps``."""
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "cosine":
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    return base


def _lr_at(step: int, cfg: TrainConfig, base: float) -> float:
    return lr_at(step, base, steps=cfg.steps, schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps)


@torch.no_grad()
def evaluate(
    model: Pix2PixTurbo,
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 8,
    prompt_embeds: torch.Tensor | None = None,
    amp_dtype=None,
) -> dict[str, float]:
    """L2 (on ``[-1, 1]``), PSNR and SSIM (on ``[0, 1]``) of the model (deterministic mode) on uint8 tile pairs."""
    was_training = model.training
    model.eval()
    device = model.device
    x_all = torch.as_tensor(np.asarray(inputs))
    y_all = torch.as_tensor(np.asarray(targets))
    l2, ps, ss = [], [], []
    for s in range(0, len(x_all), batch_size):
        x = _to_unit(x_all[s : s + batch_size]).to(device)
        y = _to_unit(y_all[s : s + batch_size]).to(device)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else _null()
        with ctx:
            pred = model(x, prompt_embeds=prompt_embeds)
        # metrics on the uint8 image, as the user will see it
        pred = ((pred.float() + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
        l2 += ((pred - y) ** 2).mean(dim=(1, 2, 3)).tolist()
        ps += psnr(pred, y, data_range=2.0).tolist()
        ss += ssim((pred + 1) / 2, (y + 1) / 2, data_range=1.0, reduction="none").tolist()  # as evaluate_he sees them
    if was_training:
        model.train()
    return {"val_l2": float(np.mean(l2)), "val_psnr": float(np.mean(ps)), "val_ssim": float(np.mean(ss))}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in output_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


# --------------------------------------------------------------------------- writing, atomically


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_folder_atomically(folder: Path, write) -> Path:
    """Let ``write(tmp)`` fill a hidden sibling folder, sync it, then rename it to ``folder`` (replacing it).

    A crash at any point leaves either the old ``folder`` or the new one, never a partly written folder under its name;
    at worst a hidden ``.<name>.tmp-*`` folder, which the next run removes.
    """
    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = parent / f".{folder.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if folder.exists():
            old = parent / f".{folder.name}.old-{tag}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _remove_leftovers(output_dir: Path) -> None:
    """Remove the hidden half-written folders an interrupted :func:`_write_folder_atomically` left behind."""
    for p in output_dir.glob(".*"):
        if p.is_dir() and re.fullmatch(r"\.(checkpoint-\d+|" + FINAL_NAME + r")\.(tmp|old)-\d+-[0-9a-f]{8}", p.name):
            logger.info("Removing %s, left behind by an interrupted write.", p)
            shutil.rmtree(p, ignore_errors=True)


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(folder: Path, model: Pix2PixTurbo, state: dict[str, Any], fingerprint: dict | None = None) -> Path:
    """Write the model (st2he format, full precision), the training state (optimisers, RNG, history) and the manifest.

    The folder appears under its name only once every file is written and synced (see :func:`_write_folder_atomically`).
    """
    from ._io import save_pretrained

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp)
        torch.save(state, tmp / STATE_NAME)
        files = {
            f.name: {"size": f.stat().st_size, "blake2b": _file_hash(f)} for f in sorted(tmp.iterdir()) if f.is_file()
        }
        manifest = {"step": int(state["step"]), "fingerprint": fingerprint, "files": files}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    return _write_folder_atomically(Path(folder), write)


def save_final(model: Pix2PixTurbo, output_dir: str | Path) -> Path:
    """Write the finished model to ``output_dir/model`` atomically (never a half-written model under that name)."""
    from ._io import save_pretrained

    return _write_folder_atomically(Path(output_dir) / FINAL_NAME, lambda tmp: save_pretrained(model, tmp))


# --------------------------------------------------------------------------- the fingerprint of a run


def _data_hash(arrays) -> dict[str, Any]:
    """Number, shapes and a hash of the bytes of a list of images (or a stack of tiles)."""
    h = hashlib.blake2b(digest_size=16)
    shapes = []
    for a in arrays:
        a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        shapes.append(list(a.shape))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return {"n": len(shapes), "shapes": shapes, "blake2b": h.hexdigest()}


def _flatten(prefix: str, value, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            if not str(k).startswith("_"):  # diffusers' bookkeeping (_name_or_path, _diffusers_version)
                _flatten(f"{prefix}.{k}", value[k], out)
    else:
        out[prefix] = value


def run_fingerprint(
    cfg: TrainConfig,
    model: Pix2PixTurbo,
    sampler: PairSampler,
    val_inputs,
    val_targets,
    *,
    mode: str,
    perceptual: str | None,
    prompt: str | None,
) -> dict[str, Any]:
    """Everything that decides the result of a run, as a flat JSON-able dict (see :data:`RESUMABLE` for what is not)."""
    settings = cfg.to_dict()
    fp: dict[str, Any] = {k: v for k, v in settings.items() if k not in RESUMABLE}
    if cfg.lr_schedule == "cosine":
        fp["steps"] = cfg.steps
    fp["train_mode (as used)"] = mode
    fp["perceptual (as used)"] = perceptual
    fp["prompt"] = prompt if prompt is not None else model.prompt
    base = model.metadata.get("base")
    fp["base model"] = Path(str(base)).name if base else None
    fp["palette"] = model.metadata.get("palette")
    fp["pixel_size"] = model.metadata.get("pixel_size")
    _flatten("architecture", model.config, fp)
    fp["training inputs"] = _data_hash(sampler.inputs)
    fp["training targets"] = _data_hash(sampler.targets)
    has_val = val_inputs is not None and len(val_inputs) > 0
    fp["validation inputs"] = _data_hash(val_inputs) if has_val else None
    fp["validation targets"] = _data_hash(val_targets) if has_val else None
    # one JSON round trip: tuples become lists, numbers plain, as they read back from the manifest
    return json.loads(json.dumps(fp, default=str))


def _show(value) -> str:
    if isinstance(value, dict) and "blake2b" in value:
        shapes = value["shapes"]
        sizes = ", ".join("x".join(map(str, s)) for s in shapes[:3]) + (", ..." if len(shapes) > 3 else "")
        return f"{value['n']} arrays ({sizes}), hash {value['blake2b'][:12]}"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _compare_fingerprints(old: dict[str, Any], new: dict[str, Any], folder: Path) -> None:
    """Raise when ``old`` (the checkpoint's) and ``new`` (this run's) differ, naming each setting that differs."""
    diffs = [
        f"  {k}: {_show(old.get(k, '(not set)'))} in the checkpoint, {_show(new.get(k, '(not set)'))} now"
        for k in sorted(set(old) | set(new), key=lambda k: (list(new).index(k) if k in new else len(new), k))
        if old.get(k, "(not set)") != new.get(k, "(not set)")
    ]
    if diffs:
        msg = (
            f"Cannot resume from {folder}: it belongs to a run with other settings or data than this one:\n"
            + "\n".join(diffs)
            + "\nTo continue that run, pass the same settings and data. To start a new run, give another output_dir "
            "(or overwrite=True to replace the old run). Settings that may change on resume: "
            + ", ".join(RESUMABLE)
            + " (steps only with lr_schedule='constant'), device and progress."
        )
        raise ValueError(msg)


# --------------------------------------------------------------------------- reading, with checks


def _read_checkpoint(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any], dict, dict[str, torch.Tensor]]:
    """``(manifest, training state, model config, weights)`` of a checkpoint folder, checked; ``ValueError`` if broken.

    The files are checked against the manifest's sizes and hashes (checkpoints written before manifests existed are
    only checked by reading them), then read in full.
    """
    from ._io import _read_st2he

    manifest = None
    mpath = folder / MANIFEST_NAME
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            msg = f"its {MANIFEST_NAME} is unreadable ({type(err).__name__}: {err})"
            raise ValueError(msg) from err
        for name, want in files.items():
            f = folder / name
            if not f.is_file():
                msg = f"{name} is missing"
                raise ValueError(msg)
            size = f.stat().st_size
            if size != want["size"]:
                msg = f"{name} has {size} bytes instead of {want['size']} (truncated or overwritten)"
                raise ValueError(msg)
            if _file_hash(f) != want["blake2b"]:
                msg = f"{name} does not match its recorded hash (corrupt)"
                raise ValueError(msg)
    if not (folder / STATE_NAME).is_file():
        msg = f"{STATE_NAME} is missing"
        raise ValueError(msg)
    try:
        from ._io import safe_torch_load

        state = safe_torch_load(folder / STATE_NAME, what="a training state")
        if not isinstance(state, dict) or not {"step", "optimizer", "rng", "history"} <= set(state):
            msg = "it lacks the entries step, optimizer, rng and history"
            raise ValueError(msg)
    except Exception as err:  # noqa: BLE001 - a truncated zip, a pickle error, ...: all mean "broken"
        msg = f"{STATE_NAME} is unreadable ({type(err).__name__}: {err})"
        raise ValueError(msg) from err
    try:
        config, tensors = _read_st2he(folder)
    except (OSError, ValueError) as err:
        msg = f"its weights are unreadable ({err})"
        raise ValueError(msg) from err
    return manifest, state, config, tensors


def _open_resume(resume, output_dir: Path | None):
    """The checkpoint to resume from, read and checked: ``(folder, manifest, state, config, tensors)`` or ``None``."""
    if resume in (None, False):
        return None
    if resume in (True, "latest"):
        if output_dir is None:
            msg = "resume='latest' needs output_dir."
            raise ValueError(msg)
        found = _checkpoints(output_dir)
        if not found:
            msg = f"No checkpoint to resume from in {output_dir} (folders checkpoint-<step> with {STATE_NAME})."
            raise FileNotFoundError(msg)
        broken = []
        for _, folder in reversed(found):
            try:
                read = _read_checkpoint(folder)
            except ValueError as err:
                broken.append(f"{folder.name}: {err}")
                warnings.warn(
                    f"Skipping the damaged checkpoint {folder}: {err}. Resuming from an earlier one.",
                    UserWarning,
                    stacklevel=3,
                )
                continue
            return (folder, *read)
        msg = f"Every checkpoint in {output_dir} is damaged; start a new run (overwrite=True). " + "; ".join(broken)
        raise ValueError(msg)
    path = Path(resume)
    if not path.is_dir() or not any((path / n).is_file() for n in (STATE_NAME, MANIFEST_NAME)):
        msg = f"{path} is not a training checkpoint (no {STATE_NAME} in it)."
        raise FileNotFoundError(msg)
    try:
        read = _read_checkpoint(path)
    except ValueError as err:
        msg = (
            f"The checkpoint {path} is damaged: {err}. Resume from another checkpoint-<step> folder, or pass "
            "resume='latest' to take the newest intact one."
        )
        raise ValueError(msg) from err
    return (path, *read)


def _check_fresh_output_dir(output_dir: Path, overwrite: bool) -> None:
    """A new run must not write into the folder of another one (its checkpoints would mix with this run's)."""
    old_ckpts = [p for _, p in _checkpoints(output_dir)]
    final = output_dir / FINAL_NAME
    has_final = final.is_dir() and any(final.iterdir())
    if not old_ckpts and not has_final:
        return
    listed = [f"the finished model {FINAL_NAME}/"] if has_final else []
    if old_ckpts:
        listed.append(", ".join(p.name for p in old_ckpts[:5]) + (" ..." if len(old_ckpts) > 5 else ""))
    if not overwrite:
        msg = (
            f"{output_dir} already holds a training run ({' and '.join(listed)}). Pass resume='latest' to continue "
            "it, another output_dir for a new run, or overwrite=True to replace it (its checkpoints are removed now, "
            "its finished model when the new one is written)."
        )
        raise FileExistsError(msg)
    logger.warning("overwrite=True: removing the checkpoints of the earlier run in %s.", output_dir)
    for p in old_ckpts:
        shutil.rmtree(p)


def _check_same_run(folder: Path, manifest, state: dict, fingerprint: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse a checkpoint of another run, and a ``steps`` below the checkpoint's step."""
    old = (manifest or {}).get("fingerprint")
    if old is None:
        # written before fingerprints: its settings are in the state; the data cannot be checked
        try:
            settings = json.loads(state.get("config") or "{}")
        except ValueError:
            settings = {}
        old = {k: v for k, v in settings.items() if k in fingerprint}
        new = {k: fingerprint[k] for k in old}
        warnings.warn(
            f"The checkpoint {folder} was written without a fingerprint of its data; only its settings are checked.",
            UserWarning,
            stacklevel=3,
        )
        _compare_fingerprints(old, new, folder)
    else:
        _compare_fingerprints(old, fingerprint, folder)
    at = int(state["step"])
    if cfg.steps < at:
        msg = (
            f"steps={cfg.steps} is below the step of the checkpoint {folder} ({at}): a resumed run can only train "
            f"longer. Pass steps >= {at}, or use the checkpoint as it is (st2he.models.load_model({str(folder)!r}))."
        )
        raise ValueError(msg)


def _load_checkpoint_weights(model: Pix2PixTurbo, folder: Path, config: dict, tensors: dict) -> None:
    from ._io import _apply_delta

    if config.get("weights") == "full":
        sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(sd, strict=True)
    else:
        _apply_delta(model, folder, config, tensors)


def train(
    model: Pix2PixTurbo,
    train_inputs: Sequence,
    train_targets: Sequence,
    val_inputs: np.ndarray | None = None,
    val_targets: np.ndarray | None = None,
    *,
    config: TrainConfig | dict | None = None,
    output_dir: str | Path | None = None,
    resume: str | Path | bool | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    prompt: str | None = None,
    overwrite: bool = False,
) -> tuple[Pix2PixTurbo, list[dict[str, Any]]]:
    """Train ``model`` on image pairs; return it (in eval mode) and the history.

    Parameters
    ----------
    model
        The generator; trained in place.
    train_inputs, train_targets
        Aligned uint8 ``(3, H, W)`` images (any sizes of at least ``crop_size``), input picture and real H&E.
    val_inputs, val_targets
        Validation tiles ``(n, 3, S, S)`` uint8 (held out by region or by sample); ``None``: no validation.
    config
        A :class:`TrainConfig` or a dict of its fields.
    output_dir
        Where checkpoints (``checkpoint-<step>/``) are written, each atomically (see the module notes); the last one
        holds the finished run. A new run (no ``resume``) refuses a folder that already holds checkpoints or a finished
        model (``model/``) unless ``overwrite=True``.
    resume
        A ``checkpoint-<step>`` folder, or ``"latest"`` / ``True`` for the newest intact one in ``output_dir`` (a
        damaged one is skipped with a warning; a damaged folder named explicitly is an error). The run continues
        where that one stopped, with the same random draws, so the result equals an uninterrupted run. The
        checkpoint must come from a run with the same data and the same settings, except those in
        :data:`RESUMABLE` (e.g. a larger ``steps`` to train longer, ``val_every``, ``ckpt_every``) and ``device``,
        ``progress``; ``steps`` must be at least the checkpoint's step.
    device
        ``"auto"``: CUDA when available, else CPU.
    prompt
        Prompt to train with (default: the model's).
    overwrite
        Start a new run in an ``output_dir`` that holds an earlier run: its checkpoints are removed before training
        and its finished model is replaced when the new one is written. Not with ``resume``.
    """
    import dataclasses

    cfg = dataclasses.replace(config) if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.steps < 0:
        msg = "steps must be >= 0, and batch_size and grad_accum >= 1."
        raise ValueError(msg)
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    output_dir = Path(output_dir) if output_dir is not None else None
    if overwrite and resume not in (None, False):
        msg = "overwrite=True starts a new run; it cannot be combined with resume (which continues an earlier one)."
        raise ValueError(msg)
    opened = _open_resume(resume, output_dir)
    if opened is None and output_dir is not None and not overwrite:
        _check_fresh_output_dir(output_dir, overwrite=False)  # fail before any work
    mode = cfg.train_mode or model.config.get("train_mode", "lora")
    f = model.downscale
    if cfg.crop_size % f:
        msg = f"crop_size must be a multiple of {f}, got {cfg.crop_size}."
        raise ValueError(msg)
    sampler = PairSampler(train_inputs, train_targets, cfg.crop_size)

    # the seed fixes the critic's initialisation and every random draw of the run
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    model.set_train(mode)
    amp_dtype = _amp_dtype(cfg.mixed_precision, device)
    use_cl = (device.type in ("cuda", "cpu")) if cfg.channels_last == "auto" else bool(cfg.channels_last)
    if use_cl:
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    params = model.trainable_parameters()
    base_lr = cfg.lr if cfg.lr is not None else (2e-4 if mode == "full" else 1e-4)
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    disc = opt_d = None
    if cfg.gan_weight > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            disc = PatchDiscriminator().to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr_disc, betas=(0.5, 0.999), weight_decay=0.0)
    perceptual = cfg.perceptual
    lpips_net = None
    if perceptual in ("auto", "lpips"):
        lpips_net = load_lpips()
        if lpips_net is None and perceptual == "lpips":
            msg = "perceptual='lpips' needs the lpips package and its backbone weights on this machine."
            raise RuntimeError(msg)
        perceptual = "lpips" if lpips_net is not None else "ssim"
        if lpips_net is not None:
            lpips_net.to(device)
    fingerprint = run_fingerprint(
        cfg, model, sampler, val_inputs, val_targets, mode=mode, perceptual=perceptual, prompt=prompt
    )
    history: list[dict[str, Any]] = []
    step = 0
    if output_dir is not None and output_dir.is_dir():
        _remove_leftovers(output_dir)
    if opened is None and output_dir is not None and overwrite:
        _check_fresh_output_dir(output_dir, overwrite=True)
    if opened is not None:
        resume_from, manifest, state, ckpt_config, tensors = opened
        _check_same_run(resume_from, manifest, state, fingerprint, cfg)
        _load_checkpoint_weights(model, resume_from, ckpt_config, tensors)
        model.set_train(mode)
        opt.load_state_dict(state["optimizer"])
        if disc is not None and state.get("disc") is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["disc_optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        gen.set_state(state["rng"])
        step = int(state["step"])
        history = json.loads(state["history"])
        logger.info("Resuming training from %s at step %d.", resume_from, step)
    # after loading: the checkpoint's text encoder gives the prompt embedding
    model._prompt_cache.clear()
    emb = model.encode_prompt(prompt).detach()

    from st2he._progress import tqdm

    def val_record(at_step: int) -> dict[str, Any]:
        rec = {"step": at_step}
        rec.update(
            evaluate(
                model, val_inputs, val_targets, batch_size=cfg.val_batch_size, prompt_embeds=emb, amp_dtype=amp_dtype
            )
        )
        return rec

    has_val = val_inputs is not None and len(val_inputs) > 0
    if has_val and step == 0 and cfg.val_every > 0:
        history.append(val_record(0))
    bar = tqdm(total=cfg.steps, initial=step, desc="train generator", unit="step", disable=not progress)
    running: dict[str, list[torch.Tensor]] = {}
    import time

    t_start, step_start = time.perf_counter(), step
    t_cal = t_start
    settle = 10  # steps before timing (kernel selection, caches)
    try:
        while step < cfg.steps:
            if cfg.time_budget and step - step_start == settle:
                t_cal = time.perf_counter()
            if cfg.time_budget and step - step_start == settle + cfg.calibration_steps:
                per_step = (time.perf_counter() - t_cal) / cfg.calibration_steps
                fit = step + int((cfg.time_budget - (time.perf_counter() - t_start)) / per_step)
                if fit < cfg.steps:
                    logger.info(
                        "time_budget: %.3f s per step, training %d steps instead of %d", per_step, fit, cfg.steps
                    )
                    cfg.steps = max(fit, step + 1)
                    bar.total = cfg.steps

            lr = _lr_at(step, cfg, base_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            gan_on = disc is not None and step >= cfg.gan_start
            parts: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                x, y = sampler.sample(cfg.batch_size, gen, augment=cfg.augment, unit=False)
                stochastic = cfg.stochastic_prob > 0 and float(torch.rand((), generator=gen)) < cfg.stochastic_prob
                r = None
                noise = None
                if stochastic:
                    lo, hi = cfg.r_range
                    r = float(lo + (hi - lo) * float(torch.rand((), generator=gen)))
                    noise = torch.randn(model.latent_shape(cfg.crop_size, cfg.crop_size, cfg.batch_size), generator=gen)
                post_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
                post_gen = torch.Generator(device=device).manual_seed(post_seed)
                # moved as uint8 and scaled there (the same values: one exact division and subtraction)
                x, y = _to_unit(x.to(device, non_blocking=True)), _to_unit(y.to(device, non_blocking=True))
                if use_cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else _null()
                with ctx:
                    pred = model(
                        x, prompt_embeds=emb, r=r, noise=noise, generator=post_gen, sample_posterior=True
                    ).float()
                # the losses in float32, outside autocast: SSIM's variances (E[x^2] - E[x]^2 of unclamped outputs)
                # cancel catastrophically in bf16 and their NaNs or huge gradients wreck training
                loss_l2 = F.mse_loss(pred, y)
                loss = cfg.l2_weight * loss_l2
                parts["l2"] = parts.get("l2", 0.0) + loss_l2.detach() / cfg.grad_accum
                if perceptual and cfg.perceptual_weight > 0:
                    if perceptual == "lpips":
                        loss_p = lpips_net(pred, y).mean()
                    else:
                        loss_p = 1 - ssim((pred + 1) / 2, (y + 1) / 2, data_range=1.0)
                    loss = loss + cfg.perceptual_weight * loss_p
                    parts[perceptual] = parts.get(perceptual, 0.0) + loss_p.detach() / cfg.grad_accum
                if gan_on:
                    with ctx:
                        loss_g = hinge_g_loss(disc(x, pred))
                    loss = loss + cfg.gan_weight * loss_g
                    parts["gan"] = parts.get("gan", 0.0) + loss_g.detach() / cfg.grad_accum
                scaler.scale(loss / cfg.grad_accum).backward()
                parts["loss"] = parts.get("loss", 0.0) + loss.detach() / cfg.grad_accum
                if gan_on:
                    with ctx:
                        d_loss = hinge_d_loss(disc(x, y), disc(x, pred.detach()))
                    (d_loss / cfg.grad_accum).backward()
                    parts["critic"] = parts.get("critic", 0.0) + d_loss.detach() / cfg.grad_accum
            if cfg.max_grad_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            if gan_on:
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
            step += 1
            for k, v in parts.items():
                running.setdefault(k, []).append(v)
            bar.update(1)
            if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                # the losses stay on the device until logged: reading one each step would wait for the GPU
                rec = {"step": step, "lr": lr, **{k: float(torch.stack(v).float().mean()) for k, v in running.items()}}
                history.append(rec)
                bar.set_postfix({k: f"{v:.4f}" for k, v in rec.items() if k not in ("step", "lr")})
                running = {}
            if has_val and cfg.val_every > 0 and (step % cfg.val_every == 0 or step == cfg.steps):
                rec = val_record(step)
                history.append(rec)
                bar.set_postfix(
                    {"val_psnr": f"{rec['val_psnr']:.2f}", "val_ssim": f"{rec['val_ssim']:.3f}"}, refresh=True
                )
            if output_dir is not None and cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0 and step < cfg.steps:
                folder = output_dir / f"checkpoint-{step}"
                _save_state(folder, model, step, opt, disc, opt_d, scaler, gen, history, cfg, fingerprint)
    finally:
        bar.close()
    model.metadata.setdefault("training", {})
    model.metadata["training"] = {
        "config": cfg.to_dict(),
        "steps": step,
        "perceptual": perceptual,
        "history": history,
    }
    if output_dir is not None:
        _save_state(
            output_dir / f"checkpoint-{step}", model, step, opt, disc, opt_d, scaler, gen, history, cfg, fingerprint
        )
    if use_cl:
        model.unet.to(memory_format=torch.contiguous_format)
        model.vae.to(memory_format=torch.contiguous_format)
    model.set_eval()
    return model, history


def _save_state(folder, model, step, opt, disc, opt_d, scaler, gen, history, cfg, fingerprint) -> None:
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "disc": disc.state_dict() if disc is not None else None,
        "disc_optimizer": opt_d.state_dict() if opt_d is not None else None,
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": gen.get_state(),
        "history": json.dumps(history),
        "config": json.dumps(cfg.to_dict()),
    }
    save_checkpoint(folder, model, state, fingerprint)
