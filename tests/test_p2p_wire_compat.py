"""Our lean Noise session and yamux data path (synord/protocols/p2p_noise.py,
p2p_yamux.py) speak the wire format of stock py-libp2p: a stock host
(tests/stockpeer.py, its own process: synord never imported there) and our
Libp2pMesh exchange 2 MiB each way on streams opened by either side, over a
connection dialled by either side.  2 MiB is 8 initial yamux windows: both
implementations' window updates are exercised, and the stock sender's frames
do not line up with Noise messages the way ours do."""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from stockpeer import ECHO, PIECE, payload
from libp2p.peer.id import ID
from synord.protocols.identity import Identity
from synord.protocols.mesh import MeshConfig
from synord.protocols.p2p import create_mesh
from synord.protocols.p2p_noise import LeanNoiseSession
from synord.protocols.p2p_yamux import LeanYamux

HERE = Path(__file__).resolve().parent
SIZE = 2 * 1024 * 1024


def start_stock() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(HERE / "stockpeer.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=HERE)
    ready, _, _ = select.select([proc.stdout], [], [], 60)  # every wait has a deadline
    addr = proc.stdout.readline().strip() if ready else ""
    if not addr:
        proc.kill()
        pytest.fail(f"the stock py-libp2p peer did not start (exit {proc.wait()})")
    return proc, addr


async def ask(proc: subprocess.Popen, line: str) -> str:
    def run() -> str:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()
    # abandoned on timeout: the peer is killed at the end, which ends the read
    return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


async def echo_through(mesh, peer: str, seed: str) -> bytes:
    stream = await mesh.open_stream(peer, ECHO)
    data, got = payload(SIZE, seed), bytearray()

    async def send() -> None:
        for off in range(0, SIZE, PIECE):
            await stream.raw.write(data[off:off + PIECE])
        await stream.raw.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while chunk := await stream.raw.read(256 * 1024):
            got += chunk
    assert bytes(got) == data
    return bytes(got)


async def our_echo(stream) -> None:
    while data := await stream.raw.read(PIECE):
        await stream.raw.write(data)
    await stream.raw.close()


def test_lean_paths_interoperate_with_stock_py_libp2p():
    dialled, dialled_addr = start_stock()   # we dial it: we are Noise initiator
    dialler, _ = start_stock()              # it dials us: we are Noise responder
    try:
        async def main() -> None:
            mesh = create_mesh(Identity.generate(), MeshConfig(
                listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, peer_exchange=False))
            async with trio.open_nursery() as nursery:
                await nursery.start(mesh.run)
                mesh.set_handler(str(ECHO), our_echo)
                ours = mesh.listen_addrs()[0]
                with trio.fail_after(120):
                    peer = await mesh.dial(dialled_addr)
                    await echo_through(mesh, peer, "we-dialled-our-stream")
                    assert await ask(dialled, f"echo {ours} {SIZE} we-dialled-its-stream") == f"echo-ok {SIZE}"
                    assert await ask(dialler, f"echo {ours} {SIZE} it-dialled-its-stream") == f"echo-ok {SIZE}"
                    other = [p for p in mesh.connected_peers() if p != peer]
                    assert len(other) == 1
                    await echo_through(mesh, other[0], "it-dialled-our-stream")
                # the lean classes carried it all (not a fallback to the stock ones)
                for p in (peer, other[0]):
                    conns = mesh.host.get_network().get_connections(ID.from_base58(p))
                    assert conns and all(isinstance(c.muxed_conn, LeanYamux) and
                                         isinstance(c.muxed_conn.secured_conn, LeanNoiseSession) for c in conns)
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        for proc in (dialled, dialler):
            proc.kill()
            proc.wait()
