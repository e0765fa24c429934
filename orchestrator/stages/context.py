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
    checkpoint: Callable[[Any, int, dict[str, float]], None]  # (engine, step_in_stage, metrics)
    extra: dict[str, Any] = field(default_factory=dict)
    # vision.ImageOnlyProcessor when the model is a VLM AND the dataset has images; None keeps every
    # stage on its text path (no image work at all).
    processor: Any = None
    # Seconds per run phase (deepspeed_init, train, checkpoint, ...), summed over stages; rank 0 logs
    # them as time/<phase>_s at the end of the run.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def stopwatch(self) -> Stopwatch:
        return Stopwatch(self.timings)

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
