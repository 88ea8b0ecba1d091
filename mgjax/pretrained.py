"""``from_pretrained`` / ``save_pretrained``: HF checkpoint directories in, HF checkpoint directories out."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.convert import hf
from mgjax.convert.safetensors_io import CheckpointError, KeyMismatch
from mgjax.models import mgm_towers
from mgjax.models.base import ModelConfig
from mgjax.models.mgm import FAMILIES as MGM_TYPES
from mgjax.models.registry import model_class
from mgjax.nn import layers, quant
from mgjax.parallel import mesh as mesh_lib


def init(config: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """A randomly initialised model, built in one compiled program (eager construction compiles every
    initializer separately: seconds per layer type). The structure comes from an abstract trace, the values
    from ``jit``; with a ``mesh`` each parameter is born in its shards (``mgjax.parallel.mesh``)."""
    cls = model_class(config.model_type)
    build = lambda: cls(config, rngs=nnx.Rngs(seed))  # noqa: E731
    abstract = nnx.eval_shape(build)
    graphdef, _ = nnx.split(abstract)
    out = mesh_lib.shardings(abstract, mesh) if mesh is not None else None
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()), out_shardings=out)())


def assemble(
    config: ModelConfig, parts: dict[str, str | os.PathLike], *, seed: int = 0, mesh: jax.sharding.Mesh | None = None
) -> nnx.Module:
    """A model whose named top-level submodules load from their own HF checkpoints (MGM stage 1: the base LLM and
    both towers) and whose other parameters (the projectors) are randomly initialised. Only those are computed:
    the initialisers of the loaded parts are dead code in the compiled program. ``mesh``: born sharded."""
    cls = model_class(config.model_type)
    build = lambda: cls(config, rngs=nnx.Rngs(seed))  # noqa: E731
    model = nnx.eval_shape(build)
    fresh = lambda path, _: path[0] not in parts  # noqa: E731
    out = mesh_lib.shardings(nnx.state(model, fresh), mesh) if mesh is not None else None
    nnx.update(model, jax.jit(lambda: nnx.state(build(), fresh), out_shardings=out)())
    place = mesh_lib.placer(mesh) if mesh is not None else None
    for name, path in parts.items():
        sub = getattr(model, name)
        setattr(model, name, hf.load_into(sub, path, layouts=type(sub).layouts(sub.config), place=place))
    return model


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path}: no config.json (pass config= to from_pretrained for bare weight files)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    config: ModelConfig | None = None,
    layout: str = "auto",
    weights: str | os.PathLike | None = None,
    towers: dict[str, tuple[str | os.PathLike, str]] | None = None,
    towers_root: str | os.PathLike | None = None,
    tower_source: str = "mgm",
    mesh: jax.sharding.Mesh | None = None,
    **overrides,
) -> nnx.Module:
    """Build an mgjax model from an HF checkpoint directory.

    ``dtype`` is used for both parameters and compute (override either with ``param_dtype=`` / ``dtype=`` in a
    ``config``). ``layout`` names a key table (e.g. ``"timm"`` for ConvNeXt); ``"auto"`` takes the one that
    matches the checkpoint best. ``weights`` points at the safetensors file(s) when they live apart from
    ``config.json``. ``towers`` takes submodules from their own files instead, as ``{attribute: (path, layout)}``.
    Every key and shape is checked; a mismatch raises an error naming each offending key. With a ``mesh``, each
    process reads the checkpoint and keeps only its own shards (``mgjax.parallel.mesh.placer``).

    An MGM checkpoint that names its towers by directory (MGM's own) loads them as MGM does
    (``mgjax.models.mgm_towers``): from the directories found under ``towers_root``, the working directory or beside the
    checkpoint, printing where each came from; ``tower_source="checkpoint"`` uses the checkpoint's copies.
    """
    path = Path(path)
    towers = dict(towers or {})
    d = None
    if config is None:
        d = read_config(path)
        if d.get("model_type") in MGM_TYPES:
            plan = mgm_towers.resolve(
                {**d, **{k: overrides[k] for k in ("mining",) if k in overrides}},
                weights or path,
                root=towers_root,
                source=tower_source,
            )
            d, towers = plan.config, {**plan.towers, **towers}
            if plan.sources:
                print(plan.line(), file=sys.stderr)
        config = model_class(d.get("model_type")).config_class.from_hf(
            d, **{"dtype": dtype, "param_dtype": dtype, **overrides}
        )
    cls = model_class(config.model_type)
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    quantized = quant.from_config((d or config.hf or {}).get("quantization_config"), str(path / "config.json"))
    if quantized is not None:  # mgjax's own quantized checkpoint: integers and scales load as they are
        quant.quantize(abstract, *quantized)
    place = mesh_lib.placer(mesh) if mesh is not None else None
    try:
        model = hf.load_into(
            abstract, weights or path, layouts=cls.layouts(config), layout=layout, skip=tuple(towers), place=place
        )
    except KeyMismatch as e:
        raise mgm_towers.explain(e, d or {}) if config.model_type == "mgm" else e from None
    for name, (file, tower_layout) in towers.items():
        sub = getattr(model, name)
        setattr(
            model,
            name,
            hf.load_into(sub, file, layouts=type(sub).layouts(sub.config), layout=tower_layout, place=place),
        )
    return model


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    dtype=None,
    layout: str | None = None,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``) in the model's
    own checkpoint layout, or the named one of its ``layouts``. A quantized model (``mgjax.nn.quant``) is written
    as it is, integers and float32 scales, with a ``quantization_config`` in ``config.json``."""
    if layers.is_unstacked(model):
        raise ValueError("the model's layers are held per layer (decoding's layout): layers.restack(model) first")
    quantization = quant.config_entry(model)
    if quantization is not None and dtype is not None:
        raise ValueError("a quantized model is saved as it is: dtype= would cast its integers and scales")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layouts = type(model).layouts(model.config)
    if layout is not None and layout not in layouts:
        raise ValueError(f"no key layout {layout!r}; known: {sorted(layouts)}")
    hf.save(model, out_dir, layout=layouts[layout or next(iter(layouts))], dtype=dtype, max_shard_bytes=max_shard_bytes)
    cfg = model.config.to_hf()
    # The dtype the tensors were written in, not the one the model was first loaded from.
    written = dtype or next(
        x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if jnp.issubdtype(x.dtype, jnp.floating)
    )
    cfg["dtype"] = jnp.dtype(written).name
    cfg.pop("quantization_config", None)
    if quantization is not None:
        cfg["quantization_config"] = quantization
    if jax.process_index() != 0:
        return out_dir
    tmp = out_dir / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    os.replace(tmp, out_dir / "config.json")
    return out_dir
