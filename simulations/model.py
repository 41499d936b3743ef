"""The model a simulated swarm serves: stand-in (cost model) or a real checkpoint (torch).

Both give the same things to the rest of the simulator: a model directory the real `mesh.Client`
loads, the client head, the config the client sees, spans for a device (`span(device, start,
end)`), how many blocks a device holds, how fast the wire is relative to the real model's, and
the failure-free reference tokens that every completed greedy session must match.
"""

from __future__ import annotations

import math
from pathlib import Path

from shard.model_dir import ModelDir
from simulations.compute import (
    CostModelSpan, StandInHead, StandInWeights, TimedSpan, bandwidth_scale, blocks_that_fit,
    reference_tokens, write_stand_in_model,
)
from simulations.scenario import DeviceProfile, ModelShape


class StandInModel:
    """The cost model: the real model's sizes and speeds, stand-in activations (cheap to compute)."""

    def __init__(self, shape: ModelShape, workdir: Path):
        self.shape = shape
        opened = ModelDir(write_stand_in_model(workdir, shape))
        self.model_dir, self.config, self.digest, self.model_id = opened.path, opened.config, opened.digest, opened.name
        self.blocks = shape.blocks
        self.weights = StandInWeights(shape)
        self.head = StandInHead(self.config, self.weights)
        self.bandwidth_scale = bandwidth_scale(shape)
        self._references: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def span(self, device: DeviceProfile, start: int, end: int) -> CostModelSpan:
        return CostModelSpan(self.shape, self.config, self.weights, device, start, end)

    def span_length(self, device: DeviceProfile) -> int:
        return blocks_that_fit(device, self.shape)

    def reference(self, prompt: list[int], new_tokens: int) -> list[int]:
        key = (tuple(prompt), new_tokens)
        if key not in self._references:
            self._references[key] = reference_tokens(self.weights, self.blocks, prompt, new_tokens)
        return self._references[key]


class TorchModel:
    """A real (tiny) checkpoint: nodes run its blocks in torch; compute time still comes from the profile."""

    def __init__(self, shape: ModelShape, checkpoint: Path):
        from shard.head import load_head
        from shard.pipeline import LocalPipeline

        self.shape = shape
        self.opened = ModelDir(checkpoint)  # read and checked once, for the head, the reference and every span
        self.model_dir, self.config, self.digest, self.model_id = (self.opened.path, self.opened.config,
                                                                   self.opened.digest, self.opened.name)
        self.blocks = self.config.num_layers
        self.head = load_head(self.opened)
        self.bandwidth_scale = 1.0
        self._local = LocalPipeline.load(self.opened)
        self._spans: dict[tuple[int, int], object] = {}
        self._references: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def span(self, device: DeviceProfile, start: int, end: int) -> TimedSpan:
        from shard.span import load_span

        if (start, end) not in self._spans:  # weights are read-only: nodes with one span share them
            self._spans[(start, end)] = load_span(self.opened, start, end)
        return TimedSpan(self._spans[(start, end)], device)

    def span_length(self, device: DeviceProfile) -> int:
        """The share of the real model the device holds, applied to the checkpoint's blocks."""
        share = blocks_that_fit(device, self.shape) / self.shape.blocks
        return max(1, min(self.blocks, math.ceil(share * self.blocks)))

    def reference(self, prompt: list[int], new_tokens: int) -> list[int]:
        from shard.generate import generate_local
        from shard.sampling import SamplingParams

        key = (tuple(prompt), new_tokens)
        if key not in self._references:
            result = generate_local(self._local, prompt, SamplingParams(max_new_tokens=new_tokens))
            self._references[key] = result.token_ids
        return self._references[key]
