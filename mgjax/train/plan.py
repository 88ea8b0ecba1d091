"""Plan a training run before renting the chips: per-device memory, step FLOPs and step time of a run config on a
named topology. ``python -m mgjax.plan --config configs/mgm/MGM-7B/stage2.yaml --topology 8xH100
[--mesh data=1,fsdp=-1,tensor=1,expert=1] [--set key=value ...] [--batch N] [--seq-len L] [--mfu 0.4] [--json]``

Everything comes from shapes: the model is built with ``nnx.eval_shape`` from ``model.release`` (an MGM or an
InternVL2 release, or the family's demo config), never from the checkpoint paths the config names, so MGM-34B plans
in seconds on a laptop. What differs by family (``mgjax.train.families``): the trainable set (MGM's stage, InternVL's
adaptation mode with its LoRA adapters), the batch (InternVL rows carry their tile slots, and packed rows their
segment ids) and the loss weighting, all as ``mgjax.train`` runs them.

Memory per device, as ``mgjax.train`` lays it out (parameters and optimizer state float32, ``mgjax.parallel.mesh``'s
placement from the logical axes; the device holding the most is reported):

* parameters: ``mesh.placement``.
* gradients: the trainable parameters in float32, placed like them. With more than one micro-batch the
  accumulator of ``train_step``'s scan and the micro-batch's own gradients are both live: twice that (XLA:CPU's
  compiled step grows by 10.4 GiB for MGM-2B's 9.4 GiB of gradients).
* optimizer: AdamW's two float32 moments of every trainable parameter, placed like it.
* activations, an estimate of the bytes live at the step's peak for one micro-batch of
  ``global_batch / micro_batches / batch shards`` samples (the batch shards: the product of the mesh axes
  ``mgjax.parallel.sharding`` splits the batch over) at ``seq_len`` positions: the sum of
  - what the forward keeps for the backward: the residuals of ``jax.vjp`` of the loss with respect to the
    trainable parameters, traced on shapes through this code (parameters it refers to are left out, and so are
    float32 residuals that are upcasts of a narrower one of the same shape: XLA fuses such converts into their
    consumers rather than keep them). Depth is linear, so the model is traced with one and with two LLM layers
    and extrapolated; the rest comes from a trace under full remat, as without remat a one-layer model also
    keeps the attention's mask and fill value broadcast to the scores' shape, which XLA never materialises. The
    remat policy decides what a layer keeps: ``full`` its input (2·s·b·h bytes at bf16), ``dots`` /
    ``dots_no_batch`` also its matmul outputs, ``none`` everything. The usual formula for ``none``, Korthikanti
    et al. 2022's 34·s·b·h + 5·a·s²·b bytes at 16 bits, undercounts this code: MGM-7B at s 2048 keeps 1.25 GiB
    per layer and sample, not 0.89 (the float32 softmax and its bf16 cast, six MLP-wide values), and each layer's
    weights once more in bf16;
  - the larger of the backward's two working sets, which are live one after the other: the logits' gradient in
    the compute dtype (the float32 one is written over the kept log-softmax; its cast feeds the head's matmuls)
    and, under remat, the layer being recomputed (what a layer keeps without remat beyond what the policy kept);
  - the inputs: the local batch, every micro-batch, as the loader hands it over.
  Tensor parallelism is planned Megatron-style: a device traces the LLM with its share of the heads, the MLP and
  the vocabulary; h-wide values stay whole (no sequence parallelism). Expert parallelism is not reflected. On a TPU
  slice the trace follows the kernels a TPU runs (splash attention, megablox MoE dispatch, mining's kernel).
* packing: XLA places every buffer in one arena at an offset and leaves gaps where a buffer outlives those placed
  below it, so its peak is more than the live bytes (MGM-2B with one LLM layer on v5p-8: 25.0 GiB live at the
  peak, a 33.4 GiB arena). ``PACKING`` of everything above, fitted to the sum of the TPU compiler's memory parts
  (``bench/tpu_fit.py``'s rows), which counts the arena's gaps twice: the compiler's own peak, what ``fits``
  judges, is lower (``mgjax.train.step.memory``); on GPUs (XLA's same heap simulator) it is unmeasured.

HBM per chip is the vendor's capacity, taken as GiB; runtimes report a little less. Step time is the step's model
FLOPs (``mgjax.train.flops``, global batch) over chips x peak x the assumed MFU.

``--serve`` plans a served model instead (``python -m mgjax.plan --serve --model RELEASE_OR_DIR --topology 8xH100
[--mesh tensor=8] [--quant int8|int4] [--dtype bfloat16] [--max-batch 8 --max-prompt-tokens 4096
--max-tokens-limit 4096]``, or ``--chips N --hbm-gib X`` for chips the table does not name), held as
``mgjax.serve``'s continuous-batching engine (``mgjax.inference.engine``) holds it with the same flags. Per chip:

* weights, exact. The model of the release (an MGM or InternVL2 name) or of a checkpoint's ``config.json`` is
  built with ``nnx.eval_shape`` in ``--dtype``, quantized on shapes (``mgjax.nn.quant``: the LLM's linear layers'
  integers and float32 scales) where ``--quant`` or the checkpoint's ``quantization_config`` says, and each
  parameter's share is its bytes over the pieces ``mesh.spec`` cuts it into, as loading with ``--mesh`` places it.
* KV cache, exact: ``--max-batch`` slots, each layer's k and v ``[slots, positions, kv_heads, head_dim]`` in the
  compute dtype (``KVCache.init``), of the positions the engine grows its cache to for the longest request: the
  prompt padded to the engine's bucket plus ``--max-tokens-limit``, up to a power of two. Nothing constrains the
  cache's layout: XLA lays it out like the k/v projections that fill it, the kv-heads axis split over ``tensor``
  where ``tensor`` divides the kv heads, whole on every chip otherwise; the slots are never split (measured on 8
  CPU devices, ``tests/test_plan_serve.py``).
* working set, an estimate: the largest of what three of the engine's programs hold beyond the weights and the
  cache. (1) The prefill of one longest prompt alone, into a cache of its own length: a prefill with a cache
  attends with the XLA reference on every backend (``mgjax.nn.attention``: splash and cuDNN refuse a cache), so
  its heads x prompt x prompt scores grow: float32 logits, float32 exponentials and the probabilities in the
  compute dtype (10 bytes each at bfloat16; XLA's fused softmax on a GPU may keep only the logits and the
  probabilities). The prefill counts the residual stream and its norm, the largest of one layer's attention
  (those scores, the mask, q, k, v, the output), one layer's MLP (gate, up and product; Mixtral's dense experts
  off a TPU run every expert on every token, float32 outputs included) and the head's logits of every prompt
  position, the prompt's own cache, and, quantized, two layers' weights dequantized to the compute dtype (XLA:CPU
  holds 1.8: the next layer's is made ahead of its turn). (2) Growing the cache to its whole length: the old
  half-length cache and the new one are both live. (3) One decoding step of every slot. Tensor parallelism splits
  heads, MLP and vocabulary as for training (``_tensor_shard``). Checked against XLA:CPU's compiled prefill at
  float32 (which keeps the logits and the probabilities alone: the estimate is 1.0-1.6x its temporaries); at
  bfloat16 XLA:CPU also keeps float32 copies of weights and scores that GPUs and TPUs do not. Left out: the
  vision towers' forward of an image (tens of MiB), cuBLAS/cuDNN workspaces, allocator fragmentation, the
  runtime's own reservation. Unmeasured on GPUs and TPUs.
* the total, whether it fits the chip's HBM, and the most slots of that length that fit. JAX's GPU allocator
  takes 75% of the memory unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says more: the plan says so where the total
  needs more.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from math import prod
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax import config as cfg
from mgjax.cli import HelpFormatter, integer, number
from mgjax.inference import engine, serve
from mgjax.models.registry import model_class
from mgjax.nn import attention, params, quant
from mgjax.nn.layers import REMAT_POLICIES
from mgjax.parallel import mesh
from mgjax.parallel import topology as tpu_topology
from mgjax.recipes import internvl_releases, mgm_releases
from mgjax.train import families, flops, loss
from mgjax.train.families import DTYPES
from mgjax.train.run_config import RunConfig
from mgjax.train.step import ShardedStep, batch_loss, make_optimizer, memory

GiB = 1 << 30
F32 = 4
# XLA places buffers in one arena and leaves gaps where a buffer outlives those placed below it: the sum of the TPU
# compiler's memory parts was 1.06-1.31x the live bytes estimated here for 14 compiled MGM-2B/7B/13B/34B stage-2
# steps on v5p and v5e, and 0.98-1.13x for the tiny demo model at bf16 under full remat (its peak counts ~25 MiB of
# program code the estimate leaves out); 1.15 puts all of them within 15%. Over the 44 compiled rows of
# bench/tpu_fit.py (MGM, MGM-HD, MGM-8x7B, InternVL2 full and LoRA) 38 are within 15%; docs/benchmarks.md says
# where the model is off.
PACKING = 0.15


@dataclass(frozen=True)
class Topology:
    chips: int
    hbm_bytes: int  # per chip
    peak_flops: float | None  # dense bf16 FLOP/s per chip; None: unknown (CPUs)
    chips_per_host: int
    platform: str  # gpu | tpu | cpu
    tpu_slice: str | None = None  # a TPU slice name: XLA's TPU compiler compiles for it here (deviceless)


TOPOLOGIES: dict[str, Topology] = {
    "8xH100": Topology(8, 80 * GiB, flops.PEAK_FLOPS["H100"], 8, "gpu"),
    "4x8xH100": Topology(32, 80 * GiB, flops.PEAK_FLOPS["H100"], 8, "gpu"),
    "8xH200": Topology(8, 141 * GiB, flops.PEAK_FLOPS["H200"], 8, "gpu"),
}
TPU_SLICES = "TPU slices GEN-N or KxGEN-N (GEN: v4, v5e, v5p, v6e; e.g. v5p-128, v5e-256, 2xv5p-128)"
LOCAL = "local"  # this process's devices, whatever they are


class PlanError(ValueError):
    """An input the plan cannot be made from; the message names it."""


# ------------------------------------------------------------------------------------------------------ inputs
def topology(name: str) -> Topology:
    if name == LOCAL:
        return _local()
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    if not tpu_topology.NAME.match(name):
        raise PlanError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}, {TPU_SLICES}, {LOCAL}")
    try:
        s = tpu_topology.parse(name)
    except ValueError as e:
        raise PlanError(str(e)) from None
    chips = s.chips * s.slices
    per_host = s.chips if s.chips <= 8 and not s.generation.megacore else 4  # one v5e / v6e host drives 8
    return Topology(chips, s.hbm_bytes, flops.kind_peak_flops(s.generation.kind), per_host, "tpu", name)


def _local() -> Topology:
    device, per_host = jax.devices()[0], jax.local_device_count()
    # CPU devices report no memory stats: they share the host's RAM
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // per_host
    hbm = (device.memory_stats() or {}).get("bytes_limit", ram)
    return Topology(jax.device_count(), hbm, flops.peak_flops(device), per_host, device.platform)


def parse_mesh(text: str, default: mesh.MeshConfig) -> mesh.MeshConfig:
    """``data=2,fsdp=-1`` over ``default``: the axes it names replace the default's."""
    try:
        return mesh.parse(text, default)
    except ValueError as e:
        raise PlanError(str(e)) from None


