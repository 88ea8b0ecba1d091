"""Where an MGM checkpoint's towers come from: found and read the way MGM's own inference loads them.

MGM's ``config.json`` names both towers by a local path, relative to the directory MGM runs in
(``mm_vision_tower``: ``model_zoo/OpenAI/clip-vit-large-patch14-336``, ``mm_vision_tower_aux``:
``model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup``). Its loader (spec 7.1) builds
CLIP from the OpenAI directory and the ConvNeXt from open_clip's file, then reads every checkpoint shard that holds
a ``vlm_uni`` / ``vision_fpn`` / ``vision_stages`` tensor for the mining projectors, and copies in with them any CLIP
tensor those shards happen to hold (bf16 copies). The checkpoint's own ConvNeXt copy is never used (unless
``optimize_vision_tower_aux``), which matters: the bf16 copy moves the logits by ~2e-3.

``resolve`` does the same: it finds each tower directory (``towers_root``, then the working directory, then beside
the checkpoint), reads the architecture from the directory (``config.json``; ``open_clip_config.json``) or, for a
name MGM knows, from the name, and says where each tower's weights come from. A single-file checkpoint counts as
one shard (MGM itself needs an index). ``source="checkpoint"`` takes both towers from the checkpoint's copies
instead, for users without the tower directories. A checkpoint that carries its towers' configs
(``vision_config`` / ``vision_aux_config``, as mgjax writes it) holds its towers and needs no directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mgjax.convert.safetensors_io import CheckpointError, KeyMismatch, SafetensorsReader, TensorInfo
from mgjax.models.mgm import CLIP_L_336, HR_DROP_PATH, TIMM_TRUNKS, convnext_by_name, convnext_trunk

FIELDS = {"vision_tower": "mm_vision_tower", "vision_tower_aux": "mm_vision_tower_aux"}
PREFIXES = {"vision_tower": "model.vision_tower.vision_tower.", "vision_tower_aux": "model.vision_tower_aux."}
NAMES = {"vision_tower": "CLIP", "vision_tower_aux": "ConvNeXt"}
CONFIG_KEYS = {"vision_tower": "vision_config", "vision_tower_aux": "vision_aux_config"}
SOURCES = ("mgm", "checkpoint")
PROJECTOR_SHARD_MARKS = ("vlm_uni", "vision_fpn", "vision_stages")  # what makes MGM read a shard
FIX = "pass towers_root= (--towers-root, model.towers_root) naming the directory that holds model_zoo/"
ROOT_HELP = (
    "MGM: the directory holding the model_zoo/ that the checkpoint's config.json names its towers in "
    "(searched after it: the working directory, then beside the checkpoint)"
)
SOURCE_HELP = (
    "MGM: 'mgm' loads the towers as MGM does (CLIP from its OpenAI directory, ConvNeXt from open_clip's "
    "file); 'checkpoint' uses the copies inside the checkpoint"
)


class TowerNotFound(CheckpointError):
    """A tower directory MGM's config names is not where MGM would find it."""


def named_by_path(d: Mapping[str, Any]) -> bool:
    """Whether an MGM config names its towers by directory only (MGM's own checkpoints), rather than carrying
    their configs (mgjax's)."""
    return "vision_config" not in d and bool(d.get("mm_vision_tower"))


def candidates(configured: str, checkpoint: Path, root: str | os.PathLike | None) -> list[Path]:
    """Where MGM's relative tower path may be, in the order searched: under ``root`` (or ``root`` being the
    ``model_zoo`` itself), the working directory (MGM's own rule), beside the checkpoint."""
    p = Path(configured).expanduser()
    if p.is_absolute():
        return [p]
    out = []
    if root is not None:
        root = Path(root).expanduser()
        out.append(root / p)
        if p.parts[0] == root.name:
            out.append(root / Path(*p.parts[1:]))
    out += [Path.cwd() / p, checkpoint.resolve().parent / p]
    return list(dict.fromkeys(out))


def locate(configured: str, checkpoint: Path, root) -> Path | None:
    return next((c for c in candidates(configured, checkpoint, root) if c.is_dir()), None)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def clip_config(directory: Path | None, configured: str) -> dict | None:
    """The CLIP tower's config: the directory's ``config.json`` (a CLIPModel's nests it), else the release's by
    name; None if neither says."""
    if directory is not None and (directory / "config.json").exists():
        d = _json(directory / "config.json")
        return d.get("vision_config", d)
    if "clip-vit-large-patch14-336" in configured:
        return dict(CLIP_L_336)
    return None


def convnext_config(directory: Path | None, configured: str, drop_path: bool) -> dict | None:
    """The HR tower's trunk: from ``open_clip_config.json`` (its timm model and drop-path rate), else from the
    name as MGM routes it; None if neither says."""
    trunk, rate = None, HR_DROP_PATH
    if directory is not None and (directory / "open_clip_config.json").exists():
        path = directory / "open_clip_config.json"
        vision = _json(path).get("model_cfg", {}).get("vision_cfg", {})
        trunk = vision.get("timm_model_name")
        if trunk not in TIMM_TRUNKS:
            raise CheckpointError(
                f"{path}: timm_model_name {trunk!r} is not a ConvNeXt trunk mgjax builds ({', '.join(TIMM_TRUNKS)})"
            )
        rate = float(vision.get("timm_drop_path") or 0.0)
    else:
        trunk = convnext_by_name(configured)
    if trunk is None:
        return None
    return convnext_trunk(trunk, rate if drop_path else 0.0).to_hf()


