"""Reading what a sandbox (or a command beside its task) wrote, in tests."""

from __future__ import annotations

import trio


async def split_output(chunks) -> tuple[bytes, bytes]:
    """(stdout, stderr) of an async iterable of LogChunks, read to its end."""
    out, err = bytearray(), bytearray()
    async for c in chunks:
        (out if c.stream == "stdout" else err).extend(c.data)
    return bytes(out), bytes(err)


async def run_to_end(sb) -> tuple:
    """(status, stdout, stderr) of a prepared sandbox started here and run to its end."""
    async with trio.open_nursery() as n:
        await sb.start(n)
        out, err = await split_output(sb.logs())
        status = await sb.wait()
    return status, out, err
