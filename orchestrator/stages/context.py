"""What every stage receives from the worker loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.config import RunConfig
from orchestrator.stages.timing import Stopwatch


@dataclass
class StageContext:
    cfg: RunConfig
    model: torch.nn.Module  # the bare module, carried from stage to stage
    tokenizer: Any
    digit_token_ids: torch.Tensor
    dataset: Any  # BuiltDataset
    rank: int
    world_size: int
    device: torch.device
    stage_index: int
    global_step_offset: int  # steps done in earlier stages, so train/* metrics form one curve
    log: Callable[[dict[str, float], int], None]  # rank-0 metric logger (no-op elsewhere)
    # (engine, step_in_stage, metrics, reference policy or None): a checkpoint through Ray Train
    checkpoint: Callable[..., None]
    # vision.ImageOnlyProcessor when the model is a VLM AND the dataset has images; None keeps every
    # stage on its text path (no image work at all).
    processor: Any = None
    # Seconds per run phase (deepspeed_init, train, checkpoint, ...), summed over stages; rank 0 logs
    # them as time/<phase>_s at the end of the run.
    timings: dict[str, float] = field(default_factory=dict)
    # runtime.stopping.StopWatcher on rank 0 (a stop requested through storage), None elsewhere
    stop: Any = None

    @property
    def stopwatch(self) -> Stopwatch:
        return Stopwatch(self.timings)

    def log_due(self, done: int, total: int) -> bool:
        """Whether train metrics are logged after `done` of `total` steps of this stage (always at its end)."""
        every = log_interval(self.cfg.pipeline[self.stage_index], self.cfg.tracking.log_every, total)
        return done % every == 0 or done == total

    def checkpoint_due(self, done: int, total: int) -> bool:
        return done % self.cfg.checkpoint.every_steps == 0 or done == total

    def prompt_text(self, prompt: str) -> str:
        """The user turn: the prompt, after the image placeholders when rows carry images."""
        return prompt if self.processor is None else self.processor.prompt_text(prompt)

    def image_column(self, table) -> list[bytes] | None:
        """A split's encoded images (None on the text path); decoded per batch, never all at once."""
        return None if self.processor is None else table.column("image").to_pylist()

    def image_batch(self, images: list[bytes] | None, rows):
        """Pixel inputs for these row indices (None on the text path)."""
        if images is None:
            return None
        from orchestrator.modeling.vision import ImageBatch

        return ImageBatch.from_bytes(self.processor, [images[int(i)] for i in rows])


def log_interval(stage, tracking_every: int | None, total: int) -> int:
    """Steps between two logs of a stage of `total` steps: the stage's own log_every, else tracking.log_every,
    else max(1, total // 20), so every stage gets about 20 points whatever its length."""
    return stage.log_every or tracking_every or max(1, total // 20)


def start_engine(ctx: StageContext, stage, resume_dir: str | None):
    """The stage's DeepSpeed engine over ctx.model, restored from `resume_dir` when resuming."""
    from orchestrator.engine.deepspeed import build_engine

    with ctx.stopwatch("deepspeed_init"):
        engine = build_engine(ctx.model, stage, ctx.cfg)
    if resume_dir is not None:
        with ctx.stopwatch("checkpoint_load"):
            engine.load_checkpoint(resume_dir, tag="ckpt", load_module_strict=True)
    return engine