def check(c: RunConfig, global_batch: int, seq_len: int) -> None:
    """The values the plan takes from the config as names or counts, checked before anything is built."""
    family = families.family(c.model.family)
    for key, value, known in (
        ("train.stage", c.train.stage, family.stages),
        ("model.remat", c.model.remat, REMAT_POLICIES),
        ("model.attention_impl", c.model.attention_impl, attention.BACKENDS),
        ("model.compute_dtype", c.model.compute_dtype, DTYPES),
        ("train.loss_weighting", c.train.loss_weighting, loss.LOSS_WEIGHTS),
    ):
        if value not in known:
            raise PlanError(f"{key} must be one of {sorted(known)}, not {value!r}")
    for key, value in (
        ("the global batch", global_batch),
        ("seq_len", seq_len),
        ("train.micro_batches", c.train.micro_batches),
    ):
        if value < 1:
            raise PlanError(f"{key} must be positive, not {value}")
    if c.train.loss_chunk < 0:
        raise PlanError(f"train.loss_chunk must be 0 (automatic) or a count of positions, not {c.train.loss_chunk}")
    for pattern in c.train.freeze:
        try:
            re.compile(pattern)
        except re.error as e:
            raise PlanError(f"train.freeze: {pattern!r} is not a regex: {e}") from None


