"""Training configuration: optimizer, step, mesh, checkpoints and logging.

Every field is read from YAML by `jaxllava.config.load_config`, which type-checks
it against the annotations here; cross-field rules live in `__post_init__` and
raise `ConfigError` (the loader adds the file and dotted key to the message).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from jaxllava.errors import ConfigError
from jaxllava.schema import at_least, path_field, positive, require


@dataclasses.dataclass(frozen=True)
class PartConfig:
    """Optimizer settings of one model part (a top-level attribute of the model)."""

    lr: Optional[float] = None  # peak learning rate; None: optim.lr
    train: bool = True  # False: frozen, zero updates and no optimizer state

    def __post_init__(self):
        if self.lr is not None:
            require(math.isfinite(self.lr) and self.lr >= 0, "lr", f"must be a finite number >= 0 or null, "
                                                                    f"got {self.lr!r}")


@dataclasses.dataclass(frozen=True)
class FrozenPartConfig(PartConfig):
    """A part that stays frozen unless `train: true` is given. Its own class because the
    loader builds a section from the keys given plus the class defaults: setting only
    `optim.parts.vision.lr` must not start training the tower."""

    train: bool = False  # frozen by default; true: trained (updates and optimizer state) like the others


@dataclasses.dataclass(frozen=True)
class PartsConfig:
    """One entry per model part; the field names are the parameter tree's top-level keys."""

    lm: PartConfig = dataclasses.field(default_factory=PartConfig)
    projector: PartConfig = dataclasses.field(default_factory=PartConfig)
    resampler: PartConfig = dataclasses.field(default_factory=PartConfig)
    # The reference kept its DINOv2 tower frozen.
    vision: FrozenPartConfig = dataclasses.field(default_factory=FrozenPartConfig)
    # Stage-2 LAPE tables (model.lape); the reference trained them with its LM (mm_language_model).
    lape: PartConfig = dataclasses.field(default_factory=PartConfig)


