"""The model: checkpoints, transformer spans, quantization, the client-side head and sampling.

No networking and no trio here. The rest of Hearth sees shard/ through `shard.interfaces`, in
numpy arrays: a node runs a `Span` (`shard.span.SpanModel`) over per-session caches, a client
keeps the `Head` (`shard.head.ClientHead`: embeddings, final norm, LM head) and a `Sampler`; a
model directory is opened and checked once (`shard.model_dir.ModelDir`) and passed down.
"""
