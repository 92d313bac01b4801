"""A lean Noise transport session for py-libp2p: the same wire format (Noise XX,
ChaChaPoly: each message a 2-byte big-endian length and at most 65535 bytes of
ciphertext, nonces counting from where the handshake left them), less Python.

py-libp2p's session read each message's length and body with separate reads,
decrypted through three layers of the `noise` package and kept plaintext in a
BytesIO; a 64 KiB write went out as one TCP write per message
(bench/bench_transfer.py, cProfile: ~0.1 ms of Python per 64 KiB message).
Here ciphertext is read in 256 KiB gulps and decrypted from views into them
(ChaCha20-Poly1305 called directly, our own nonce counters), plaintext is
served from the last message (views for yamux bodies), and a large write is
sealed into one buffer (`encrypt_into`) and written once.

Every message is still authenticated: a bad tag, a message shorter than a tag
or a stream that ends inside a message ends the connection (counted).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError, IOException
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from noise.backends.default.ciphers import ChaCha20Cipher
import trio

from .refusals import REFUSALS

MAX_MESSAGE = 65535            # Noise's limit on one message (the 2-byte length)
TAG = 16                       # Poly1305
MAX_PLAINTEXT = MAX_MESSAGE - TAG
MAX_NONCE = 2 ** 64 - 1        # reserved by the Noise spec: never used
GULP = 256 * 1024              # one TCP read serves several messages


class NoiseMessageError(IOException):
    """The peer sent a message we cannot accept; the connection ends."""


def _nonce(n: int) -> bytes:
    return b"\0\0\0\0" + n.to_bytes(8, "little")  # ChaChaPoly's nonce (Noise spec 12.3)


class LeanNoiseSession(SecureSession):
    """Replaces a stock session right after the handshake (nothing was sent or
    read in transport mode yet).  Not for concurrent readers (yamux has one)."""

    def __init__(self, stock: SecureSession):
        super().__init__(local_peer=stock.local_peer, local_private_key=stock.local_private_key,
                         remote_peer=stock.remote_peer,
                         remote_permanent_pubkey=stock.remote_permanent_pubkey,
                         is_initiator=stock.is_initiator, conn=stock.conn)
        proto = stock.conn.noise_state.noise_protocol
        enc, dec = proto.cipher_state_encrypt, proto.cipher_state_decrypt
        self._raw = stock.conn.read_writer.read_write_closer
        self._seal_aead, self._seal_n = enc.cipher.cipher, enc.n
        self._open_aead, self._open_n = dec.cipher.cipher, dec.n
        self._cdata, self._cpos = b"", 0   # the last TCP read, consumed up to _cpos
        self._pt, self._pos = b"", 0       # the last message's plaintext, served from _pos
        self._wlock = trio.Lock()          # nonce order == wire order

    @staticmethod
    def applies(stock: SecureSession) -> bool:
        try:
            proto = stock.conn.noise_state.noise_protocol
            return all(isinstance(cs.cipher, ChaCha20Cipher)
                       for cs in (proto.cipher_state_encrypt, proto.cipher_state_decrypt))
        except AttributeError:
            return False

    # -- reading ---------------------------------------------------------------
    def buffered(self) -> int:
        """Plaintext bytes available without waiting for the network."""
        return len(self._pt) - self._pos

    async def _take(self, k: int):
        """Exactly ``k`` bytes of ciphertext (a view into the last TCP read when they
        are all there); None at a clean end of stream before the first byte.
        No buffer is grown and shrunk: that churn page-faulted ~2 ms per MiB."""
        data, pos = self._cdata, self._cpos
        if len(data) - pos >= k:
            self._cpos = pos + k
            return memoryview(data)[pos:pos + k]
        have = len(data) - pos
        parts = [memoryview(data)[pos:]] if have else []
        while True:
            chunk = await self._raw.read(GULP)
            if not chunk:
                self._cdata, self._cpos = b"", 0
                if have or parts:
                    REFUSALS.count("noise", "truncated")
                    raise IncompleteReadError("stream ended inside a Noise message",
                                              expected_bytes=k, received_bytes=have)
                return None
            if have + len(chunk) >= k:
                cut = k - have
                parts.append(memoryview(chunk)[:cut])
                self._cdata, self._cpos = chunk, cut
                return b"".join(parts)
            parts.append(chunk)
            have += len(chunk)

    async def _next_message(self) -> bool:
        """Decrypt the next message into _pt; False at a clean end of stream."""
        head = await self._take(2)
        if head is None:
            return False
        size = head[0] << 8 | head[1]
        if size < TAG:
            REFUSALS.count("noise", "short-message")
            raise NoiseMessageError(f"Noise message of {size} bytes is shorter than its tag")
        body = await self._take(size)
        if body is None:
            REFUSALS.count("noise", "truncated")
            raise IncompleteReadError("stream ended after a Noise length", expected_bytes=size)
        if self._open_n >= MAX_NONCE:
            raise NoiseMessageError("Noise nonces exhausted")
        try:
            self._pt = self._open_aead.decrypt(_nonce(self._open_n), body, None)
        except InvalidTag:
            REFUSALS.count("noise", "bad-tag")
            raise NoiseMessageError("Noise message failed authentication") from None
        self._open_n += 1
        self._pos = 0
        return True

    async def read_piece(self, n: int):
        """Exactly ``n`` plaintext bytes: a view into the message when they are at
        least half of it (no copy; a view keeps the whole message alive, so a
        small piece is copied: what a peer makes us hold stays within 2x its
        bytes), else bytes."""
        if len(self._pt) - self._pos >= n:
            pos = self._pos
            self._pos = pos + n
            if 2 * n >= len(self._pt):
                return memoryview(self._pt)[pos:pos + n]
            return self._pt[pos:pos + n]
        out = bytearray()
        await self.read_into(out, n)
        return bytes(out)

    async def read_into(self, dest: bytearray, n: int) -> None:
        """Append exactly ``n`` plaintext bytes to ``dest``."""
        while n:
            avail = len(self._pt) - self._pos
            if not avail:
                if not await self._next_message():
                    raise IncompleteReadError("connection closed", expected_bytes=n)
                continue
            take = min(avail, n)
            with memoryview(self._pt) as view:
                dest += view[self._pos:self._pos + take]
            self._pos += take
            n -= take

    async def read_exactly(self, n: int) -> bytes:
        avail = len(self._pt) - self._pos
        if not avail and await self._next_message():  # a yamux header opens the next message
            avail = len(self._pt)
        if avail >= n:
            out = self._pt[self._pos:self._pos + n]
            self._pos += n
            return out
        out = bytearray()
        await self.read_into(out, n)
        return bytes(out)

    async def read(self, n: int | None = None) -> bytes:
        """As the stock session: n=None, the rest of a message; else exactly n bytes
        (fewer only when the connection closes after some)."""
        if n == 0:
            return b""
        if not self.buffered() and not await self._next_message():
            raise ConnectionClosedError("Connection closed")
        if n is None:
            out = self._pt[self._pos:]
            self._pos = len(self._pt)
            return out
        out = bytearray()
        try:
            await self.read_into(out, n)
        except IncompleteReadError:
            if not out:
                raise ConnectionClosedError("Connection closed") from None
        return bytes(out)

    # -- writing ---------------------------------------------------------------
    def _seal(self, data) -> bytearray:
        """``data`` as Noise messages of at most MAX_PLAINTEXT bytes each, in one buffer."""
        size = len(data)
        count = max(1, -(-size // MAX_PLAINTEXT))  # an empty write is one empty message
        if self._seal_n + count >= MAX_NONCE:
            raise NoiseMessageError("Noise nonces exhausted")
        out = bytearray(size + count * (2 + TAG))
        src, dst = memoryview(data), memoryview(out)
        pos = 0
        for off in range(0, count * MAX_PLAINTEXT, MAX_PLAINTEXT):
            part = src[off:off + MAX_PLAINTEXT]
            length = len(part) + TAG
            out[pos], out[pos + 1] = length >> 8, length & 0xFF
            self._seal_aead.encrypt_into(_nonce(self._seal_n), part, None,
                                         dst[pos + 2:pos + 2 + length])
            self._seal_n += 1
            pos += 2 + length
        src.release()
        dst.release()
        return out

    async def write(self, data: bytes) -> None:
        async with self._wlock:
            await self._raw.write(self._seal(data))


class LeanNoiseTransport(NoiseTransport):
    """py-libp2p's Noise transport (handshake unchanged) handing out lean sessions."""

    @staticmethod
    def _lean(session):
        return LeanNoiseSession(session) if LeanNoiseSession.applies(session) else session

    async def secure_inbound(self, conn):
        return self._lean(await super().secure_inbound(conn))

    async def secure_outbound(self, conn, peer_id):
        return self._lean(await super().secure_outbound(conn, peer_id))
