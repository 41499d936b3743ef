"""Typed errors raised by `shard`: each names what was wrong and with which value."""

from __future__ import annotations


class ShardError(Exception):
    """Base of every error `shard` raises on bad input (checkpoint, span, prompt, manifest)."""


class UnsupportedArchitecture(ShardError):
    def __init__(self, architecture: str, supported: tuple[str, ...]):
        self.architecture = architecture
        self.supported = supported
        super().__init__(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported)}"
        )


class ConfigError(ShardError):
    """config.json is missing, unreadable, or has a field with an invalid value."""


class MissingTensor(ShardError):
    def __init__(self, name: str, where: str):
        self.name = name
        self.where = where
        super().__init__(f"tensor {name!r} not found in {where}")


class CorruptCheckpoint(ShardError):
    """A safetensors file or index is truncated, malformed, or has tensors of the wrong shape."""


class SpanOutOfRange(ShardError):
    def __init__(self, start: int, end: int, n_blocks: int):
        self.start, self.end, self.n_blocks = start, end, n_blocks
        super().__init__(
            f"span [{start}, {end}) is not a non-empty range inside the model's {n_blocks} blocks"
        )


class ManifestMismatch(ShardError):
    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"manifest check failed for {path}: {reason}")


class PromptTooLong(ShardError):
    def __init__(self, length: int, limit: int):
        self.length, self.limit = length, limit
        super().__init__(f"sequence of {length} tokens exceeds the model's context of {limit}")


class CacheFull(ShardError):
    def __init__(self, needed: int, capacity: int):
        self.needed, self.capacity = needed, capacity
        super().__init__(f"KV cache needs {needed} positions but holds at most {capacity}")


class QuantizationError(ShardError):
    """A quantization mode or group size is invalid, or a saved quantized span does not match."""


class InvalidInput(ShardError):
    """Token ids, hidden states or arguments handed to the model are out of range or malformed."""


class InvalidSamplingParams(ShardError):
    def __init__(self, field: str, value: object, reason: str):
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"sampling parameter {field}={value!r} is invalid: {reason}")


class SamplingError(ShardError):
    """Logits or token ids handed to the sampler or stop checker have the wrong shape or values."""


class TokenizerFileError(ShardError):
    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"tokenizer file {path}: {reason}")


class ChatTemplateError(ShardError):
    """The model has no (matching) chat template, or rendering the template failed."""


class CorruptManifest(ManifestMismatch):
    """hearth-manifest.json exists but is unreadable, malformed, or of an unknown version."""
