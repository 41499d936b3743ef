"""The conversation between a client and a node, as data: stream ids, capabilities, the handshake.

A client reaches a node on two kinds of stream, named by protocol id:

- `INFERENCE_PROTOCOL`: one inference session per stream (the table in `protocol.session`).
- `INFO_PROTOCOL`: Hello -> Hello, SpanInfo (what the node serves, its load); Ping -> Pong.
- `PIECES_PROTOCOL`: Hello -> Hello, then ManifestRequest -> ManifestData (a model's manifest and
  which of its pieces the peer holds) and PieceRequest -> PieceData, one at a time.
- `REACH_PROTOCOL`: Hello -> Hello, then DialBackRequest -> DialBackResult (can the peer dial us?),
  between any two peers, nodes and relays alike.

All begin with `Hello` both ways (the session machine enforces it). Each Hello lists the codecs
its sender speaks (and how fast, `codec_speeds`) and the optional features it supports
(`capabilities`); `negotiate` says what two Hellos agree on, and a feature is used only when both
sides list it. The data channel's fixed sizes live here too, since both ends must agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.codec_choice import DEFAULT_CODEC, CodecSpeed, choose_session_codec
from protocol.link_estimate import LinkEstimate
from protocol.messages import DATA_KEY_BYTES, DATA_TOKEN_BYTES, SWARM_PROOF_BYTES, Hello
from protocol.tensors import Codec

INFERENCE_PROTOCOL = "/hearth/inference/1"
PIECES_PROTOCOL = "/hearth/pieces/1"  # a model's manifest and pieces, from peers that hold them
INFO_PROTOCOL = "/hearth/info/1"
REACH_PROTOCOL = "/hearth/reach/1"  # a peer dials us back: are we reachable from outside (`mesh.reachability`)

# Capabilities (Hello.capabilities): a feature runs only when both Hellos list it.
DATA_CHANNEL = "data-channel-2"  # a session's steps may move to the sealed TCP channel offered in SessionOpened
REPLAY_CHUNKS = "replay-chunks"  # Step.chunks: several original steps replayed in one message
# Step.rewind is understood, and a step of at most 16 tokens computes each token's row with the
# bits a one-token step computes (`shard.blocks.ROW_EXACT_TOKENS`): a client may check drafted
# tokens in one step and keep any prefix of them (`mesh.speculative`)
REWIND_STEPS = "rewind-steps"
# The node's span gives every position the same bits however the positions were split into steps
# (`shard.interfaces.Span.chunk_invariant`): a client may continue a kept route from any position of
# a conversation and get the answer a fresh route gives (prefix reuse, `mesh.kept_sessions`)
CHUNK_INVARIANT = "chunk-invariant"
CAPABILITIES = (DATA_CHANNEL, REPLAY_CHUNKS, REWIND_STEPS, CHUNK_INVARIANT)  # every capability this version knows

# The data channel offer's sizes, DATA_TOKEN_BYTES and DATA_KEY_BYTES, are checked by SessionOpened
# (protocol.messages) and exported here with the rest of the conversation; so is the size of a
# Hello's swarm proof, SWARM_PROOF_BYTES (household mode: what it proves is `mesh.swarm_secret`'s).
FALLBACK_CODEC = Codec.FP32  # every peer decodes it; what a session uses when the wanted codec is not shared
AUTO = "auto"  # a client's codec option: let `session_codec` pick per hop from the link and the peers' speeds


@dataclass(frozen=True)
class Agreement:
    """What a client's and a node's Hellos have in common."""

    codecs: tuple[Codec, ...]  # both speak them, in the client's order of preference
    capabilities: frozenset[str]  # both list them
    client_speeds: tuple[CodecSpeed, ...]  # the client's announced speeds for the common codecs
    hop_speeds: tuple[CodecSpeed, ...]  # the node's
    hop_max_frame_bytes: int  # the largest frame the node accepts

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def codec(self, wanted: Codec) -> Codec:
        """`wanted` when both speak it, else `FALLBACK_CODEC`."""
        return wanted if wanted in self.codecs else FALLBACK_CODEC


__all__ = [
    "AUTO", "Agreement", "CAPABILITIES", "DATA_CHANNEL", "DATA_KEY_BYTES", "DATA_TOKEN_BYTES", "FALLBACK_CODEC",
    "CHUNK_INVARIANT", "INFERENCE_PROTOCOL", "INFO_PROTOCOL", "PIECES_PROTOCOL", "REPLAY_CHUNKS", "REWIND_STEPS", "SWARM_PROOF_BYTES", "negotiate", "session_codec",
]


def negotiate(client: Hello, hop: Hello) -> Agreement:
    """What `client`'s and `hop`'s Hellos agree on: common codecs (with both sides' speeds for
    them) and common capabilities. Unknown capability names simply find no partner."""
    common = tuple(codec for codec in dict.fromkeys(client.codecs) if codec in set(hop.codecs))
    return Agreement(
        codecs=common,
        capabilities=frozenset(client.capabilities) & frozenset(hop.capabilities),
        client_speeds=tuple(speed for speed in client.codec_speeds if speed.codec in common),
        hop_speeds=tuple(speed for speed in hop.codec_speeds if speed.codec in common),
        hop_max_frame_bytes=hop.max_frame_bytes,
    )


def session_codec(agreement: Agreement, wanted: Codec | str, *, n_values: int,
                  link: LinkEstimate | None) -> Codec:
    """The codec of a session's steps, both ways. An explicit `wanted` codec is used when both
    speak it (else `FALLBACK_CODEC`). `AUTO` is `DEFAULT_CODEC` until the link is known (`link`,
    from `protocol.link_estimate`) and both sides announced their codec speeds; then the codec
    `choose_session_codec` finds cheapest for a message of `n_values` within the default error
    budget."""
    if wanted != AUTO:
        return agreement.codec(Codec(wanted))
    fallback = agreement.codec(DEFAULT_CODEC)
    if link is None or not agreement.client_speeds or not agreement.hop_speeds:
        return fallback
    try:
        return choose_session_codec(n_values=n_values, bandwidth_bytes_per_s=link.bandwidth_bytes_per_s,
                                    client=agreement.client_speeds, hop=agreement.hop_speeds).codec
    except ValueError:  # no codec both announced fits the error budget
        return fallback
