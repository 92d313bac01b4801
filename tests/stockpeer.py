"""A stock py-libp2p host (Noise XX + yamux exactly as the library ships them):
the other end of tests/test_p2p_wire_compat.py.  It must never import synord,
which swaps in its own Noise session and yamux data path.

Prints its address, then serves /synord-test/echo/1.0.0 (echoes every byte until
the writer half-closes) and obeys lines on stdin:

    echo ADDR NBYTES SEED   dial ADDR (reusing a connection), stream NBYTES of
                            pseudo-random data to its echo protocol while reading
                            the echo -> "echo-ok NBYTES" | "echo-fail REASON"
"""

from __future__ import annotations

import hashlib
import sys

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID, Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID, Yamux

ECHO = TProtocol("/synord-test/echo/1.0.0")
PIECE = 100_000  # not a multiple of any frame size: frames and writes straddle


def payload(n: int, seed: str) -> bytes:
    out, i = bytearray(), 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest() * 64
        i += 1
    return bytes(out[:n])


async def read_some(stream) -> bytes:
    try:
        return await stream.read(PIECE)
    except StreamEOF:
        return b""


async def echo_handler(stream) -> None:
    while data := await read_some(stream):
        await stream.write(data)
    await stream.close()


async def echo_to(host, addr: str, n: int, seed: str) -> str:
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [ECHO])
    data, got = payload(n, seed), bytearray()

    async def send() -> None:
        for off in range(0, n, PIECE):
            await stream.write(data[off:off + PIECE])
        await stream.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while chunk := await read_some(stream):
            got += chunk
    return f"echo-ok {len(got)}" if bytes(got) == data else f"echo-fail got {len(got)} bytes, differing"


async def main() -> None:
    key_pair = create_new_key_pair()
    host = new_host(key_pair=key_pair,
                    sec_opt={TProtocol(NOISE_ID): NoiseTransport(
                        key_pair, noise_privkey=create_x25519_key_pair().private_key)},
                    muxer_opt={TProtocol(YAMUX_ID): Yamux})
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        host.set_stream_handler(ECHO, echo_handler)
        print(f"{host.get_addrs()[0]}/p2p/{host.get_id().to_base58()}".replace(
            f"/p2p/{host.get_id().to_base58()}/p2p/", "/p2p/"), flush=True)
        lines = trio.wrap_file(sys.stdin)
        while line := await lines.readline():
            cmd, *args = line.split()
            if cmd == "echo":
                try:
                    with trio.fail_after(60):
                        print(await echo_to(host, args[0], int(args[1]), args[2]), flush=True)
                except Exception as exc:
                    print(f"echo-fail {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    trio.run(main)
