"""Hostile bytes on a real Noise session (the stock XX handshake, then our lean
session) and our lean yamux: refused, counted, and the connection ends; what a
peer makes us hold stays bounded; and the lean yamux also runs over a stock
secure session (its fallback).  In memory (no sockets): a trio memory stream
stands in for TCP."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import (FLAG_SYN, GO_AWAY_PROTOCOL_ERROR, TYPE_DATA, TYPE_GO_AWAY,
                                             TYPE_WINDOW_UPDATE, YAMUX_HEADER_FORMAT)

from synord.protocols.p2p_noise import LeanNoiseSession, LeanNoiseTransport, NoiseMessageError
from synord.protocols.p2p_yamux import LeanYamux
from synord.protocols.refusals import REFUSALS

HEADER = struct.Struct(YAMUX_HEADER_FORMAT)


class Pipe:
    """A raw connection over one end of an in-memory byte stream."""

    def __init__(self, stream):
        self.stream = stream

    async def read(self, n=None) -> bytes:
        try:
            return await self.stream.receive_some(n)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return b""

    async def write(self, data) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    def get_remote_address(self):
        return None


async def session_pair(noise=LeanNoiseTransport) -> tuple:
    """(initiator, responder, the initiator's raw pipe) after a real Noise XX
    handshake; sessions from ``noise`` (our lean transport unless told)."""
    a_end, b_end = trio.testing.memory_stream_pair()
    a_pipe = Pipe(a_end)
    keys = [create_new_key_pair() for _ in range(2)]
    transports = [noise(k, noise_privkey=create_x25519_key_pair().private_key) for k in keys]
    out: dict = {}

    async def outbound() -> None:
        out["a"] = await transports[0].secure_outbound(a_pipe, ID.from_pubkey(keys[1].public_key))

    async def inbound() -> None:
        out["b"] = await transports[1].secure_inbound(Pipe(b_end))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbound)
        nursery.start_soon(inbound)
    if noise is LeanNoiseTransport:
        assert isinstance(out["a"], LeanNoiseSession) and isinstance(out["b"], LeanNoiseSession)
    return out["a"], out["b"], a_pipe


@pytest.mark.parametrize("message, reason", [
    (b"\x00\x20" + bytes(32), "bad-tag"),      # a forged (or corrupted) message
    (b"\x00\x05hello", "short-message"),       # shorter than its own tag
])
def test_noise_refuses_unauthenticated_messages(message, reason):
    async def main() -> None:
        a, b, a_pipe = await session_pair()
        await a.write(b"x" * 100_000)           # two messages, authenticated
        assert await b.read(100_000) == b"x" * 100_000
        before = REFUSALS.get("noise", reason)
        await a_pipe.write(message)
        with pytest.raises(NoiseMessageError):
            await b.read(1)
        assert REFUSALS.get("noise", reason) == before + 1

    trio.run(main)


def test_noise_refuses_a_stream_cut_inside_a_message():
    async def main() -> None:
        a, b, a_pipe = await session_pair()
        before = REFUSALS.get("noise", "truncated")
        await a_pipe.write(b"\x01\x00" + bytes(100))  # announces 256 bytes, sends 100
        await a_pipe.close()
        with pytest.raises(Exception):
            await b.read(1)
        assert REFUSALS.get("noise", "truncated") == before + 1

    trio.run(main)


async def yamux_refuses(frames: list[bytes], reason: str) -> None:
    """Our muxer on b; raw frames from a (through its Noise session) open stream 1
    and then send ``frames``; b must count ``reason``, say GO_AWAY (protocol
    error) and end the connection."""
    a, b, _ = await session_pair()
    muxer = LeanYamux(b, ID.from_pubkey(create_new_key_pair().public_key), is_initiator=False)
    before = REFUSALS.get("yamux", reason)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(muxer.start)
        await a.write(HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
        with trio.fail_after(10):
            stream = await muxer.accept_stream()
            for frame in frames:
                await a.write(frame)
            seen = []
            while True:  # the ACK of our SYN, then the GO_AWAY
                _, typ, _, _, length = HEADER.unpack(await a.read_exactly(12))
                seen.append(typ)
                if typ == TYPE_GO_AWAY:
                    assert length == GO_AWAY_PROTOCOL_ERROR
                    break
            await muxer.event_closed.wait()
            with pytest.raises((MuxedStreamEOF, MuxedStreamReset)):
                while True:  # whatever was within the window is still readable, then the end
                    await stream.read(1 << 20)
        nursery.cancel_scope.cancel()
    assert REFUSALS.get("yamux", reason) == before + 1


def test_yamux_refuses_data_beyond_the_window():
    # 200 KiB fits the 256 KiB initial window; nobody reads, so no credit comes
    # back, and 100 KiB more overflows it
    trio.run(yamux_refuses, [HEADER.pack(0, TYPE_DATA, 0, 1, 200 * 1024) + bytes(200 * 1024),
                             HEADER.pack(0, TYPE_DATA, 0, 1, 100 * 1024) + bytes(100 * 1024)],
             "window-exceeded")


def test_yamux_refuses_unknown_versions_and_types():
    trio.run(yamux_refuses, [HEADER.pack(1, TYPE_DATA, 0, 1, 0)], "bad-frame")
    trio.run(yamux_refuses, [HEADER.pack(0, 7, 0, 1, 0)], "bad-frame")


def test_yamux_refuses_oversized_frames_for_unknown_streams():
    trio.run(yamux_refuses, [HEADER.pack(0, TYPE_DATA, 0, 99, 64 << 20)], "oversized-frame")


def test_yamux_gathers_tiny_frames_instead_of_holding_an_object_each():
    """5000 one-byte frames (within the window) cost ~5000 bytes, not 5000 objects,
    and read back in order."""
    async def main() -> None:
        a, b, _ = await session_pair()
        muxer = LeanYamux(b, ID.from_pubkey(create_new_key_pair().public_key), is_initiator=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(muxer.start)
            await a.write(HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
            with trio.fail_after(10):
                stream = await muxer.accept_stream()
                sent = bytes(i % 251 for i in range(5000))
                await a.write(b"".join(HEADER.pack(0, TYPE_DATA, 0, 1, 1) + sent[i:i + 1]
                                       for i in range(len(sent))))
                buf = muxer.stream_buffers[1]
                while len(buf) < len(sent):
                    await trio.sleep(0.01)
                assert len(buf.parts) <= 2
                got = b""
                while len(got) < len(sent):
                    got += await stream.read(len(sent) - len(got))
                assert got == sent
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_lean_yamux_runs_over_a_stock_noise_session_too():
    """The fallback for a secure connection that is not our lean session: both
    ends LeanYamux over py-libp2p's own SecureSession, 1 MiB each way."""
    from libp2p.security.noise.transport import Transport as StockNoise
    from libp2p.security.secure_session import SecureSession

    async def main() -> None:
        a, b, _ = await session_pair(StockNoise)
        assert type(a) is SecureSession and type(b) is SecureSession
        muxers = [LeanYamux(session, ID.from_pubkey(create_new_key_pair().public_key), is_initiator=first)
                  for session, first in ((a, True), (b, False))]
        data = bytes(range(256)) * 4096
        async with trio.open_nursery() as nursery:
            for m in muxers:
                nursery.start_soon(m.start)
            with trio.fail_after(20):
                await trio.sleep(0.01)
                ours = await muxers[0].open_stream()
                theirs = await muxers[1].accept_stream()

                async def pump(stream) -> bytes:
                    got = bytearray()
                    async with trio.open_nursery() as n:
                        n.start_soon(stream.write, data)
                        while len(got) < len(data):
                            got += await stream.read(1 << 20)
                    return bytes(got)

                results = {}

                async def run(name, stream) -> None:
                    results[name] = await pump(stream)

                async with trio.open_nursery() as n:
                    n.start_soon(run, "a", ours)
                    n.start_soon(run, "b", theirs)
                assert results == {"a": data, "b": data}
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_pieces_serve_reads_of_any_size_in_order():
    """The stream buffer (`_Pieces`): views and gathered tiny pieces, read back in
    order by reads of 1 byte (as varint readers do) up to more than is held."""
    import random

    from synord.protocols.p2p_yamux import COALESCE, _Pieces

    rng = random.Random(7)
    sent, buf, got = bytearray(), _Pieces(), bytearray()
    for _ in range(300):
        size = rng.choice([1, 3, COALESCE - 1, COALESCE, 20_000, 65_507])
        piece = bytes(rng.getrandbits(8) for _ in range(min(size, 64))) * (size // 64 + 1)
        piece = piece[:size]
        buf.append(memoryview(piece) if size >= COALESCE else piece)
        sent += piece
        while rng.random() < 0.5 and len(buf):
            got += buf.take(rng.choice([1, 2, 7, 4096, 70_000, -1]))
    got += buf.take(-1)
    assert bytes(got) == bytes(sent) and len(buf) == 0
