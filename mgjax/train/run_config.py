"""A training run's config: the sections of ``python -m mgjax.train``'s YAML files and ``--set`` keys
(``mgjax.config`` reads them; ``--help`` lists every field with its help)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mgjax.models import mgm_towers
from mgjax.parallel import distributed
from mgjax.parallel import mesh as mesh_lib
from mgjax.train import optim


@dataclass(frozen=True)
class ModelSection:
    family: str = field(
        default="mgm",
        metadata={"help": "mgm | internvl: MGM's stages, or Mini-InternVL's domain adaptation (mgjax.train.families)"},
    )
    init: str = field(
        default="demo",
        metadata={
            "help": "'demo' (a tiny random model of the family), 'pretrained' (a converted checkpoint: path) or "
            "'parts' (MGM stage 1: llm + vision + vision_aux checkpoints)"
        },
    )
    release: str = field(
        default="",
        metadata={
            "help": "an MGM release (MGM-7B, MGM-7B-HD, ...; mgjax.recipes.mgm_releases): its architecture, and its "
            "MGM fields (image_size_aux, image_grid, image_global) over the loaded checkpoints' configs; or an "
            "InternVL2 release (InternVL2-1B, ...; mgjax.recipes.internvl_releases), the architecture "
            "mgjax.train.plan plans"
        },
    )
    path: str = field(default="", metadata={"help": "pretrained: checkpoint directory (with tokenizer files)"})
    llm: str = field(default="", metadata={"help": "parts: HF LLM checkpoint directory (with tokenizer files)"})
    vision: str = field(default="", metadata={"help": "parts: HF CLIP checkpoint directory"})
    vision_aux: str = field(default="", metadata={"help": "parts: ConvNeXt checkpoint (HF, timm or open_clip keys)"})
    towers_root: str = field(default="", metadata={"help": "pretrained " + mgm_towers.ROOT_HELP})
    towers: str = field(default="mgm", metadata={"help": "pretrained " + mgm_towers.SOURCE_HELP})
    mining: bool = field(default=True, metadata={"help": "false: the LR-only ablation (no HR tower, no mining)"})
    compute_dtype: str = field(
        default="float32",
        metadata={"help": "float32 | bfloat16: the compute dtype; parameters and optimizer state stay float32"},
    )
    remat: str = field(default="none", metadata={"help": "remat policy of the scanned layers (layers.REMAT_POLICIES)"})
    attention_impl: str = field(
        default="auto",
        metadata={
            "help": "auto | xla | splash | cudnn: the attention backend of every model (auto: splash on TPUs, cuDNN on "
            "GPUs, xla on CPUs; where one cannot serve a call, xla, with the reason printed)"
        },
    )
    mining_backend: str = field(
        default="auto",
        metadata={
            "help": "auto | xla | pallas: patch info mining's window attention (auto: the Pallas kernel on TPUs)"
        },
    )


@dataclass(frozen=True)
class DataSection:
    path: str = field(default="", metadata={"help": "LLaVA-format JSON/JSONL; empty with the demo: synthetic"})
    image_folder: str = ""
    meta: str = field(
        default="",
        metadata={
            "help": "InternVL: a meta file ({name: {root, annotation, repeat_time}}) of the domain data (not with path)"
        },
    )
    general_meta: str = field(default="", metadata={"help": "InternVL: a meta file of general data to mix in"})
    general_ratio: float = field(
        default=0.0,
        metadata={
            "min": 0,
            "help": "InternVL: general records per domain record (the paper's 1:4 is 0.25, its 1:1 is 1)",
        },
    )
    max_dynamic_patch: int = field(
        default=12,
        metadata={"min": 1, "help": "InternVL: most tiles per sample (a thumbnail added); several images share them"},
    )
    tile_slots: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "InternVL: tile slots per row of a batch (static shapes); 0: max_dynamic_patch + 1",
        },
    )
    pack_length: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "InternVL: > 0 packs consecutive samples into rows of this many tokens (needs train.steps)",
        },
    )
    pack_tiles: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "InternVL: tile slots of a packed row; 0: a sample's tiles for every max_length of the row",
        },
    )
    template: str = field(
        default="",
        metadata={
            "help": "conversation template (mgjax.data.templates); empty: the model's own (MGM demo: chatml_direct)"
        },
    )
    max_length: int = field(default=2048, metadata={"min": 1})
    pad_to_square: bool = field(default=True, metadata={"help": "stage 2 pads to square; stage 1 crops"})
    max_image_pixels: int = field(
        default=50_000_000,
        metadata={"min": 1, "help": "an image of more pixels is a bad sample, refused before it is decoded"},
    )
    allow_paths_outside_image_folder: bool = field(
        default=False,
        metadata={"help": "image paths may be absolute or lead out of image_folder (else: bad samples)"},
    )
    exif_transpose: bool = field(
        default=False,
        metadata={"help": "turn images upright by their EXIF orientation first (MGM and InternVL do not)"},
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "MGM's group_by_modality_length: global batches of similar length, image and text-only apart"
        },
    )
    length_buckets: int = field(
        default=1,
        metadata={
            "min": 1,
            "help": "> 1: pad each batch only to the shortest of this many lengths up to max_length that holds it",
        },
    )
    workers: int = field(default=0, metadata={"min": 0})
    max_bad_fraction: float = field(default=0.01, metadata={"min": 0, "max": 1})
    seed: int = 42


@dataclass(frozen=True)
class TrainSection:
    stage: str = field(
        default="stage2",
        metadata={"help": "what trains: MGM stage1 | stage2 | full (towers too); InternVL full | frozen_vit | lora"},
    )
    lora_rank: int = field(default=16, metadata={"min": 1, "help": "stage lora: the adapters' rank"})
    lora_alpha: float = field(default=32.0, metadata={"min": 0, "help": "stage lora: adapters scaled by alpha / rank"})
    loss_weighting: str = field(
        default="token",
        metadata={
            "help": "token | sample | square: each sample's target tokens weigh 1, 1/n or 1/sqrt(n) (InternVL's "
            "loss_reduction)"
        },
    )
    loss_chunk: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "positions per chunk of the LM head and loss (logits recomputed in the backward); 0: the largest "
            "power of two whose float32 logits stay under 256 MiB per device",
        },
    )
    freeze: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "regexes of parameter paths kept frozen within the stage's trainable set (the demo: the HR tower)"
        },
    )
    global_batch: int = field(default=128, metadata={"min": 1})
    micro_batches: int = field(default=1, metadata={"min": 1})
    epochs: int = field(default=1, metadata={"min": 1})
    steps: int = field(
        default=0, metadata={"min": 0, "help": "0: as many as the epochs give; more: the data is cycled"}
    )
    log_every: int = field(default=10, metadata={"min": 1})
    progress: bool = field(default=True, metadata={"help": "a progress bar on stderr"})
    peak_tflops: float = field(
        default=0.0,
        metadata={
            "min": 0,
            "help": "per-chip peak for MFU; 0: the known peak of the chip (none on CPUs: MFU is then not reported)",
        },
    )
    out_dir: str = field(default="runs/mgm", metadata={"help": "a folder, or a gs:// URI (records via local_dir)"})
    local_dir: str = field(
        default="",
        metadata={
            "help": "with a URI out_dir: the local mirror the run's records are written to before each copy up "
            "(empty: ~/.cache/mgjax/runs/<bucket>/<path>)"
        },
    )


@dataclass(frozen=True)
class CheckpointSection:
    every: int = field(default=1000, metadata={"min": 1})
    keep: int = field(default=1, metadata={"min": 1})


@dataclass(frozen=True)
class EvalSection:
    enabled: bool = field(default=True, metadata={"help": "false: no held-out evaluation after training"})
    path: str = field(
        default="",
        metadata={
            "help": "held-out records, scored per 'type' field (MGM: teacher-forced exact answers; InternVL: greedy "
            "answers, boxes by IoU); empty: none (the demos: their own held-out split)"
        },
    )
    image_folder: str = ""
    batch: int = field(default=64, metadata={"min": 1})
    at_start: bool = field(default=False, metadata={"help": "also evaluate before step 1 (the starting value)"})
    max_new_tokens: int = field(default=64, metadata={"min": 1, "help": "InternVL: the longest generated answer"})
    compare_lr_only: bool = field(
        default=False,
        metadata={
            "help": "also train the same budget with model.mining false (out_dir/lr_only) and print both evaluations"
        },
    )


@dataclass(frozen=True)
class MeshSection(mesh_lib.MeshConfig):
    """The (data, fsdp, tensor, expert) axis sizes over all processes' devices, and the checks before step 1."""

    min_sharded: float = field(
        default=0.98,
        metadata={
            "min": 0,
            "max": 1,
            "help": "with fsdp or expert > 1: refuse to start when a smaller fraction of parameter bytes is sharded",
        },
    )
    device_memory_gb: float = field(
        default=0.0,
        metadata={
            "min": 0,
            "help": "refuse to start when the compiled step needs more per device; 0: the device's own limit "
            "(none known on CPUs)",
        },
    )


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: optim.OptimConfig = field(default_factory=optim.OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    distributed: distributed.DistributedConfig = field(default_factory=distributed.DistributedConfig)
