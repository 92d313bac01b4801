"""Node identity: an Ed25519 key pair and its libp2p peer id.

The peer id is computed here, without importing libp2p (the CLI must start
fast): a libp2p Ed25519 public key is the protobuf ``PublicKey{Type=Ed25519,
Data=<32 bytes>}``; keys that short are wrapped in an *identity* multihash, and
the text form is base58btc ("12D3KooW...").  Because the key is inside the id,
any peer can verify a signature from the sender's peer id alone.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}

# protobuf header of PublicKey{Type: Ed25519 (1), Data: bytes(32)}
_PB_ED25519_PREFIX = b"\x08\x01\x12\x20"
# identity multihash: code 0x00, length 36
_IDENTITY_MH_PREFIX = b"\x00\x24"

KEY_FILE = "identity.key"


class IdentityError(ValueError):
    """A key file or a peer id that cannot be used."""


_B58_TEXT: dict[bytes, str] = {}  # bytes -> text, at most _B58_TEXT_MAX
_B58_TEXT_MAX = 4096


def b58encode(data: bytes) -> str:
    # Cached: the same few peer ids are encoded on every envelope they send
    # (a 36-byte id is ~50 big-int divisions, 0.05-0.15 ms, 4 per negotiation).
    # A plain dict, not lru_cache: a hit is one lookup (lru_cache builds a key
    # tuple for a bytes argument: 3x slower, on every order that arrives).
    # Interned: an order book holds the sender's id once, however many orders.
    text = _B58_TEXT.get(data)
    if text is None:
        if len(_B58_TEXT) >= _B58_TEXT_MAX:
            _B58_TEXT.clear()
        text = _B58_TEXT[data] = sys.intern(_b58encode(data))
    return text


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise IdentityError(f"invalid base58 character {c!r}") from None
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


def peer_id_bytes(public_key: bytes) -> bytes:
    """Binary libp2p peer id (identity multihash) of a raw 32-byte Ed25519 key."""
    if len(public_key) != 32:
        raise IdentityError("Ed25519 public key must be 32 bytes")
    return _IDENTITY_MH_PREFIX + _PB_ED25519_PREFIX + public_key


def peer_id_from_public_key(public_key: bytes) -> str:
    return b58encode(peer_id_bytes(public_key))


def public_key_from_peer_id(peer_id: str | bytes) -> bytes:
    """The Ed25519 key inside a peer id; raises IdentityError for other ids."""
    raw = b58decode(peer_id) if isinstance(peer_id, str) else peer_id
    head = _IDENTITY_MH_PREFIX + _PB_ED25519_PREFIX
    if len(raw) != len(head) + 32 or not raw.startswith(head):
        raise IdentityError("not an Ed25519 identity peer id")
    return raw[len(head):]


def verify(peer_id: str | bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``message`` was made by ``peer_id``'s key."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
        key.verify(signature, message)
        return True
    except (IdentityError, InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    @property
    def peer_id_bytes(self) -> bytes:
        return peer_id_bytes(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def load_or_create(home: Path) -> tuple[Identity, bool]:
    """Load ``home/identity.key`` or create it (mode 0600). Returns (identity, created)."""
    path = Path(home) / KEY_FILE
    if path.exists():
        return load(path), False
    ident = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, ident.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return ident, True


def load(path: Path) -> Identity:
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(f"{path}: key file is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: not an Ed25519 key")
    return Identity(key)
