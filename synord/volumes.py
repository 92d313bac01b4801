"""Named volumes: a service's data that outlives its sandbox.

On the provider a volume is a directory ``<home>/volumes/<consumer key>/<name>``:
the consumer key is a digest of the consumer's peer id (never the id itself in
a path), the name passed `check_name` (a short lowercase word, never a path).
A volume is bind-mounted read-write into a container at the path the consumer
asked for (`check_mount_path`); a restart of the service on the same provider
finds it as it was left.  To travel with a migrating service it is packed as
a deterministic, content-addressed tar (`synord.jobs.checkpoints.pack`) that
goes over /synord/transfer like a checkpoint, and is unpacked, digest
checked, on the next provider.

MicroVMs get no volumes: the guest has no shared filesystem yet (the runtime
refuses host mounts), so `synord run --service --runtime microvm --volume …`
is refused at submit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from synord.jobs.checkpoints import pack, unpack
from synord.protocols.servicespec import VolumeError, check_name

DEFAULT_QUOTA_BYTES = 1 << 30  # per consumer, all its volumes together

def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class Volumes:
    """The provider's volumes, per consumer (all state is the directory tree)."""

    def __init__(self, root: Path, quota_bytes: int = DEFAULT_QUOTA_BYTES):
        self.root = Path(root)
        self.quota_bytes = quota_bytes

    def _consumer_dir(self, consumer: str) -> Path:
        return self.root / hashlib.sha256(consumer.encode()).hexdigest()[:32]

    def path(self, consumer: str, name: str) -> Path:
        """The volume's directory (made if new)."""
        d = self._consumer_dir(consumer) / check_name(name)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o777)  # the sandbox's user is not ours
        return d

    def used(self, consumer: str) -> int:
        d = self._consumer_dir(consumer)
        return dir_size(d) if d.exists() else 0

    def check_quota(self, consumer: str, adding: int = 0) -> None:
        used = self.used(consumer)
        if used + adding > self.quota_bytes:
            raise VolumeError(f"volume quota exceeded: {used + adding} of {self.quota_bytes} bytes",
                              "volume_quota")

    def sizes(self, consumer: str, names) -> dict[str, int]:
        d = self._consumer_dir(consumer)
        return {n: dir_size(d / n) if (d / n).exists() else 0 for n in names}

    def pack(self, consumer: str, name: str, dest_tar: Path) -> tuple[str, int]:
        """The volume as one content-addressed tar (sha256, bytes)."""
        return pack(self.path(consumer, name), dest_tar)

    def restore(self, consumer: str, name: str, tar: Path, expected_sha: str) -> Path:
        """Replace the volume with the contents of ``tar`` (digest checked first)."""
        d = self.path(consumer, name)
        tmp = self.root / f".restoring-{d.parent.name}-{d.name}"  # outside the consumer's quota
        shutil.rmtree(tmp, ignore_errors=True)
        unpack(tar, tmp, expected_sha=expected_sha)
        self.check_quota(consumer, dir_size(tmp) - dir_size(d))
        shutil.rmtree(d)
        tmp.rename(d)
        os.chmod(d, 0o777)
        return d
