"""Measure py-libp2p 0.8.1's bitswap against a plain libp2p stream (issue 21).

Standalone; not part of Hearth. Everything runs in one trio process on 127.0.0.1 with two or
three py-libp2p hosts (Noise + yamux, `max_connections_per_peer=1`, as mesh/libp2p_transport.py
builds them). Every wait is bounded with `trio.fail_after`.

    .venv/bin/python tools/measure_bitswap.py            # all cases, ~1-2 min on 2 cores
    .venv/bin/python tools/measure_bitswap.py --mib 16 --only throughput

Cases:
  throughput  bitswap `session.get_blocks_batch` vs a plain stream (pipelined piece requests,
              per-piece sha256 checked by the reader), at 256 KiB, 512 KiB (`add_block`'s limit),
              1 MiB, 2 MiB (put into the store directly) and 4 MiB (two blocks, 5 s timeout: over
              the 4 MiB message limit).
  garbage     the serving peer's store maps a CID to other bytes.
  unsolicited a peer pushes blocks nobody asked for.
  silent      the serving peer reads wants and never answers.
  vanish      the serving peer's host is closed mid-transfer (alone, and with a second provider).
  parallel    two peers hold every block; the requester does not name one.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import resource
import struct
import time

import multiaddr
import trio
from libp2p import new_host
from libp2p.bitswap import BitswapClient, compute_cid_v1_obj, get_cid_prefix
from libp2p.bitswap.config import BITSWAP_PROTOCOL_V120
from libp2p.bitswap.errors import BitswapError
from libp2p.bitswap.messages import create_message
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

KiB, MiB = 1024, 1024 * 1024
PLAIN = TProtocol("/hearth-measure/pieces/0")
WAIT_S = 30.0  # the bound on every wait


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_host():
    kp = create_new_key_pair()
    return new_host(
        key_pair=kp,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


class Peer:
    """One host + one bitswap client, run inside `async with Peer() as p`."""

    def __init__(self):
        self.host = make_host()
        self.bs: BitswapClient | None = None
        self.closed = False

    async def __aenter__(self):
        self._run = self.host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
        await self._run.__aenter__()
        self._nursery_cm = trio.open_nursery()
        self.nursery = await self._nursery_cm.__aenter__()
        self.bs = BitswapClient(self.host)
        self.bs.set_nursery(self.nursery)
        await self.bs.start()
        return self

    async def close_host(self):
        """The peer vanishes: host closed (TCP connections closed), as a killed process would."""
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + 5
            try:
                await self.bs.stop()
            except Exception:
                pass
            try:
                await self.host.close()
            except Exception:
                pass

    async def __aexit__(self, *exc):
        await self.close_host()  # first: bitswap's disconnect hook needs the nursery open
        self.nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await self._run.__aexit__(None, None, None)
            except BaseException:
                pass

    @property
    def info(self) -> PeerInfo:
        return PeerInfo(self.host.get_id(), self.host.get_addrs())

    async def connect(self, other: "Peer"):
        with trio.fail_after(WAIT_S):
            await self.host.connect(other.info)


def make_blocks(total: int, block: int) -> list[tuple[object, bytes]]:
    """Distinct pseudo-random blocks (a little os.urandom, repeated with a counter: cheap)."""
    seed = os.urandom(64 * KiB)
    reps = -(-block // len(seed))
    out = []
    for i in range(total // block):
        data = (struct.pack(">Q", i) + (seed * reps))[:block]
        out.append((compute_cid_v1_obj(data), data))
    return out


async def serve(peer: Peer, blocks, *, direct: bool):
    for cid, data in blocks:
        if direct:  # bypasses add_block's 512 KiB limit (and its hash check)
            await peer.bs.block_store.put_block(cid, data)
        else:
            await peer.bs.add_block(cid, data)


async def fetch(requester: Peer, cids, peer_id=None, timeout=WAIT_S, batch_size=32):
    session = requester.bs.new_session()
    return await session.get_blocks_batch(list(cids), peer_id=peer_id, timeout=timeout, batch_size=batch_size)


def clear_store(peer: Peer):
    peer.bs.block_store._blocks.clear()


# ---------------------------------------------------------------- plain stream baseline
def plain_handler(blocks):
    async def handle(stream):
        # Never let an exception out: py-libp2p 0.8.1 then stops accepting *any* new inbound
        # stream on that connection (see docs/libp2p.md), which would stall bitswap's streams too.
        try:
            while True:
                req = await read_exact(stream, 8)
                if req is None:
                    break
                first, count = struct.unpack(">II", req)
                for _, data in blocks[first:first + count]:
                    await stream.write(data)
        except Exception:  # StreamEOF at the end, or a reset
            pass
        finally:
            with trio.move_on_after(2):
                try:
                    await stream.close()
                except Exception:
                    pass
    return handle


async def read_exact(stream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            return None if not buf else bytes(buf)
        buf += chunk
    return bytes(buf)


async def plain_fetch(requester: Peer, server: Peer, blocks, window: int = 16) -> int:
    """Our own piece protocol, minimal: ask for `window` pieces at a time, check each sha256."""
    stream = await requester.host.new_stream(server.host.get_id(), [PLAIN])
    digests = [hashlib.sha256(d).digest() for _, d in blocks]  # from "our manifest"
    size = len(blocks[0][1])
    got = 0
    for first in range(0, len(blocks), window):
        count = min(window, len(blocks) - first)
        await stream.write(struct.pack(">II", first, count))
        for i in range(first, first + count):
            piece = await read_exact(stream, size)
            if hashlib.sha256(piece).digest() != digests[i]:
                raise ValueError(f"piece {i} does not match")
            got += len(piece)
    await stream.close()
    return got


# ---------------------------------------------------------------- cases
async def case_throughput(args):
    print(f"\n== throughput: {args.mib} MiB from one peer, loopback, one process ==")
    total = args.mib * MiB
    for block in (256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB):
        # 4 MiB: a block plus its framing exceeds bitswap's 4 MiB message limit; two suffice
        too_big = block >= 4 * MiB
        blocks = make_blocks(2 * block if too_big else total, block)
        async with Peer() as a, Peer() as b:
            try:
                await serve(b, blocks, direct=False)
                how = "add_block"
            except BitswapError as err:
                await serve(b, blocks, direct=True)
                how = f"put_block ({type(err).__name__} from add_block)"
            b.host.set_stream_handler(PLAIN, plain_handler(blocks))
            await a.connect(b)
            await trio.sleep(0.2)  # identify settles
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                with trio.fail_after(WAIT_S):
                    n = await plain_fetch(a, b, blocks)
                dt_plain = time.perf_counter() - t0

                clear_store(a)
                a.bs.peer_manager.remove_peer(b.host.get_id())
                t0 = time.perf_counter()
                with trio.move_on_after(WAIT_S) as scope:
                    got = await fetch(a, [c for c, _ in blocks], peer_id=b.host.get_id(),
                                      timeout=5 if too_big else WAIT_S - 5)
                dt_bs = time.perf_counter() - t0
                ok = len(got) == len(blocks) and all(got[c.buffer] == d for c, d in blocks[:4])
                print(f"  block {block // KiB:5d} KiB ({how}): plain stream {n / dt_plain / 1e6:6.1f} MB/s "
                      f"({dt_plain:.2f} s) | bitswap {len(got)}/{len(blocks)} blocks "
                      f"{sum(map(len, got.values())) / dt_bs / 1e6:6.1f} MB/s ({dt_bs:.2f} s)"
                      f"{' TIMED OUT' if scope.cancelled_caught else ''}{'' if ok else ' INCOMPLETE'}"
                      f", {a.bs.peer_manager._get_stats(b.host.get_id()).blocks_delivered} blocks delivered"
                      f"  [peak RSS {rss_mib():.0f} MiB]")
                if too_big:
                    continue
                # The default batch of 32 stalls ~1 s between batches (the reader closes the
                # stream the next batch's blocks come back on; the session's 1 s retry re-asks).
                # One batch of everything shows the wire without that stall.
                clear_store(a)
                t0 = time.perf_counter()
                with trio.move_on_after(WAIT_S) as scope:
                    got = await fetch(a, [c for c, _ in blocks], peer_id=b.host.get_id(), timeout=WAIT_S - 5,
                                      batch_size=len(blocks))
                dt_one = time.perf_counter() - t0
                print(f"  {'':>28} one batch of {len(blocks)}: bitswap {len(got)}/{len(blocks)} blocks "
                      f"{sum(map(len, got.values())) / dt_one / 1e6:6.1f} MB/s ({dt_one:.2f} s)"
                      f"{' TIMED OUT' if scope.cancelled_caught else ''}")


async def case_garbage(args):
    print("\n== garbage: the server's store maps a CID to other bytes ==")
    blocks = make_blocks(8 * 256 * KiB, 256 * KiB)
    async with Peer() as a, Peer() as b:
        await serve(b, blocks, direct=False)
        bad_cid = blocks[3][0]
        await b.bs.block_store.put_block(bad_cid, os.urandom(256 * KiB))  # wrong bytes
        await a.connect(b)
        t0 = time.perf_counter()
        err = None
        try:
            with trio.fail_after(WAIT_S):
                got = await fetch(a, [c for c, _ in blocks], peer_id=b.host.get_id(), timeout=8)
        except BaseException as e:  # noqa: BLE001 - we report whatever it is
            err, got = e, {}
        dt = time.perf_counter() - t0
        stored = a.bs.block_store.size()
        print(f"  get_blocks_batch(timeout=8): {len(got)}/{len(blocks)} blocks after {dt:.1f} s, "
              f"raised {err!r}; bad CID in result: {bad_cid.buffer in got}; "
              f"requester's store now holds {stored} blocks (wanted {len(blocks)})")
        stats = a.bs.peer_manager._get_stats(b.host.get_id())
        print(f"  server's stats at the requester: delivered {stats.blocks_delivered}, timeouts {stats.timeouts} "
              "(no notion of a bad block)")
        session = a.bs.new_session()
        t0 = time.perf_counter()
        try:
            with trio.fail_after(WAIT_S):
                await session.get_block(bad_cid, peer_id=b.host.get_id(), timeout=5)
            outcome = "returned"
        except BaseException as e:  # noqa: BLE001
            outcome = f"raised {type(e).__module__}.{type(e).__name__}: {e}"
        print(f"  get_block(bad CID, timeout=5) {outcome} after {time.perf_counter() - t0:.1f} s")


async def case_unsolicited(args):
    print("\n== unsolicited: a peer pushes blocks nobody asked for ==")
    async with Peer() as a, Peer() as b:
        await b.connect(a)
        before = a.bs.block_store.size()
        stream = await b.host.new_stream(a.host.get_id(), [BITSWAP_PROTOCOL_V120])
        n, size = 64, 1 * MiB
        with trio.fail_after(WAIT_S):
            for i in range(n):
                data = struct.pack(">Q", i) + os.urandom(size - 8)
                prefix = get_cid_prefix(compute_cid_v1_obj(data))
                await b.bs._write_message(stream, create_message(blocks_v110=[(prefix, data)]))
            await trio.sleep(1.0)
        print(f"  pushed {n} x {size // MiB} MiB unasked: requester's store {before} -> {a.bs.block_store.size()} "
              f"blocks, {sum(map(len, a.bs.block_store._blocks.values())) / MiB:.0f} MiB kept")


async def case_silent(args):
    print("\n== silent: the server reads wants and never answers ==")
    blocks = make_blocks(4 * 256 * KiB, 256 * KiB)
    async with Peer() as a, Peer() as b:
        await serve(b, blocks, direct=False)

        async def never(wantlist, peer_id, stream):
            return None
        b.bs._process_wantlist = never
        await a.connect(b)
        for timeout in (3.0, None):
            t0 = time.perf_counter()
            with trio.move_on_after(12) as scope:
                try:
                    if timeout is None:
                        got = await fetch(a, [c for c, _ in blocks], peer_id=b.host.get_id(), timeout=90)
                    else:
                        got = await fetch(a, [c for c, _ in blocks], peer_id=b.host.get_id(), timeout=timeout)
                    res = f"returned {len(got)}/{len(blocks)} blocks, no exception"
                except BaseException as e:  # noqa: BLE001
                    res = f"raised {e!r}"
            dt = time.perf_counter() - t0
            label = f"timeout={timeout}" if timeout else "default-ish timeout=90"
            print(f"  get_blocks_batch({label}): " +
                  (f"still waiting after {dt:.0f} s (our fail_after cut it)" if scope.cancelled_caught
                   else f"{res} after {dt:.1f} s"))


async def case_vanish(args):
    print("\n== vanish: the serving host is closed mid-transfer ==")
    total = min(args.mib, 32) * MiB
    blocks = make_blocks(total, 256 * KiB)
    cids = [c for c, _ in blocks]
    for providers in (1, 2):
        async with Peer() as a, Peer() as b, Peer() as c:
            await serve(b, blocks, direct=False)
            await a.connect(b)
            if providers == 2:
                await serve(c, blocks, direct=False)
                await a.connect(c)
            await trio.sleep(0.2)
            result: dict = {}
            t_close = None

            async def run_fetch():
                t0 = time.perf_counter()
                try:
                    # `timeout` is per batch of 32 CIDs, not for the whole call
                    got = await fetch(a, cids, peer_id=b.host.get_id() if providers == 1 else None, timeout=5)
                    result["out"] = f"returned {len(got)}/{len(cids)} blocks, no exception"
                except BaseException as e:  # noqa: BLE001
                    result["out"] = f"raised {e!r}"
                result["dt"] = time.perf_counter() - t0

            with trio.move_on_after(WAIT_S + 10) as scope:
                async with trio.open_nursery() as n:
                    n.start_soon(run_fetch)
                    while a.bs.block_store.size() < len(cids) // 4 and "dt" not in result:
                        await trio.sleep(0.005)
                    at = a.bs.block_store.size()
                    t_close = time.perf_counter()
                    await b.close_host()
                    print(f"  {providers} provider(s): closed B after {at}/{len(cids)} blocks arrived")
            if scope.cancelled_caught:
                print(f"  {providers} provider(s): still waiting after {WAIT_S + 10:.0f} s (our bound cut it)")
            else:
                since = time.perf_counter() - t_close if t_close else float("nan")
                print(f"  {providers} provider(s): fetch {result.get('out')} {result.get('dt', 0):.1f} s after start, "
                      f"~{since:.1f} s after B closed; store holds {a.bs.block_store.size()}")


async def case_parallel(args):
    print("\n== parallel: two peers hold every block, requester names none ==")
    total = min(args.mib, 32) * MiB
    blocks = make_blocks(total, 256 * KiB)
    async with Peer() as a, Peer() as b, Peer() as c:
        await serve(b, blocks, direct=False)
        await serve(c, blocks, direct=False)
        await a.connect(b)
        await a.connect(c)
        await trio.sleep(0.2)
        t0 = time.perf_counter()
        with trio.move_on_after(WAIT_S + 5):
            got = await fetch(a, [c_ for c_, _ in blocks], timeout=WAIT_S)
        dt = time.perf_counter() - t0
        sb = a.bs.peer_manager._get_stats(b.host.get_id())
        sc = a.bs.peer_manager._get_stats(c.host.get_id())
        print(f"  {len(got)}/{len(blocks)} blocks ({total // MiB} MiB) in {dt:.2f} s = {total / dt / 1e6:.1f} MB/s; "
              f"delivered by B {sb.blocks_delivered} blocks, by C {sc.blocks_delivered} blocks")


CASES = {"throughput": case_throughput, "garbage": case_garbage, "unsolicited": case_unsolicited,
         "silent": case_silent, "vanish": case_vanish, "parallel": case_parallel}


async def main(args):
    for name in args.only or CASES:
        t0 = time.perf_counter()
        await CASES[name](args)
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="MiB fetched in the throughput case (default 64)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", action="append", choices=list(CASES))
    parser.add_argument("--verbose", action="store_true", help="show libp2p's own logging")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    trio.run(main, args)
