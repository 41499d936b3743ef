"""The model: checkpoints, transformer spans, quantization, the client-side head and sampling.

No networking and no trio here. Nodes run a `SpanModel` over their blocks; clients run the
`ClientHead` (embeddings, final norm, LM head) and a `Sampler`.
"""