def abstract_model(c: RunConfig) -> nnx.Module:
    """The model the run would train (with its adapters), as shapes: parameters float32, compute and remat as
    configured."""
    family = families.family(c.model.family)
    config = family.architecture(c.model)
    return nnx.eval_shape(lambda: family.new_model(c, config))


def trainable_filter(c: RunConfig):
    """The parameters the run's optimizer updates."""
    return params.trainable(*families.family(c.model.family).patterns(c))


# ------------------------------------------------------------------------------------------------------ memory
def float32_bytes(model: nnx.Module, which, sizes: dict[str, int]) -> int:
    """Per-device bytes of the parameters ``which`` selects, in float32, placed as ``mesh.placement`` places them."""
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model, which)):
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        total += var.size * F32 // mesh.shards(mesh.spec(axes, var.shape, sizes), sizes)
    return total


def _tensor_shard(llm, tensor: int):
    """The LLM one device computes under tensor parallelism, Megatron-style: heads, MLP and vocabulary split where
    they divide (``mesh.spec`` replicates what does not); key/value heads fewer than ``tensor`` are repeated."""
    split = lambda n: n // tensor if n % tensor == 0 else n  # noqa: E731
    a, kv = llm.num_attention_heads, llm.num_key_value_heads
    heads = {}
    if a % tensor == 0 and (kv % tensor == 0 or tensor % kv == 0):
        heads = dict(num_attention_heads=a // tensor, num_key_value_heads=max(kv // tensor, 1))
    return dataclasses.replace(
        llm, **heads, intermediate_size=split(llm.intermediate_size), vocab_size=split(llm.vocab_size)
    )


def _nbytes(shapes) -> int:
    return sum(prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def residuals(c: RunConfig, config, *, batch: int, seq_len: int) -> list[jax.ShapeDtypeStruct]:
    """What JAX keeps from the forward of one micro-batch's loss (as ``train_step`` computes it) for its backward:
    the residuals of ``jax.vjp`` with respect to the trainable parameters, for the model of ``config`` trained as
    ``c`` says, traced on shapes. Residuals that are parameters (same shape and dtype) are left out: they are held
    anyway."""
    family = families.family(c.model.family)
    model = nnx.eval_shape(lambda: family.new_model(c, config))
    graphdef, trained, rest = nnx.split(model, trainable_filter(c), ...)

    def loss(p, frozen, inputs):
        return batch_loss(nnx.merge(graphdef, p, frozen), inputs, c.train.loss_weighting, c.train.loss_chunk)[0]

    kept = jax.eval_shape(
        lambda p, frozen, inputs: jax.vjp(lambda q: loss(q, frozen, inputs), p)[1],
        trained,
        rest,
        family.input_shapes(c, config, batch, seq_len),
    )
    weights = {(v.shape, v.dtype) for v in jax.tree.leaves(nnx.state(model))}
    return [a for a in jax.tree.leaves(kept) if (a.shape, a.dtype) not in weights]


def without_upcasts(kept: list[jax.ShapeDtypeStruct]) -> list[jax.ShapeDtypeStruct]:
    """``kept`` less the float32 residuals beside a narrower float one of their shape: upcasts, whose converts XLA
    fuses into their consumers instead of keeping them between forward and backward (the mining projections'
    float32 copies of the HR feature map, the RMSNorms' float32 inputs). A layer being recomputed in the backward
    does materialise them: its working set is counted with them."""
    narrow = {a.shape for a in kept if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < F32}
    return [a for a in kept if not (a.dtype == jnp.float32 and a.shape in narrow)]


def activations(c: RunConfig, config, *, batch: int, micro: int, seq_len: int, tensor: int) -> dict[str, int]:
    """Per-device activation bytes (an estimate, see the module docstring) of one micro-batch of ``micro``
    rows of the model of ``config``, trained as ``c`` says; ``batch``: the local batch, every micro-batch, as the
    loader hands it over."""
    llm, remat = _tensor_shard(config.llm, tensor), c.model.remat
    chunk = min(c.train.loss_chunk or loss.auto_chunk(micro, llm.vocab_size), seq_len)

    @functools.cache
    def traced(layers: int, policy: str) -> list[jax.ShapeDtypeStruct]:
        cut = dataclasses.replace(llm, num_hidden_layers=layers, remat=policy)
        return residuals(c, dataclasses.replace(config, llm=cut), batch=micro, seq_len=seq_len)

    def kept(layers: int, policy: str, upcasts: bool = False) -> int:
        r = traced(layers, policy)
        return _nbytes(r if upcasts else without_upcasts(r))

    def per_layer(policy: str, upcasts: bool = False) -> int:  # residuals grow linearly with depth
        return kept(2, policy, upcasts) - kept(1, policy, upcasts)

    # The rest (towers, projectors) from a trace under full remat: without remat a one-layer model also
    # keeps the attention's mask and fill value broadcast to the scores' shape, which XLA never materialises.
    rest = kept(1, "full") - per_layer("full")
    recomputed = per_layer("none", upcasts=True) - per_layer(remat, upcasts=True)
    return {
        "kept_for_backward": rest + llm.num_hidden_layers * per_layer(remat),
        "recomputed_layer": 0 if remat == "none" else recomputed,
        # the loss's backward recomputes one chunk's float32 logits at a time, and their gradient
        "logits_gradient": 2 * micro * chunk * llm.vocab_size * F32 if traced(1, remat) else 0,  # or no backward
        "inputs": _nbytes(families.family(c.model.family).input_shapes(c, config, batch, seq_len)),
    }


def live_activations(acts: dict[str, int]) -> int:
    """The activation bytes live at the step's peak: what the forward kept and the inputs, with the larger of
    the two working sets of the backward, which come one after the other (the head's, then each layer's)."""
    return acts["kept_for_backward"] + max(acts["recomputed_layer"], acts["logits_gradient"]) + acts["inputs"]


def compiled(c: RunConfig, mesh_config: mesh.MeshConfig, *, global_batch: int, seq_len: int, devices=None) -> dict:
    """XLA's own memory analysis of the training step, compiled ahead of time from shapes alone (nothing is
    materialised) for ``devices`` (deviceless TPU devices, ``mgjax.parallel.topology``) or this process's: the program
    ``mgjax.train`` compiles, prints and checks before step 1. XLA's TPU compiler refuses a program whose
    temporaries alone exceed the chip's HBM: then ``{"refused": its message, "temporaries": the bytes it
    named}``."""
    m = mesh.make_mesh(mesh_config, devices)
    family = families.family(c.model.family)
    config = family.architecture(c.model)

    def with_optimizer():
        model = family.new_model(c, config)
        trainable, frozen = family.patterns(c)
        return model, make_optimizer(model, trainable, c.optim, 1, frozen=frozen)

    model, opt = nnx.eval_shape(with_optimizer)
    rows = global_batch // c.train.micro_batches
    batch = {
        k: jax.ShapeDtypeStruct(
            (c.train.micro_batches, rows, *v.shape[1:]), v.dtype, sharding=mesh.batch_sharding(m, v.ndim + 1)
        )
        for k, v in family.input_shapes(c, config, rows, seq_len).items()
    }
    try:
        return memory(ShardedStep(model, opt, m, c.train.loss_weighting, c.train.loss_chunk).compile(model, opt, batch))
    except jax.errors.JaxRuntimeError as e:
        message = str(e).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in message:
            raise PlanError(f"XLA's compiler failed on this step: {message[:500]}") from None
        needed = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
        scale = {"K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40}
        return {"refused": message, "temporaries": int(float(needed[1]) * scale[needed[2]]) if needed else None}


# ------------------------------------------------------------------------------------------------------ the plan
def _local_batch(global_batch: int, micro_batches: int, sizes: dict[str, int]) -> int:
    shards = mesh.batch_shards(sizes)
    if global_batch % (micro_batches * shards):
        raise PlanError(
            f"global batch {global_batch} does not split into {micro_batches} micro-batch(es) x "
            f"{shards} batch shards ({' x '.join(mesh.batch_axes())}); change --batch, "
            "train.micro_batches or the mesh"
        )
    return global_batch // shards


def _traced_for(topo):
    """The estimate traces the program the chips would run: on a TPU slice, its kernels (splash attention, mining)
    and their residuals; elsewhere, this process's choices (cuDNN cannot be traced without a GPU)."""
    if topo.tpu_slice is None:
        return contextlib.nullcontext()
    try:
        return tpu_topology.compiling_for(tpu_topology.devices(topo.tpu_slice)[0])
    except RuntimeError:  # no libtpu: the reference paths
        return contextlib.nullcontext()


def report(
    c: RunConfig,
    topology_name: str,
    mesh_config: mesh.MeshConfig | None = None,
    *,
    mfu: float = 0.4,
    batch: int | None = None,
    seq_len: int | None = None,
    compile: bool = False,
) -> dict:
    """The plan of run config ``c`` on a topology, as a JSON-able dict (bytes per device, FLOPs per step); with
    ``compile`` (local devices or a TPU slice) also XLA's memory analysis of the compiled step, which then
    decides ``fits``. Without it ``fits`` is None wherever a compile is possible: the estimate leaves out
    transients and is no answer where the compiler can give one."""
    family = families.family(c.model.family)
    global_batch = c.train.global_batch if batch is None else batch
    seq_len = family.seq_len(c) if seq_len is None else seq_len
    check(c, global_batch, seq_len)
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], not {mfu}")
    topo = topology(topology_name)
    if compile and topology_name != LOCAL and topo.tpu_slice is None:
        raise PlanError(
            f"--compile needs the devices it compiles for: run it on them with --topology {LOCAL} "
            f"(here, {topology_name} is planned by arithmetic; TPU slices compile anywhere)"
        )
    try:
        sizes = (mesh_config or c.mesh).sizes(topo.chips)
    except ValueError as e:
        raise PlanError(f"{topology_name} has {topo.chips} chips: {e}") from None
    local = _local_batch(global_batch, c.train.micro_batches, sizes)
    model = abstract_model(c)
    trainable = trainable_filter(c)
    placed = mesh.placement(model, sizes)
    weights = float32_bytes(model, trainable, sizes)
    with _traced_for(topo):
        acts = activations(
            c,
            model.config,
            batch=local,
            micro=local // c.train.micro_batches,
            seq_len=seq_len,
            tensor=sizes["tensor"],
        )
    memory = {
        "parameters": placed.per_device_bytes,
        "gradients": weights * (2 if c.train.micro_batches > 1 else 1),
        "optimizer": 2 * weights,
        "activations": live_activations(acts),
    }
    memory["packing"] = round(PACKING * sum(memory.values()))
    memory["total"] = sum(memory.values())
    xla = None
    if compile:
        try:
            devices = tpu_topology.devices(topo.tpu_slice) if topo.tpu_slice else None
        except RuntimeError as e:
            raise PlanError(str(e)) from None
        xla = compiled(c, mesh_config or c.mesh, global_batch=global_batch, seq_len=seq_len, devices=devices)
    compilable = topo.tpu_slice is not None or topology_name == LOCAL
    if xla:
        fits = "refused" not in xla and xla["peak"] <= topo.hbm_bytes
    else:
        fits = None if compilable else memory["total"] <= topo.hbm_bytes
    step = family.step_flops(c, model, trainable, batch=global_batch)(seq_len)
    tiles = family.input_shapes(c, model.config, 1, 1).get("pixel_values")
    seconds = step["total"] / (topo.chips * topo.peak_flops * mfu) if topo.peak_flops else None
    return {
        "release": c.model.release or c.model.init,
        "stage": c.train.stage,
        "topology": {
            "name": topology_name,
            "chips": topo.chips,
            "hosts": -(-topo.chips // topo.chips_per_host),
            "hbm_bytes": topo.hbm_bytes,
            "peak_flops": topo.peak_flops,
        },
        "mesh": sizes,
        "batch": {
            "global": global_batch,
            "micro_batches": c.train.micro_batches,
            "per_device": local // c.train.micro_batches,
            "seq_len": seq_len,
            **({"tiles": tiles.shape[1]} if tiles is not None else {}),
        },
        "compute_dtype": c.model.compute_dtype,
        "remat": c.model.remat,
        "parameters": {
            "count": params.count_params(model),
            "trainable": params.count_params(model, trainable),
            "total_bytes": placed.total_bytes,
            "sharded_fraction": placed.sharded_fraction,
            "largest_replicated": list(placed.replicated[:3]),
        },
        "bytes_per_device": memory,
        "activation_bytes": acts,
        "fits": fits,
        "step_flops": step,
        "mfu": mfu,
        "seconds_per_step": seconds,
        "tokens_per_s": global_batch * seq_len / seconds if seconds else None,
        "compiled_bytes_per_device": xla,
    }


# ------------------------------------------------------------------------------------------------------ output
def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _fits_line(r: dict) -> str:
    hbm, xla = _gib(r["topology"]["hbm_bytes"]), r["compiled_bytes_per_device"]
    if xla and "refused" in xla:
        return f"fits: no (XLA's TPU compiler refused the step: {xla['refused']})"
    if xla:
        return f"fits: {'yes' if r['fits'] else 'no'} (compiled step {_gib(xla['peak'])} of {hbm} GiB)"
    if r["fits"] is None:
        return (
            f"fits: unknown until compiled (estimate {_gib(r['bytes_per_device']['total'])} of {hbm} GiB, "
            "without transients): add --compile"
        )
    return f"fits: {'yes' if r['fits'] else 'no'} ({_gib(r['bytes_per_device']['total'])} of {hbm} GiB)"


def too_big(r: dict) -> str:
    """Why a compiled plan does not fit, and what to change."""
    xla, t = r["compiled_bytes_per_device"], r["topology"]
    need = (
        f"{_gib(xla['temporaries'])} GiB of temporaries alone"
        if "refused" in xla and xla["temporaries"]
        else "more than it has"
        if "refused" in xla
        else f"{_gib(xla['peak'])} GiB"
    )
    return (
        f"the compiled step needs {need} per chip; {t['name']} has {_gib(t['hbm_bytes'])} GiB: raise "
        "train.micro_batches, set model.remat full, shard further (--mesh fsdp=..., a larger slice) or lower "
        "the batch"
    )


def render(r: dict) -> str:
    t, b, m, p = r["topology"], r["batch"], r["bytes_per_device"], r["parameters"]
    acts = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in r["activation_bytes"].items())
    step = ", ".join(f"{k.replace('_', ' ')} {v:.3e}" for k, v in r["step_flops"].items() if k != "total")
    lines = [
        f"{r['release']} {r['stage']} on {t['name']}: {t['chips']} chips on {t['hosts']} host(s), "
        f"{_gib(t['hbm_bytes'])} GiB each",
        "mesh: " + " ".join(f"{a}={n}" for a, n in r["mesh"].items()),
        f"batch: global {b['global']} in {b['micro_batches']} micro-batch(es), {b['per_device']} per device each; "
        f"seq_len {b['seq_len']}; compute {r['compute_dtype']}, remat {r['remat']}",
        f"parameters: {p['count']:,}, {p['trainable']:,} trainable",
        "",
        f"{'per device':22s}{'GiB':>8s}",
        *(f"  {k:20s}{_gib(m[k]):>8s}" for k in ("parameters", "gradients", "optimizer")),
        f"  {'activations (est.)':20s}{_gib(m['activations']):>8s}  ({acts}; the backward's two working sets "
        "come one after the other: the larger counts)",
        f"  {'packing (est.)':20s}{_gib(m['packing']):>8s}  (XLA's gaps between buffers: {PACKING:.0%}, measured "
        "on TPU)",
        f"  {'total':20s}{_gib(m['total']):>8s}",
        _fits_line(r),
        f"parameter bytes sharded: {p['sharded_fraction']:.2%}; largest replicated: "
        + (", ".join(p["largest_replicated"]) or "none"),
        f"step FLOPs: {r['step_flops']['total']:.3e} ({step})",
    ]
    if r["compiled_bytes_per_device"] and "refused" not in r["compiled_bytes_per_device"]:
        lines.append(
            "compiled step (XLA), per device: "
            + ", ".join(f"{k} {_gib(v)}" for k, v in r["compiled_bytes_per_device"].items())
            + " GiB"
        )
    if r["seconds_per_step"] is None:
        lines.append(f"time per step: unknown (no peak FLOP/s known for {t['name']})")
    else:
        lines.append(f"at MFU {r['mfu']:.0%}: {r['seconds_per_step']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ serving
@dataclass(frozen=True)
class Serving:
    """What ``mgjax.serve`` is asked to hold: ``slots`` rows (``--max-batch``) for prompts of up to
    ``max_prompt_tokens`` and answers of up to ``max_tokens_limit``."""

    slots: int
    max_prompt_tokens: int
    max_tokens_limit: int

    @property
    def prompt(self) -> int:
        """The longest prompt as the engine prefills it: left-padded to a multiple of its bucket."""
        return engine.padded(self.max_prompt_tokens)

    @property
    def context(self) -> int:
        """The positions of each slot's cache at its longest: the engine grows it to the next power of two of what
        a request needs (the padded prompt and its answer budget), from ``engine.MIN_LENGTH`` up."""
        return engine.cache_length(self.prompt + self.max_tokens_limit)


def custom_topology(chips: int, hbm_gib: float) -> Topology:
    """``chips`` of ``hbm_gib`` GiB each, planned as GPUs on one host."""
    return Topology(chips, int(hbm_gib * GiB), None, chips, "gpu")


def _abstract(config) -> nnx.Module:
    return nnx.eval_shape(lambda: model_class(config.model_type)(config, rngs=nnx.Rngs(0)))


@functools.cache
def _release_model(name: str, dtype: str) -> nnx.Module:
    """A release's model as shapes (built once: tracing MGM-34B's initialisers takes a second)."""
    over = {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(dtype)}
    if name in mgm_releases.NAMES:
        return _abstract(mgm_releases.config(name, **over))
    return _abstract(internvl_releases.shapes_config(name, image_token_id=0, **over))


def served_model(model: str, dtype: str = "bfloat16", scheme: str | None = None) -> tuple[nnx.Module, str | None]:
    """The model ``mgjax.serve --model`` would hold, as shapes, and its quantization scheme (None: float).
    ``model``: an MGM or InternVL2 release name, a checkpoint directory or its ``config.json``; the checkpoint's own
    ``quantization_config`` holds unless ``scheme`` names another."""
    dt = jnp.dtype(dtype)
    over = {"dtype": dt, "param_dtype": dt}
    held = None
    if model in mgm_releases.NAMES or model in internvl_releases.NAMES:
        abstract = nnx.clone(_release_model(model, dt.name))  # quantizing changes it in place
    else:
        path = Path(model)
        file = path if path.name == "config.json" or path.is_file() else path / "config.json"
        if not file.is_file():
            raise PlanError(
                f"--model {model!r} is neither a release ({', '.join(mgm_releases.NAMES + internvl_releases.NAMES)}) "
                "nor a checkpoint directory or config.json"
            )
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{file}: not valid JSON ({e})") from None
        config = model_class(d.get("model_type")).config_class.from_hf(d, **over)
        held = quant.from_config(d.get("quantization_config"), str(file))
        abstract = _abstract(config)
    if held is not None and scheme is not None and held[0].name != scheme:
        raise PlanError(f"--quant {scheme}: --model {model} is already quantized ({held[0].name})")
    if held is not None:
        quant.quantize(abstract, *held)
    elif scheme is not None:
        quant.quantize(abstract, scheme)
    held = quant.scheme_of(abstract)
    return abstract, None if held is None else held.name


def weight_bytes(model: nnx.Module, sizes: dict[str, int]) -> dict[str, int]:
    """Per-device bytes of ``model``'s parameters as ``mesh.spec`` places them on a mesh of axis sizes ``sizes``
    (abstract or real, every device holds the same share), by kind: the quantized layers' ``integers`` and
    ``scales``, and the ``float`` rest."""
    out = {"integers": 0, "scales": 0, "float": 0}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        kind = "integers" if var.dtype in (jnp.int8, jnp.uint8) else "scales" if path[-1] == "weight_scale" else "float"
        out[kind] += _share(var, var.size * var.dtype.itemsize, sizes)
    return out


def _share(var: nnx.Variable, amount: int, sizes: dict[str, int]) -> int:
    """One device's part of ``amount`` (bytes or values of ``var``) as ``mesh.spec`` splits ``var``."""
    axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return amount // mesh.shards(mesh.spec(axes, var.shape, sizes), sizes)


def _llm(model: nnx.Module):
    return getattr(model.config, "llm", model.config)


def kv_slot_bytes(llm, context: int, tensor: int) -> int:
    """Per-device bytes of one slot's KV cache (``KVCache.init``: every layer's k and v, [context, kv_heads,
    head_dim], in the compute dtype), the kv heads split over ``tensor`` where it divides them."""
    heads = _kv_heads_per_device(llm, tensor)
    return 2 * llm.num_hidden_layers * context * heads * llm.head_dim * jnp.dtype(llm.dtype).itemsize


def _kv_heads_per_device(llm, tensor: int) -> int:
    kv = llm.num_key_value_heads
    return kv // tensor if kv % tensor == 0 else kv


def _dequantized_layer(model: nnx.Module, sizes: dict[str, int], layers: int) -> int:
    """Per-device bytes of one layer's quantized weights dequantized to the compute dtype (the mean layer's)."""
    values = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var.dtype in (jnp.int8, jnp.uint8):
            values += _share(var, var.size * (2 if var.dtype == jnp.uint8 else 1), sizes)  # int4: two values a byte
    return values // layers * jnp.dtype(_llm(model).dtype).itemsize


def working_set(llm, s: Serving, *, tensor: int, platform: str, dequantized: int = 0) -> dict[str, int]:
    """Per-device bytes (an estimate, see the module docstring) beyond the weights and the slots' cache of each of
    the engine's three programs that can peak: the prefill of one longest prompt alone (``prefill``, with its
    parts), the growth of the slots' cache to its whole length (``grow``) and one decoding step of every slot
    (``decode``); ``working``, the largest. ``dequantized``: what the quantized weights of the layers in flight
    take in the compute dtype."""
    t = _tensor_shard(llm, tensor)
    c = jnp.dtype(llm.dtype).itemsize
    h, kv, d, width = t.num_attention_heads, t.num_key_value_heads, llm.head_dim, llm.hidden_size

    def phases(n: int, keys: int) -> dict[str, int]:  # n: rows x tokens, each attending to ``keys`` positions
        if llm.num_local_experts and platform != "tpu":  # dense: every expert on every token, float32 outputs
            mlp = n * llm.num_local_experts * (3 * t.intermediate_size * c + width * (c + F32))
        elif llm.num_local_experts:  # megablox: each token's top-k experts
            mlp = n * llm.num_experts_per_tok * (3 * t.intermediate_size + width) * c
        else:
            mlp = n * 3 * t.intermediate_size * c
        return {
            # the XLA reference's float32 logits and exponentials, the probabilities in the compute dtype, the
            # boolean mask; q, k, v and the output
            "attention": n * (keys * (h * (2 * F32 + c) + 1) + 2 * (h + kv) * d * c),
            "mlp": mlp,
            # every position's logits (and their float32 copy), before the last one is taken
            "logits": n * t.vocab_size * (c + (F32 if c < F32 else 0)),
            "stream": 2 * n * width * c,  # the residual stream and its norm
            "dequantized": dequantized,
        }

    def total(p: dict[str, int]) -> int:
        return p["stream"] + p["dequantized"] + max(p["attention"], p["mlp"], p["logits"])

    prefill = phases(s.prompt, s.prompt)  # a prompt alone, into a cache of its own length: its row
    row = kv_slot_bytes(llm, s.prompt, tensor)
    # padding the cache to a longer one holds both: the last growth, from half the length (none at the least)
    grow = s.slots * kv_slot_bytes(llm, s.context // 2, tensor) + row if s.context > engine.MIN_LENGTH else 0
    out = {
        "prefill": total(prefill) + row,
        "grow": grow,
        "decode": total(phases(s.slots, s.context)),
        **{f"prefill_{k}": v for k, v in prefill.items()},
        "prefill_row": row,
    }
    return {"working": max(out["prefill"], out["grow"], out["decode"]), **out}


def serve_report(
    model: str,
    topology_name: str | None = None,
    mesh_text: str = "",
    *,
    chips: int | None = None,
    hbm_gib: float | None = None,
    dtype: str = "bfloat16",
    scheme: str | None = None,
    serving: Serving = Serving(serve.MAX_BATCH, serve.MAX_PROMPT_TOKENS, serve.MAX_TOKENS_LIMIT),
) -> dict:
    """The per-chip memory of ``model`` served as ``mgjax.serve --mesh MESH --quant SCHEME --dtype DTYPE`` would hold
    it on a topology (a name, or ``chips`` of ``hbm_gib`` GiB), as a JSON-able dict (bytes per device); the mesh is
    checked against the chips before anything is built."""
    if (topology_name is None) == (chips is None or hbm_gib is None):
        raise PlanError("name the chips: --topology NAME, or --chips N with --hbm-gib X")
    topo = topology(topology_name) if topology_name is not None else custom_topology(chips, hbm_gib)
    name = topology_name or f"{chips} x {hbm_gib:g} GiB"
    mesh_config = parse_mesh(mesh_text, mesh.MeshConfig())  # fsdp takes the chips the others leave, as serve's
    try:
        sizes = mesh_config.sizes(topo.chips)
    except ValueError as e:
        raise PlanError(f"{name} has {topo.chips} chips: {e}") from None
    for key, value in dataclasses.asdict(serving).items():
        if value < 1:
            raise PlanError(f"{key} must be positive, not {value}")
    if dtype not in ("float32", "bfloat16"):
        raise PlanError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
    if scheme is not None and scheme not in quant.SCHEMES:
        raise PlanError(f"--quant must be one of {sorted(quant.SCHEMES)}, not {scheme!r}")
    try:
        abstract, held = served_model(model, dtype, scheme)
    except PlanError:
        raise
    except (ValueError, KeyError) as e:  # unknown model types, configs the model classes refuse, quantization
        raise PlanError(f"--model {model}: {e}") from None
    llm, tensor = _llm(abstract), sizes["tensor"]
    weights = weight_bytes(abstract, sizes)
    per_slot = kv_slot_bytes(llm, serving.context, tensor)
    # two layers' worth: XLA:CPU's compiled prefill holds 1.8 (the next layer's dequantized ahead of its turn)
    dequantized = 2 * _dequantized_layer(abstract, sizes, llm.num_hidden_layers) if held else 0

    def working(slots: int) -> dict[str, int]:
        return working_set(
            llm,
            dataclasses.replace(serving, slots=slots),
            tensor=tensor,
            platform=topo.platform,
            dequantized=dequantized,
        )

    def total(slots: int) -> int:
        return sum(weights.values()) + slots * per_slot + working(slots)["working"]

    work = working(serving.slots)
    memory = {"weights": sum(weights.values()), "kv_cache": serving.slots * per_slot, "working": work["working"]}
    memory["total"] = sum(memory.values())
    lo, hi = 0, 1  # the most slots that fit: total(lo) fits (or lo is 0), total(hi) does not
    while total(hi) <= topo.hbm_bytes:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= topo.hbm_bytes else (lo, mid)
    return {
        "model": model,
        "model_type": abstract.config.model_type,
        "dtype": dtype,
        "quant": held,
        "topology": {"name": name, "chips": topo.chips, "hbm_bytes": topo.hbm_bytes, "platform": topo.platform},
        "mesh": sizes,
        "serving": {**dataclasses.asdict(serving), "prompt": serving.prompt, "context": serving.context},
        "weights_all_chips": mesh.placement(abstract, sizes).total_bytes,
        "bytes_per_device": memory,
        "weight_bytes": weights,
        "kv_cache": {
            "per_slot": per_slot,
            "layers": llm.num_hidden_layers,
            "kv_heads": llm.num_key_value_heads,
            "kv_heads_per_device": _kv_heads_per_device(llm, tensor),
            "head_dim": llm.head_dim,
        },
        "working_bytes": work,
        "max_position_embeddings": llm.max_position_embeddings,
        "fits": memory["total"] <= topo.hbm_bytes,
        "max_slots": lo,
    }


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def render_serve(r: dict) -> str:
    t, s, m, w, kv, work = (
        r["topology"],
        r["serving"],
        r["bytes_per_device"],
        r["weight_bytes"],
        r["kv_cache"],
        r["working_bytes"],
    )
    hbm, scheme, dtype = _gib(t["hbm_bytes"]), r["quant"], r["dtype"]
    quantized = f"{scheme} integers {_size(w['integers'])}, float32 scales {_size(w['scales'])}, " if scheme else ""
    heads = "all" if kv["kv_heads_per_device"] == kv["kv_heads"] else f"{kv['kv_heads_per_device']} of"
    names = {
        "attention": "attention",
        "mlp": "MLP",
        "logits": "logits",
        "stream": "residual stream",
        "dequantized": "2 layers dequantized",
        "row": "its cache",
    }
    prefill = ", ".join(f"{label} {_size(work[f'prefill_{k}'])}" for k, label in names.items() if work[f"prefill_{k}"])
    alone = m["weights"] + work["prefill"]
    lines = [
        f"{r['model']} served on {t['name']}: {t['chips']} chip(s) of {hbm} GiB; mesh "
        + " ".join(f"{a}={n}" for a, n in r["mesh"].items()),
        f"weights {f'{scheme} (the LLM linear layers; the rest {dtype})' if scheme else dtype}, compute and KV cache "
        f"{dtype}; {_size(r['weights_all_chips'])} of weights on all chips together",
        f"{s['slots']} slot(s) of {s['context']} positions (a prompt of {s['max_prompt_tokens']} padded to "
        f"{s['prompt']} + an answer of {s['max_tokens_limit']}, the cache grown to a power of two)",
        "",
        f"{'per chip':22s}{'GiB':>8s}",
        f"  {'weights':20s}{_gib(m['weights']):>8s}  {quantized}{dtype} rest {_size(w['float'])}",
        f"  {'KV cache':20s}{_gib(m['kv_cache']):>8s}  {s['slots']} x {_size(kv['per_slot'])} ({kv['layers']} layers x "
        f"k, v x {s['context']} positions x {heads} {kv['kv_heads']} kv heads x {kv['head_dim']} x "
        f"{jnp.dtype(dtype).itemsize} bytes)",
        f"  {'working (est.)':20s}{_gib(m['working']):>8s}  the largest of: a prompt's prefill "
        f"{_size(work['prefill'])} "
        f"({prefill}; of attention, MLP and logits the largest counts), growing the cache {_size(work['grow'])}, "
        f"a decoding step {_size(work['decode'])}",
        f"  {'total':20s}{_gib(m['total']):>8s}",
        f"fits: {'yes' if r['fits'] else 'no'} ({_gib(m['total'])} of {hbm} GiB)",
        f"most slots of {s['context']} positions that fit: {r['max_slots']}"
        + ("" if r["max_slots"] else f" (the weights and a prompt's prefill alone need {_gib(alone)} GiB)"),
    ]
    if t["platform"] == "gpu" and r["fits"] and m["total"] > 0.75 * t["hbm_bytes"]:
        fraction = min(math.ceil(100 * m["total"] / t["hbm_bytes"]) / 100, 0.99)
        lines.append(
            "note: JAX's GPU allocator takes 75% of the memory unless told more: "
            f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.2f}"
        )
    if s["context"] > r["max_position_embeddings"]:
        lines.append(
            f"note: a slot of {s['context']} positions is more than the model's {r['max_position_embeddings']} "
            "(max_position_embeddings), which no request can pass: lower --max-prompt-tokens or --max-tokens-limit"
        )
    return "\n".join(lines)


TRAIN_FLAGS = ("config", "set", "batch", "seq_len", "mfu", "compile")
SERVE_FLAGS = (
    "model",
    "dtype",
    "quant",
    "chips",
    "hbm_gib",
    "max_batch",
    "max_prompt_tokens",
    "max_tokens_limit",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.plan",
        description=__doc__.split("\n\n")[0]
        + "\n\nWith --serve: the per-chip memory of a model served by mgjax.serve (weights, KV cache, working set).",
        epilog="topologies: " + ", ".join([*TOPOLOGIES, TPU_SLICES, LOCAL]),
        formatter_class=HelpFormatter,
    )
    ap.add_argument(
        "--topology",
        help=f"the machines the run would use: one of the topologies below, {LOCAL} for this process's devices "
        "(with --serve, or --chips and --hbm-gib)",
    )
    ap.add_argument(
        "--mesh",
        default="",
        metavar="AXIS=SIZE,...",
        help="mesh axis sizes that replace the config's (-1: the devices left over; default: the config's mesh, "
        "whose own default is fsdp=-1; with --serve, as mgjax.serve's --mesh: fsdp takes the chips the others "
        "leave); its product must be the chip count",
    )
    ap.add_argument("--json", action="store_true", help="print the plan as JSON rather than as text")
    train = ap.add_argument_group("a training run")
    train.add_argument(
        "--config", help="a YAML run config, as mgjax.train reads it (default: none, the run config's defaults)"
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key by its dotted name (e.g. train.global_batch=256); repeatable",
    )
    train.add_argument("--batch", type=integer(1), help="global batch, in samples (default: train.global_batch)")
    train.add_argument("--seq-len", type=integer(1), help="positions per sample (default: data.max_length)")
    train.add_argument(
        "--mfu", type=number(0, 1), default=0.4, help="assumed model FLOPs utilisation (0 to 1) for the step time"
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help=f"compile the step (for a TPU slice, deviceless, with libtpu; or for --topology {LOCAL}) and "
        "judge the fit by XLA's memory analysis; exit 2 when it does not fit",
    )
    served = ap.add_argument_group("a served model (--serve; the other flags as mgjax.serve takes them)")
    served.add_argument("--serve", action="store_true", help="plan a served model rather than a training run")
    served.add_argument(
        "--model",
        help="an MGM or InternVL2 release (MGM-34B, MGM-8x7B-HD, InternVL2-2B, ...), or a checkpoint directory or "
        "its config.json",
    )
    served.add_argument("--chips", type=integer(1), help="how many chips, instead of --topology (planned as GPUs)")
    served.add_argument("--hbm-gib", type=number(0), help="the memory of each of --chips, in GiB (an 80 GB H100: 80)")
    served.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="parameters, compute and KV cache"
    )
    served.add_argument(
        "--quant",
        choices=sorted(quant.SCHEMES),
        help="weight-only quantization of the LLM's linear layers (unset: a checkpoint's own, else none)",
    )
    served.add_argument(
        "--max-batch", type=integer(1), default=serve.MAX_BATCH, help="the slots: rows decoded together"
    )
    served.add_argument(
        "--max-prompt-tokens",
        type=integer(1),
        default=serve.MAX_PROMPT_TOKENS,
        help=f"the longest prompt (padded to a multiple of {engine.BUCKET})",
    )
    served.add_argument(
        "--max-tokens-limit",
        type=integer(1),
        default=serve.MAX_TOKENS_LIMIT,
        help="the largest answer budget; a slot's cache holds the padded prompt and this, to a power of two",
    )
    args = ap.parse_args(argv)
    mine, theirs = (SERVE_FLAGS, TRAIN_FLAGS) if args.serve else (TRAIN_FLAGS, SERVE_FLAGS)
    for dest in theirs:
        if getattr(args, dest) != ap.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            ap.error(f"{flag} is for {'training' if args.serve else 'serving (--serve)'} plans only")
    try:
        if args.serve:
            if args.model is None:
                ap.error("--serve needs --model")
            r = serve_report(
                args.model,
                args.topology,
                args.mesh,
                chips=args.chips,
                hbm_gib=args.hbm_gib,
                dtype=args.dtype,
                scheme=args.quant,
                serving=Serving(args.max_batch, args.max_prompt_tokens, args.max_tokens_limit),
            )
            print(json.dumps(r, indent=2) if args.json else render_serve(r))
            return 0
        if args.topology is None:
            ap.error("--topology is required")
        c = cfg.load(RunConfig, args.config, args.set)
        r = report(
            c,
            args.topology,
            parse_mesh(args.mesh, c.mesh),
            mfu=args.mfu,
            batch=args.batch,
            seq_len=args.seq_len,
            compile=args.compile,
        )
    except ValueError as e:  # config, topology, mesh, release and checkpoint errors alike
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else render(r))
    if r["compiled_bytes_per_device"] and not r["fits"]:
        print(f"error: {too_big(r)}", file=sys.stderr)
        return 2
    return 0