PARTS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PartsConfig))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then decay, per-part learning rates and trainable parts.

    Defaults are the reference's BabyLM run: AdamW β=(0.9, 0.999), ε=1e-8, clip 1.0,
    lr 5e-4, no weight decay, 10% warmup, cosine to zero.
    """

    lr: float = 5e-4  # peak learning rate of every part whose parts.<part>.lr is null
    parts: PartsConfig = dataclasses.field(default_factory=PartsConfig)
    # The reference's stage 1 froze a randomly initialised lm_head (README pitfall 5);
    # available for reproducing it, off by default.
    freeze_lm_head: bool = False
    b1: float = 0.9  # AdamW decay rate of the first moment (β1)
    b2: float = 0.999  # AdamW decay rate of the second moment (β2)
    eps: float = 1e-8  # AdamW ε, added to the root of the second moment
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to norm scales or biases
    grad_clip: Optional[float] = 1.0  # max global gradient norm; None: no clipping
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup: cosine or linear decay, or constant
    # Warmup length: `warmup_steps` if set, else ceil(warmup_ratio · total steps)
    # (HF Trainer's rule, which the reference used with ratio 0.1).
    warmup_steps: Optional[int] = None
    warmup_ratio: float = 0.1  # used when warmup_steps is null
    min_lr_ratio: float = 0.0  # decay ends at min_lr_ratio · peak

    def __post_init__(self):
        require(math.isfinite(self.lr) and self.lr >= 0, "lr", f"must be a finite number >= 0, got {self.lr!r}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, name, f"must lie in [0, 1), got {value!r}")
        positive(self, "eps")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                f"must be a finite number >= 0, got {self.weight_decay!r}")
        at_least(self, 0, "warmup_steps", null_ok=True)
        for name in ("warmup_ratio", "min_lr_ratio"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, name, f"must lie in [0, 1], got {value!r}")
        if self.grad_clip is not None:
            require(math.isfinite(self.grad_clip) and self.grad_clip > 0, "grad_clip",
                    f"must be a finite number > 0 or null, got {self.grad_clip!r}")

    def part(self, part: str) -> PartConfig:
        if part not in PARTS:
            raise ValueError(f"unknown model part {part!r}; the parts are {', '.join(PARTS)}")
        return getattr(self.parts, part)

    def part_lr(self, part: str) -> float:
        """Peak learning rate of a model part."""
        lr = self.part(part).lr
        return self.lr if lr is None else lr

    def part_trainable(self, part: str) -> bool:
        return self.part(part).train

    def with_part(self, part: str, **changes) -> "OptimConfig":
        """A copy with one part's settings changed: `cfg.with_part("vision", train=True)`."""
        parts = dataclasses.replace(self.parts, **{part: dataclasses.replace(self.part(part), **changes)})
        return dataclasses.replace(self, parts=parts)

    def trainability(self) -> "OptimConfig":
        """This config reduced to what gradients depend on (which parts train, freeze_lm_head),
        every other field at its default. Hashable: two configs with equal trainability()
        differentiate the same parameters, so compiled gradient code can be shared."""
        parts = {p: dataclasses.replace(self.part(p), lr=None) for p in PARTS}
        return OptimConfig(parts=PartsConfig(**parts), freeze_lm_head=self.freeze_lm_head)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # parameter init and the step RNG (the data order follows data.seed)
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
    # `launch.py convert import-hf`): optimizer and step start fresh. Ignored when the
    # workdir already has a checkpoint (the run then resumes from it).
    init_from: Optional[str] = path_field(None)
    # After init_from, words seen (the budget and milestones) "restart" at 0 or "continue"
    # from the init_from checkpoint's count (a second stage of one BabyLM run).
    init_from_words: Literal["restart", "continue"] = "restart"
    # init_from refuses a data tokenizer whose vocabulary differs from the one the
    # checkpoint was trained with (ids would mean other words); true accepts it.
    init_from_other_tokenizer: bool = False

    def __post_init__(self):
        at_least(self, 1, "steps", "word_budget", null_ok=True)
        at_least(self, 1, "grad_accum", "log_every")
        # An empty workdir would scatter checkpoints and metrics over the current directory.
        require(bool(self.workdir), "workdir", "must name a directory, got an empty string")
        require(self.init_from is None or bool(self.init_from), "init_from",
                "must name a checkpoint or be null, got an empty string")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); -1 in one axis takes the remaining devices."""

    data: int = -1  # data-parallel ways: rows are split, parameters replicated
    fsdp: int = 1  # fully sharded data-parallel ways: rows split, parameters and optimizer state sharded
    tensor: int = 1  # tensor-parallel ways: attention heads, MLP width and vocabulary split
    # Multi-host: call jax.distributed.initialize. None: only when a coordinator is named
    # here or in JAX_COORDINATOR_ADDRESS. On SLURM or a TPU pod set true: JAX then finds
    # the coordinator and the process count itself (docs/multihost.md).
    distributed: Optional[bool] = None
    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None  # None: detected by jax.distributed (SLURM, TPU pod, environment)
    process_id: Optional[int] = None  # this process's index, 0-based; None: detected likewise

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(f"mesh axes must be >= 1 with at most one -1, got data={self.data}, "
                              f"fsdp={self.fsdp}, tensor={self.tensor}")
        at_least(self, 1, "num_processes", null_ok=True)
        at_least(self, 0, "process_id", null_ok=True)
        if self.process_id is not None and self.num_processes is not None:
            require(self.process_id < self.num_processes, "process_id",
                    f"must be below num_processes ({self.num_processes}), got {self.process_id}")
        require(self.coordinator_address is None or bool(self.coordinator_address), "coordinator_address",
                "must be host:port or null, got an empty string")


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
        at_least(self, 0, "every_steps")
        at_least(self, 1, "keep_last", "save_concurrent_gb")
        if self.milestone_words is not None:
            require(all(w >= 1 for w in self.milestone_words), "milestone_words",
                    f"every word count must be >= 1, got {list(self.milestone_words)}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True  # event files under <workdir>/tensorboard
    progress: bool = True  # a progress line with ETA, only when stdout is a terminal
    # Trace optimizer steps [first, last] (counted from 1) with jax.profiler into
    # <workdir>/profile/ for TensorBoard's profile plugin or Perfetto; None: no trace.
    profile_steps: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if self.profile_steps is not None:
            require(1 <= self.profile_steps[0] <= self.profile_steps[1], "profile_steps",
                    f"must be [first, last] with 1 <= first <= last, got {list(self.profile_steps)}")