@dataclass
class Resolution:
    """``config``: the checkpoint's config.json with the towers' configs filled in; ``towers``: submodules read
    from elsewhere than the checkpoint, as ``from_pretrained`` takes them; ``sources``: one phrase per tower."""

    config: dict
    towers: dict[str, tuple[Any, str]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return "mgm towers: " + "; ".join(f"{NAMES[a]} from {s}" for a, s in self.sources.items())


def _projector_shards(reader: SafetensorsReader) -> set[Path]:
    return {info.file for key, info in reader.tensors.items() if any(m in key for m in PROJECTOR_SHARD_MARKS)}


def _tower_tensors(reader: SafetensorsReader, attr: str) -> dict[str, TensorInfo]:
    return {k: v for k, v in reader.tensors.items() if k.startswith(PREFIXES[attr])}


def _missing(attr: str, configured: str, checkpoint: Path, root, why: str) -> TowerNotFound:
    searched = ", ".join(str(c) for c in candidates(configured, checkpoint, root))
    return TowerNotFound(
        f"{checkpoint}: the {NAMES[attr]} tower {FIELDS[attr]}={configured!r} {why}; searched: "
        f"{searched}. {FIX}, or source='checkpoint' (--towers checkpoint) to use the copies inside "
        "the checkpoint"
    )


def resolve(
    d: Mapping[str, Any], checkpoint: str | os.PathLike, *, root: str | os.PathLike | None = None, source: str = "mgm"
) -> Resolution:
    """How to load an MGM checkpoint whose config names its towers by path (see the module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"towers source must be one of {SOURCES}, not {source!r}")
    checkpoint = Path(checkpoint)
    out = Resolution(dict(d))
    if not named_by_path(d):
        return out
    wanted = ("vision_tower", "vision_tower_aux") if d.get("mining", True) else ("vision_tower",)
    with SafetensorsReader(checkpoint) as reader:
        for attr in wanted:
            configured = str(d.get(FIELDS[attr], ""))
            directory = locate(configured, checkpoint, root) if configured else None
            cfg = (
                clip_config(directory, configured)
                if attr == "vision_tower"
                else convnext_config(directory, configured, d.get("drop_path", True))
            )
            if cfg is None:
                raise _missing(
                    attr,
                    configured,
                    checkpoint,
                    root,
                    "is not a tower MGM knows by name and its directory (with its config) was not found",
                )
            out.config[CONFIG_KEYS[attr]] = cfg
            copies = _tower_tensors(reader, attr)
            if source == "checkpoint" or (attr == "vision_tower_aux" and d.get("optimize_vision_tower_aux")):
                if not copies:
                    raise _missing(
                        attr, configured, checkpoint, root, f"is not in the checkpoint (no {PREFIXES[attr]}* tensors)"
                    )
                out.sources[attr] = f"the checkpoint's copy ({len(copies)} tensors)"
            elif directory is None:
                raise _missing(attr, configured, checkpoint, root, "was not found")
            else:
                out.towers[attr], out.sources[attr] = _from_directory(
                    attr, directory, copies, _projector_shards(reader)
                )
    return out


def _from_directory(attr: str, directory: Path, copies: dict[str, TensorInfo], shards: set[Path]):
    """``(reader, layout)`` of a tower's weights as MGM takes them, and the phrase saying so: the ConvNeXt from
    open_clip's file; CLIP from the OpenAI directory, overwritten by the checkpoint's copies that share a shard
    with the projectors."""
    tower = SafetensorsReader(directory)
    if attr == "vision_tower_aux":
        return (tower, "open_clip"), f"{_files(tower)} (open_clip)"
    inner = len(PREFIXES[attr])  # the copies' keys go on with vision_model., as OpenAI's do
    copied = {k[inner:]: info for k, info in copies.items() if info.file in shards}
    note = f", {len(copied)} tensors from the checkpoint's projector shards as MGM copies them" if copied else ""
    return (SafetensorsReader(directory, {**tower.tensors, **copied}), "vision_model"), f"{_files(tower)}{note}"


def _files(reader: SafetensorsReader) -> str:
    return ", ".join(sorted(str(f) for f in {i.file for i in reader.tensors.values()}))


def explain(error: KeyMismatch, d: Mapping[str, Any]) -> CheckpointError:
    """``error`` again, led by which tower the checkpoint lacks and how to supply it, when that is the cause."""
    for attr, prefix in PREFIXES.items():
        if error.missing and all(k.startswith(prefix) for k in error.missing):
            configured = d.get(FIELDS[attr])
            where = (
                f"MGM reads it from {FIELDS[attr]}={configured!r}: drop 'vision_config' / "
                f"'vision_aux_config' from config.json so that directory is used, and {FIX}"
                if configured
                else f"load a checkpoint that holds it, or name its directory in {FIELDS[attr]}"
            )
            return KeyMismatch(
                f"the checkpoint holds no {NAMES[attr]} tower ({len(error.missing)} tensors "
                f"{prefix}* missing); {where}.\n{error}",
                error.missing,
                error.unexpected,
                error.misshaped,
            )
    return error
