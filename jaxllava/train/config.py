"""Training configuration: optimizer, step, mesh, checkpoints, evaluation and logging.

Every field is read from YAML by `jaxllava.config.load_config`, which type-checks
it against the annotations here; cross-field rules live in `__post_init__` and
raise `ConfigError` (the loader adds the file and dotted key to the message).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from jaxllava.errors import ConfigError

Part = Literal["lm", "projector", "resampler", "vision"]
PARTS: tuple[str, ...] = ("lm", "projector", "resampler", "vision")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then decay, per-part learning rates and trainable parts.

    Defaults are the reference's BabyLM run (REFERENCE.md §3.1): AdamW β=(0.9, 0.999),
    ε=1e-8, clip 1.0, lr 5e-4, no weight decay, 10% warmup, cosine to zero.
    """

    lr: float = 5e-4
    # Per-part peak learning rates; None means `lr`. Parts are the top-level
    # attributes of the model: lm, projector, resampler, vision.
    lm_lr: Optional[float] = None
    projector_lr: Optional[float] = None
    resampler_lr: Optional[float] = None
    vision_lr: Optional[float] = None
    # A frozen part gets zero updates and no optimizer state.
    train_lm: bool = True
    train_projector: bool = True
    train_resampler: bool = True
    train_vision: bool = False  # the reference kept DINOv2 frozen (§1.13)
    # The reference's stage 1 froze a randomly initialised lm_head (§7 pitfall 5);
    # available for reproducing it, off by default.
    freeze_lm_head: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to norm scales or biases
    grad_clip: Optional[float] = 1.0  # max global gradient norm; None: no clipping
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Warmup length: `warmup_steps` if set, else ceil(warmup_ratio · total steps)
    # (HF Trainer's rule, which the reference used with ratio 0.1).
    warmup_steps: Optional[int] = None
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # decay ends at min_lr_ratio · peak

    def __post_init__(self):
        if self.lr < 0 or any(v is not None and v < 0 for v in self.part_lrs_raw()):
            raise ConfigError("learning rates must be >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0 or null, got {self.grad_clip}")

    def part_lrs_raw(self) -> tuple[Optional[float], ...]:
        return (self.lm_lr, self.projector_lr, self.resampler_lr, self.vision_lr)

    def part_lr(self, part: str) -> float:
        """Peak learning rate of a model part."""
        value = getattr(self, f"{part}_lr")
        return self.lr if value is None else value

    def part_trainable(self, part: str) -> bool:
        return getattr(self, f"train_{part}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # parameter init, dropout-free model RNG, data order (with data.seed)
    # Optimizer steps. None: as many as the data's epochs give (and the word
    # budget allows); the LR schedule's horizon is this number either way.
    steps: Optional[int] = None
    # Microbatches per optimizer step. A microbatch is one TextBatch or ImageBatch
    # of `data.text_rows` / `data.image_rows` rows; the loss of a step is the mean
    # over all target tokens of its `grad_accum` microbatches.
    grad_accum: int = 1
    # BabyLM word budget: stop once this many words were trained on (at most one
    # optimizer step over). None: no budget (milestones are still recorded).
    word_budget: Optional[int] = None
    log_every: int = 10  # optimizer steps between metrics rows
    workdir: str = "runs/default"  # where the run lives (checkpoints, metrics, run.json)
    # Start a NEW run from the parameters of another checkpoint (e.g. one written by
    # `launch.py convert import-hf`): optimizer, step and words start fresh. Ignored
    # when the workdir already has a checkpoint (the run then resumes from it).
    init_from: Optional[str] = None

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1 or null, got {self.steps}")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.word_budget is not None and self.word_budget < 1:
            raise ConfigError(f"word_budget must be >= 1 or null, got {self.word_budget}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be >= 1, got {self.log_every}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); -1 in one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Multi-host: call jax.distributed.initialize. None: only when the environment
    # names a coordinator (JAX_COORDINATOR_ADDRESS) or a cluster JAX detects (SLURM, ...).
    distributed: Optional[bool] = None
    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(f"mesh axes must be >= 1 with at most one -1, got data={self.data}, "
                              f"fsdp={self.fsdp}, tensor={self.tensor}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000  # 0: only milestone, signal and final checkpoints
    keep_last: int = 3  # regular checkpoints kept; milestone checkpoints are kept forever
    async_save: bool = True  # write in a background thread while training goes on
    milestones: bool = True  # save at each word milestone
    # Word counts that are milestones; None: BabyLM's 1M..10M, 20M..100M, 200M..1000M.
    milestone_words: Optional[tuple[int, ...]] = None
    # Host memory (GB) a save may hold in flight at once (Orbax's save_concurrent_gb).
    # Lower it to save a large model with little spare memory (the converter uses 1).
    save_concurrent_gb: int = 96

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.milestone_words is not None and any(w < 1 for w in self.milestone_words):
            raise ConfigError(f"milestone_words must be positive, got {self.milestone_words}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # Minimal-pair tasks: name -> a directory or file of BLiMP-format jsonl.
    tasks: dict[str, str] = dataclasses.field(default_factory=dict)
    every_steps: int = 0  # 0: never on a step schedule
    at_milestones: bool = True  # evaluate at each word milestone
    at_end: bool = True  # evaluate the final model of the run
    # Evaluate the freshly initialised model before the first step of a new run,
    # so the final accuracy is reported beside the untrained model's.
    at_start: bool = False
    # Literal text before each sentence, no image, e.g. "<image>\n{text}" (the reference's
    # `--image_template append_image_token` through gen 19, REFERENCE.md §4.1, §7.28);
    # each is scored and reported beside bare text.
    image_templates: tuple[str, ...] = ()
    protocol: Literal["2025", "2024"] = "2025"
    batch_size: int = 32

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"every_steps must be >= 0, got {self.every_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True  # event files under <workdir>/tensorboard
    progress: bool = True  # a progress line with ETA, only when stdout is a terminal
    # Trace optimizer steps [first, last] (counted from 1) with jax.profiler into
    # <workdir>/profile/ for TensorBoard's profile plugin or Perfetto; None: no trace.
    profile_steps: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if self.profile_steps is not None and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise ConfigError(f"profile_steps must be [first, last] with 1 <= first <= last, "
                              f"got {list(self.profile_steps)}")
