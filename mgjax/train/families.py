"""What training does per model family, for ``mgjax.train`` and ``mgjax.train.plan`` to drive either through one
interface (``Family``): the model and tokenizer a run starts from, which parameters train, how records become
batches (and the shapes of a batch), how the trained model is scored and exported.

- ``MGM``: MGM's stage 1 / stage 2 (or everything) on LLaVA-format records; held-out answers scored by teacher
  forcing (``heldout.accuracy``).
- ``InternVL``: Mini-InternVL's domain adaptation (``train.stage``: one of ``adapt.MODES``, full / frozen_vit /
  lora) on InternVL meta files, general data mixed into the domain's at ``data.general_ratio``; held-out grounding,
  multiple-choice and short answers scored on greedy generations (``domain_eval``); LoRA adapters merged into the
  exported weights, so ``final/`` is a plain checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

import mgjax
from mgjax import config as cfg
from mgjax.data import loader, meta, samples, shards
from mgjax.demo import grounding_task, mgm_task
from mgjax.eval import domain_eval, heldout
from mgjax.inference.generate import stop_ids
from mgjax.models import mgm_towers, mining
from mgjax.models.internvl import InternVLChatModel
from mgjax.nn import attention, lora
from mgjax.parallel import mesh as mesh_lib
from mgjax.recipes import adapt
from mgjax.train import flops, optim

if TYPE_CHECKING:
    from mgjax.train.run_config import ModelSection, RunConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class Data:
    """Training records and how each becomes a sample; held-out records (None: no evaluation) and their maker."""

    records: Sequence
    make: Callable[[dict], dict]
    eval_records: list | None
    eval_make: Any
    lengths: list[int] | None = None
    pack: dict | None = None  # loader.Batches' packing keywords


@runtime_checkable
class Family(Protocol):
    """A model family as training and planning see it. ``c``: the run config; ``m``: its model section."""

    stages: dict[str, tuple[str, ...]]  # train.stage -> trainable parameter regexes
    eval_title: str

    # ---- a batch
    def inputs(self, c: RunConfig) -> tuple[str, ...]:
        """The batch keys the step takes (the loader's others stay on the host)."""

    def seq_len(self, c: RunConfig) -> int:
        """Positions per batch row: a sample's, or a packed row's."""

    def input_shapes(self, c: RunConfig, config, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes and dtypes of ``batch`` rows as the loader hands them over, for the model of ``config``."""

    # ---- the model, from shapes (plans) or for real (runs)
    def architecture(self, m: ModelSection):
        """The model config ``m`` names, from its release (or the demo's) alone: nothing is read."""

    def new_model(self, c: RunConfig, config) -> nnx.Module:
        """A fresh model of ``config`` as the run trains it (with the adapters its stage adds)."""

    def patterns(self, c: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(trainable, frozen) parameter regexes, as ``make_optimizer`` takes them."""

    def build(self, m: ModelSection, mesh: jax.sharding.Mesh | None = None) -> tuple[nnx.Module, Any]:
        """The model and its tokenizer, as the model section says; with a ``mesh``, born sharded."""

    def trainable(self, c: RunConfig, model: nnx.Module, mesh) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``patterns``, after preparing ``model`` for the stage (adapters added, placed on ``mesh``)."""

    # ---- data, cost, scores, export
    def data(self, c: RunConfig, model: nnx.Module, tok, out: Path) -> Data:
        """The training and held-out records and how each becomes a sample."""

    def step_flops(self, c: RunConfig, model: nnx.Module, wrt, batch: int | None = None) -> Callable[[int], dict]:
        """``seq_len`` -> the FLOPs of a step of ``batch`` (default ``train.global_batch``) rows, by role."""

    def evaluate(self, c: RunConfig, model: nnx.Module, tok, data: Data, mesh, out: Path) -> dict:
        """Held-out accuracy by question kind."""

    def export(self, c: RunConfig, model: nnx.Module) -> None:
        """What happens to the model before ``final/`` is written."""


def _dtypes(m) -> dict:
    if m.compute_dtype not in DTYPES:
        raise cfg.ConfigError(f"model.compute_dtype must be one of {sorted(DTYPES)}, not {m.compute_dtype!r}")
    if m.attention_impl not in attention.BACKENDS:
        raise cfg.ConfigError(f"model.attention_impl must be one of {attention.BACKENDS}, not {m.attention_impl!r}")
    return dict(dtype=DTYPES[m.compute_dtype], param_dtype=jnp.float32, remat=m.remat, attention_impl=m.attention_impl)


def _held_out(c, default: Path | None) -> tuple[list | None, Path | None]:
    """The held-out records (``eval.path``, else the demo's ``default``) and their file."""
    path = Path(c.eval.path) if c.eval.path else default
    if path is None or not c.eval.enabled:
        return None, None
    return list(samples.read_records(path)), path


# ----------------------------------------------------------------------------------------------------------- MGM
class MGM:
    stages = {"stage1": optim.MGM_STAGE1, "stage2": optim.MGM_STAGE2, "full": (r".*",)}
    eval_title = "held-out accuracy (teacher-forced exact answer)"

    def inputs(self, c) -> tuple[str, ...]:
        return "input_ids", "labels", "images", "images_aux"

    def seq_len(self, c) -> int:
        return c.data.max_length

    def input_shapes(self, c, config, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """One batch of ``batch`` rows as the loader hands it over: int32 ids and labels, float32 images."""
        side = config.vision.image_size
        images = (batch, config.views, 3, side, side) if config.views > 1 else (batch, 3, side, side)
        out = {
            "input_ids": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
            "labels": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
            "images": jax.ShapeDtypeStruct(images, jnp.float32),
        }
        if config.mining:
            aux = config.image_size_aux
            out["images_aux"] = jax.ShapeDtypeStruct((batch, 3, aux, aux), jnp.float32)
        return out

    def architecture(self, m):
        """The config of the model ``m`` trains, from ``model.release`` (or the demo's) alone: nothing is read,
        for plans made from shapes."""
        over = {**_dtypes(m), **({} if m.mining else {"mining": False})}
        if m.init == "demo":
            demo = mgm_task.model_config()
            return type(demo).from_hf(demo.to_hf(), **over)
        if not m.release:
            raise cfg.ConfigError(
                f"model.init {m.init!r}: plans take the architecture from model.release, which is not set"
            )
        from mgjax.recipes import mgm_releases

        return mgm_releases.config(m.release, **over)

    def new_model(self, c, config) -> nnx.Module:
        """A fresh model of ``config`` as the run trains it."""
        from mgjax.models.registry import model_class

        return model_class(config.model_type)(config, rngs=nnx.Rngs(0))

    def patterns(self, c) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(trainable, frozen) parameter regexes, as ``make_optimizer`` takes them."""
        return self.stages[c.train.stage], tuple(c.train.freeze)

    def overrides(self, m) -> dict:
        if m.mining_backend not in mining.BACKENDS:
            raise cfg.ConfigError(f"model.mining_backend must be one of {mining.BACKENDS}, not {m.mining_backend!r}")
        if m.towers not in mgm_towers.SOURCES:
            raise cfg.ConfigError(f"model.towers must be one of {mgm_towers.SOURCES}, not {m.towers!r}")
        out = dict(_dtypes(m), mining_backend=m.mining_backend)
        if m.release:
            from mgjax.recipes import mgm_releases

            out.update(mgm_releases.mgm_fields(m.release))
        return out if m.mining else {**out, "mining": False}

    def build(self, m, mesh: jax.sharding.Mesh | None = None):
        """The model and its tokenizer, as the model section says; with a ``mesh``, born sharded."""
        from mgjax.pretrained import assemble, model_class, read_config

        over = self.overrides(m)
        if m.init == "demo":  # through from_hf, so that dtype and remat reach every sub-model's config
            demo = mgm_task.model_config()
            return mgjax.init(type(demo).from_hf(demo.to_hf(), **over), seed=0, mesh=mesh), mgm_task.tokenizer()
        from transformers import AutoTokenizer

        if m.init == "pretrained":
            return (
                mgjax.from_pretrained(
                    m.path, mesh=mesh, towers_root=m.towers_root or None, tower_source=m.towers, **over
                ),
                AutoTokenizer.from_pretrained(m.path),
            )
        if m.init != "parts":
            raise cfg.ConfigError(f"model.init must be 'demo', 'pretrained' or 'parts', not {m.init!r}")
        if not (m.release and m.llm and m.vision and (m.vision_aux or not m.mining)):
            raise cfg.ConfigError(
                "model.init 'parts' needs model.release, model.llm, model.vision and model.vision_aux"
            )
        from mgjax.recipes import mgm_releases

        release = mgm_releases.config(m.release, **over)
        llm_hf = read_config(Path(m.llm))
        llm = model_class(llm_hf.get("model_type")).config_class.from_hf(llm_hf, **_dtypes(m))
        config = dataclasses.replace(release, llm=llm)
        parts = {
            "language_model": m.llm,
            "vision_tower": m.vision,
            **({"vision_tower_aux": m.vision_aux} if config.mining else {}),
        }
        return assemble(config, parts, mesh=mesh), AutoTokenizer.from_pretrained(m.llm)

    def trainable(self, c, model, mesh) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.patterns(c)

    def data(self, c, model, tok, out: Path) -> Data:
        d, held_out = c.data, None
        if d.pack_length:
            raise cfg.ConfigError("data.pack_length: packing is for InternVL models (model.family internvl)")
        if c.model.init == "demo" and not d.path:
            train, held_out = mgm_task.write_dataset(out / "data")
            d = dataclasses.replace(d, path=str(train), image_folder=str(train.parent))
        images = d.image_folder or str(Path(d.path).parent)
        make = samples.MGMSamples(
            model.config,
            tok,
            d.template or mgm_task.TEMPLATE,
            images,
            max_length=d.max_length,
            pad_to_square=d.pad_to_square,
            pad_id=tok.pad_token_id or 0,
            exif_transpose=d.exif_transpose,
            max_image_pixels=d.max_image_pixels,
            allow_outside=d.allow_paths_outside_image_folder,
        )
        records = read_records(d.path)
        lengths = loader.lengths(records, model.config.tokens_per_image) if d.group_by_length else None
        eval_records, _ = _held_out(c, held_out)
        return Data(
            records, make, eval_records, dataclasses.replace(make, image_folder=c.eval.image_folder or images), lengths
        )

    def step_flops(self, c, model, wrt, batch: int | None = None) -> Callable[[int], dict]:
        """``seq_len`` -> the FLOPs of a step of ``batch`` (default ``train.global_batch``) rows, by role."""
        batch = batch or c.train.global_batch
        return lambda seq_len: flops.mgm_step_flops(model, wrt, batch=batch, seq_len=seq_len)

    def evaluate(self, c, model, tok, data: Data, mesh, out: Path) -> dict:
        return heldout.accuracy(model, data.eval_records, data.eval_make, batch=c.eval.batch, mesh=mesh)

    def export(self, c, model) -> None:
        pass


# ------------------------------------------------------------------------------------------------------ InternVL
class InternVL:
    stages = {name: mode.trainable for name, mode in adapt.MODES.items()}
    eval_title = "held-out accuracy (greedy answers: grounding IoU >= 0.5, choice letter, exact text)"

    def inputs(self, c) -> tuple[str, ...]:
        return ("input_ids", "labels", "pixel_values") + (("segment_ids",) if c.data.pack_length else ())

    def seq_len(self, c) -> int:
        return c.data.pack_length or c.data.max_length

    def input_shapes(self, c, config, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """One batch of ``batch`` rows (packed rows with ``data.pack_length``) of ``_row_tiles`` tile slots each."""
        side = config.vision.image_size
        tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
        return {
            "input_ids": tokens,
            "labels": tokens,
            "pixel_values": jax.ShapeDtypeStruct((batch, _row_tiles(c.data), 3, side, side), jnp.float32),
            **({"segment_ids": tokens} if c.data.pack_length else {}),
        }

    def architecture(self, m):
        """The config of the model ``m`` trains, from ``model.release`` (or the demo's) alone (see ``MGM``)."""
        if m.init == "demo":
            demo = grounding_task.model_config(grounding_task.tokenizer().convert_tokens_to_ids("<IMG_CONTEXT>"))
            return type(demo).from_hf(demo.to_hf(), **_dtypes(m))
        if not m.release:
            raise cfg.ConfigError(
                f"model.init {m.init!r}: plans take the architecture from model.release (an "
                "InternVL2 release), which is not set"
            )
        from mgjax.recipes import internvl_releases

        return internvl_releases.shapes_config(m.release, image_token_id=0, **_dtypes(m))

    def new_model(self, c, config) -> nnx.Module:
        """A fresh model of ``config`` with the adapters ``train.stage`` adds."""
        model = InternVLChatModel(config, rngs=nnx.Rngs(0))
        adapt.prepare(model, c.train.stage, rank=c.train.lora_rank, alpha=c.train.lora_alpha)
        return model

    def patterns(self, c) -> tuple[tuple[str, ...], tuple[str, ...]]:
        mode = adapt.MODES[c.train.stage]
        return mode.trainable, (*mode.frozen, *c.train.freeze)

    def build(self, m, mesh: jax.sharding.Mesh | None = None):
        over = _dtypes(m)
        if m.init == "demo":
            tok = grounding_task.tokenizer()
            demo = grounding_task.model_config(tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
            return mgjax.init(type(demo).from_hf(demo.to_hf(), **over), seed=0, mesh=mesh), tok
        if m.init != "pretrained":
            raise cfg.ConfigError(f"model.init must be 'demo' or 'pretrained' for an InternVL model, not {m.init!r}")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(m.path, trust_remote_code=False)
        token = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        if token is None or token == tok.unk_token_id:
            raise cfg.ConfigError(f"{m.path}: the tokenizer has no <IMG_CONTEXT> token")
        return mgjax.from_pretrained(m.path, mesh=mesh, image_token_id=token, **over), tok

    def trainable(self, c, model, mesh) -> tuple[tuple[str, ...], tuple[str, ...]]:
        mode = adapt.prepare(model, c.train.stage, rank=c.train.lora_rank, alpha=c.train.lora_alpha)
        if mode.lora:  # the new adapters start on the default device
            mesh_lib.shard(model, mesh)
        return self.patterns(c)

    def _template(self, c, model) -> str:
        return c.data.template or model.config.template or "Hermes-2"

    def _make(self, c, model, tok, image_folder: str) -> samples.InternVLSamples:
        d = c.data
        return samples.InternVLSamples(
            model.config,
            tok,
            self._template(c, model),
            image_folder,
            max_length=d.max_length,
            max_dynamic_patch=d.max_dynamic_patch,
            tile_slots=_sample_tiles(d),
            pad_id=tok.pad_token_id or 0,
            exif_transpose=d.exif_transpose,
            max_image_pixels=d.max_image_pixels,
            allow_outside=d.allow_paths_outside_image_folder,
        )

    def data(self, c, model, tok, out: Path) -> Data:
        d, held_out = c.data, None
        if c.model.init == "demo" and not (d.meta or d.path):  # the demo's general stage
            _, general, held_out = grounding_task.write_dataset(out / "data")
            d = dataclasses.replace(d, meta=str(general), general_meta="", general_ratio=0.0)
        if d.meta:
            records, images = _meta_records(d), ""  # image paths joined to their source's root
        elif d.path:
            records, images = read_records(d.path), d.image_folder or str(Path(d.path).parent)
        else:
            raise cfg.ConfigError("an InternVL run needs data.meta (an InternVL meta file) or data.path (JSONL)")
        eval_records, eval_path = _held_out(c, held_out)
        eval_images = c.eval.image_folder or (str(eval_path.parent) if eval_path else "")
        tile_tokens = model.config.tokens_per_tile * (d.max_dynamic_patch + 1)
        lengths = loader.lengths(records, tile_tokens) if d.group_by_length else None
        return Data(
            records,
            self._make(c, model, tok, images),
            eval_records,
            self._make(c, model, tok, eval_images),
            lengths,
            _packing(c, tok),
        )

    def step_flops(self, c, model, wrt, batch: int | None = None) -> Callable[[int], dict]:
        tiles, batch = _row_tiles(c.data), batch or c.train.global_batch
        return lambda seq_len: flops.internvl_step_flops(model, wrt, batch=batch, seq_len=seq_len, tiles=tiles)

    def evaluate(self, c, model, tok, data: Data, mesh, out: Path) -> dict:
        """Greedy answers to the held-out records, scored by kind (a record's ``type``, else ``choice`` with
        ``options``, ``grounding`` when the reference holds a box, ``exact`` otherwise); every answer goes to
        ``out/eval_answers.jsonl``."""
        if jax.process_count() > 1:
            print("held-out generation runs in one process: evaluate final/ with a single-process run")
            return {}
        prompts, rows, skipped = [], [], defaultdict(int)
        for i, record in enumerate(data.eval_records):
            kind, reference = _kind(record)
            try:
                prompts.append(data.eval_make.prompt(record))
            except samples.BadSample as bad:
                print(f"held-out {bad}: skipped")
                skipped[kind] += 1
                continue
            rows.append(
                {
                    "id": str(record.get("id", i)),
                    "kind": kind,
                    "reference": reference,
                    **({"options": record["options"]} if kind == "choice" else {}),
                }
            )
        tokens = heldout.answers(
            model,
            prompts,
            max_new_tokens=c.eval.max_new_tokens,
            stop_ids=stop_ids(tok, self._template(c, model)),
            batch=c.eval.batch,
        )
        for row, answer in zip(rows, tokens):
            row["answer"] = tok.decode(answer, skip_special_tokens=False)
        scores = _score(rows, skipped)
        if jax.process_index() == 0:
            (out / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return scores

    def export(self, c, model) -> None:
        if adapt.MODES[c.train.stage].lora:
            print(f"merged {lora.merge(model)} LoRA adapters into the exported weights")


def _sample_tiles(d) -> int:
    """Tile slots of one sample."""
    return d.tile_slots or d.max_dynamic_patch + 1


def _row_tiles(d) -> int:
    """Tile slots of one batch row: a sample's, or a packed row's (``data.pack_tiles``, by default a sample's for
    every ``max_length`` of the row)."""
    if not d.pack_length:
        return _sample_tiles(d)
    return d.pack_tiles or _sample_tiles(d) * -(-d.pack_length // d.max_length)


def _packing(c, tok) -> dict | None:
    """``loader.Batches``' packing keywords: rows of ``data.pack_length`` tokens and ``_row_tiles`` tiles."""
    d = c.data
    if not d.pack_length:
        return None
    if d.pack_length < d.max_length:
        raise cfg.ConfigError(
            f"data.pack_length {d.pack_length} must hold a whole sample (data.max_length {d.max_length})"
        )
    if not c.train.steps:
        raise cfg.ConfigError(
            "data.pack_length: set train.steps (how many samples a packed row holds is only "
            "known as the data is read, so epochs do not give a step count)"
        )
    tiles = _row_tiles(d)
    if tiles < _sample_tiles(d):
        raise cfg.ConfigError(f"data.pack_tiles {tiles} must hold a whole sample's {_sample_tiles(d)} tiles")
    return {"length": d.pack_length, "tiles": tiles, "pad_id": tok.pad_token_id or 0}


def _meta_records(d) -> list[dict]:
    domain = meta.read_meta(d.meta)
    general = meta.read_meta(d.general_meta) if d.general_meta else []
    if d.general_ratio and not general:
        raise cfg.ConfigError(f"data.general_ratio {d.general_ratio} needs data.general_meta")
    for source in (*domain, *general):
        source.records = meta.Picked(source.records, range(len(source.records)), partial(meta.rooted, root=source.root))
    return meta.mix(domain, general, d.general_ratio, seed=d.seed)


def read_records(path: str) -> Sequence:
    """``data.path``'s records: a shard dataset's folder (``python -m mgjax.data.convert``), read as batches need
    them, or a LLaVA JSON / JSONL file."""
    if shards.is_dataset(path):
        return shards.Shards(path)
    if Path(path).is_dir():
        raise cfg.ConfigError(f"data.path {path} is a folder without {shards.MANIFEST}: not a shard dataset")
    return list(samples.read_records(path))


def _kind(record: dict) -> tuple[str, str]:
    turns = record.get("conversations") or [{}]
    reference = str(turns[-1].get("value", "")) if isinstance(turns[-1], dict) else ""
    kind = record.get("type") or (
        "choice" if "options" in record else "grounding" if domain_eval.parse_boxes(reference) else "exact"
    )
    return kind, reference


def _score(rows: list[dict], skipped: dict[str, int]) -> dict[str, dict]:
    out = {}
    for kind in sorted({r["kind"] for r in rows} | set(skipped)):
        mine = [r for r in rows if r["kind"] == kind]
        if kind in domain_eval.JUDGES:
            summary = domain_eval.score(kind, mine)["summary"] if mine else {"right": 0, "total": 0}
        else:
            right = sum(r["answer"].strip() == r["reference"].strip() for r in mine)
            summary = {"right": right, "total": len(mine)}
        total = summary["total"]
        out[kind] = {
            **summary,
            "skipped": skipped[kind],
            "accuracy": summary["right"] / total if total else float("nan"),
        }
    return out


FAMILIES: dict[str, Family] = {"mgm": MGM(), "internvl": InternVL()}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise cfg.ConfigError(f"model.family must be one of {sorted(FAMILIES)}, not {name!r}")
    return FAMILIES[name]
