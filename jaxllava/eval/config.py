"""Evaluation settings of a run (`eval:` in a config): which zero-shot tasks, when, and how."""
from __future__ import annotations

import dataclasses
import re
from typing import Literal, Optional

from jaxllava.errors import FieldError
from jaxllava.eval.pipeline_layout import TASK_SETS
from jaxllava.schema import at_least, path_field, require

TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")
TEXT_SLOT = "{text}"


def check_task_name(name: str) -> None:
    """Raise ValueError unless `name` is safe as one directory name under the workdir (and
    in metric names): letters, digits, '_', '.', '-', and no '..' that would climb out."""
    if not TASK_NAME.fullmatch(name) or ".." in name or name == ".":
        raise ValueError(f"a task name becomes a directory name under the workdir, so it may hold only "
                         f"letters, digits, '_', '.' and '-' (no '/', '\\' or '..'), got {name!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # Zero-shot tasks: name -> a directory or file of jsonl in the BabyLM pipeline's format:
    # BLiMP, supplement or EWoK (scored as text), or VQA or Winoground (scored with their images
    # and without vision), told apart by their fields. The name becomes a directory under the
    # workdir, so it must pass `check_task_name`.
    tasks: dict[str, str] = path_field(default_factory=dict)
    # Where an image task's images are: task name -> an image folder (files named by the
    # items' id fields), a features .npy (row i for item i) or a datasets `save_to_disk`
    # directory. Default: the folder `images/` beside the task's file (eval/multimodal.py).
    image_sources: dict[str, str] = path_field(default_factory=dict)
    # A BabyLM 2025 task set scored wherever `tasks` are (milestones, every_steps, the end), from
    # the folder `suite_root` (evaluation_data, or one with a babylm_tasks.json; eval/suite.py);
    # AoA is left to `launch.py eval --suite` on the finished run, which has every milestone.
    suite: Optional[Literal["babylm2025", "babylm2025_fast"]] = None
    suite_root: Optional[str] = path_field(None)  # the folder holding eval.suite's files
    every_steps: int = 0  # 0: never on a step schedule
    at_milestones: bool = True  # evaluate at each word milestone
    at_end: bool = True  # evaluate the final model of the run
    # Evaluate the freshly initialised model before the first step of a new run,
    # so the final accuracy is reported beside the untrained model's.
    at_start: bool = False
    # Literal text around each sentence, no image, ending with the sentence: e.g.
    # "<image>\n{text}" (the reference's `--image_template append_image_token`);
    # each is scored and reported beside bare text.
    image_templates: tuple[str, ...] = ()
    protocol: Literal["2025", "2024"] = "2025"  # which BabyLM pipeline's scoring to reproduce
    batch_size: int = 32  # candidate sentences per scoring batch (scores agree up to float noise)
    image_batch_size: int = 32  # images per vision-encoder batch (each image is encoded once)
    # Steps between held-out losses (data.validation_fraction); 0: only where minimal pairs
    # are evaluated and at the end of the run.
    validation_every_steps: int = 0

    def __post_init__(self):
        at_least(self, 0, "every_steps", "validation_every_steps")
        at_least(self, 1, "batch_size", "image_batch_size")
        require((self.suite is None) == (self.suite_root is None), "suite_root",
                "eval.suite and eval.suite_root go together: the task set and the folder holding its files")
        for name, path in self.tasks.items():
            try:
                check_task_name(name)
            except ValueError as e:
                raise FieldError("tasks", str(e)) from None
            require(bool(path), "tasks", f"task {name!r} must name a file or directory, got an empty string")
        suite_tasks = [spec.name for spec in TASK_SETS[self.suite]] if self.suite else []
        for name, path in self.image_sources.items():
            require(name in self.tasks or name in suite_tasks, "image_sources",
                    f"{name!r} is not one of eval.tasks {sorted(self.tasks)} or the suite's {suite_tasks}")
            require(bool(path), "image_sources", f"task {name!r}: an empty path")
        for i, template in enumerate(self.image_templates):
            # Scoring puts the template's literal prefix before each sentence.
            prefix = template[: -len(TEXT_SLOT)]
            require(template.endswith(TEXT_SLOT) and "{" not in prefix and "}" not in prefix,
                    f"image_templates.{i}", f"must be literal text followed by {TEXT_SLOT}, got {template!r}")
