"""Full disks, with real daemons whose homes sit on small tmpfs mounts made by
the test: the daemon stays up, says why (status, doctor, the job's error),
stops advertising what it cannot serve, loses no output, and serves again
once space is back. Plus the bounded, evicting blob cache."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemons import DaemonCluster, wait_for
from jobs_helpers import (CONSUMER_ONLY, COUNTER_WASM, PROBE_WASM, ensure_assets, job, output,
                          providers_in_book, refused, submit, wait_job)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"this machine lets us mount no tmpfs: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC: the disk is now full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 20, 4096, 512):
            try:
                while True:
                    f.write(b"\xa5" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def padded_wasm(dest: Path, pad: int, tag: str) -> Path:
    """probe.wasm plus a custom section of ``pad`` bytes: still valid, a distinct sha256."""
    def u32(n: int) -> bytes:  # LEB128 in its 5-byte form (wasm allows the padding)
        return bytes((n >> 7 * i) & 0x7F | (0x80 if i < 4 else 0) for i in range(5))
    name = f"pad-{tag}".encode()
    content = u32(len(name)) + name + os.urandom(pad)
    dest.write_bytes(PROBE_WASM.read_bytes() + b"\x00" + u32(len(content)) + content)
    return dest


@contextmanager
def mesh_with_home_on_tmpfs(tmp_path: Path, on: str, size: str, consumer_config: str = "",
                            provider_config: str = ""):
    """A consumer and one provider, the home of ``on`` on its own tmpfs of ``size``."""
    ensure_assets()
    cluster = DaemonCluster(tmp_path)
    home = tmp_path / on
    with tmpfs(home, size):
        try:
            consumer = cluster.start("consumer", config=CONSUMER_ONLY + consumer_config)
            prov = cluster.start("p0", bootstrap=consumer.p2p_addrs(), config=provider_config)
            pid = prov.status()["peer_id"]
            wait_for(lambda: pid in providers_in_book(consumer), 40, what="the provider's ask")
            yield consumer, prov, home
        finally:
            cluster.stop_all()


def storage(d) -> dict:
    return d.status()["storage"]


def doctor(d) -> dict:
    res = d.cli("doctor", "--json", check=False)
    return json.loads(res.stdout)


def test_full_provider_withdraws_its_asks_says_why_and_serves_again(tmp_path):
    with mesh_with_home_on_tmpfs(tmp_path, "p0", "32m",
                                 provider_config="[storage]\nmin_free_bytes = 4194304\n") as (consumer, prov, home):
        pid = prov.status()["peer_id"]
        assert storage(prov)["ok"] is True
        running = submit(consumer, str(PROBE_WASM), "--", "sleep", "4")
        wait_for(lambda: job(consumer, running)["state"] == "running", 60, what="a task running")

        filler = fill(home)
        st = wait_for(lambda: (s := storage(prov))["ok"] is False and s, 10, what="storage not ok")
        assert "free" in st["reason"] or "disk full" in st["reason"]
        checks = {c["name"]: c for c in doctor(prov)["checks"]}
        assert checks["storage"]["ok"] is False and checks["storage"]["reason"]
        # Asks withdrawn: the consumer's book no longer offers this provider.
        wait_for(lambda: pid not in providers_in_book(consumer), 20, what="the asks withdrawn")
        # A write the disk refuses is a clear answer, never a 500.
        res = prov.cli("pause", check=False)
        assert res.returncode == 0 or "storage full" in res.stderr, res.stderr
        if res.returncode == 0:
            prov.cli("resume", check=False)
        # The task that was running ends and settles on the full disk; the provider stays up.
        assert wait_job(consumer, running)["state"] == "succeeded"
        assert output(consumer, running) == "sleeping\n"
        assert prov.proc.poll() is None, prov.log()[-2000:]

        filler.unlink()
        wait_for(lambda: storage(prov)["ok"], 10, what="storage healthy again")
        if prov.status()["paused"]:
            prov.cli("resume")
        wait_for(lambda: pid in providers_in_book(consumer), 30, what="the asks back")
        res = consumer.cli("run", str(PROBE_WASM), "--", "hello", timeout=90)
        assert res.stdout == "hello, wasm\n"


def test_an_upload_the_provider_disk_cannot_hold_fails_the_job_naming_the_disk(tmp_path):
    with mesh_with_home_on_tmpfs(tmp_path, "p0", "24m", consumer_config="[jobs]\nplacement_timeout_s = 4.0\n",
                                 provider_config="[storage]\nmin_free_bytes = 4194304\n") as (consumer, prov, home):
        big = padded_wasm(tmp_path / "big.wasm", 28 << 20, "big")
        job_id = submit(consumer, str(big), "--", "hello")
        j = wait_job(consumer, job_id, timeout=60)
        assert j["state"] == "failed"
        assert "provider storage full" in j["error"], j["error"]
        assert "stream closed" not in j["error"]
        # Refused up front: nothing of it was written, and the provider is fine.
        assert not list((home / "artifacts").glob("*.part"))
        assert refused(prov, "transfer", "storage-full") >= 1
        assert storage(prov)["ok"] is True and prov.proc.poll() is None


def test_blob_cache_evicts_least_recently_used_but_never_a_running_tasks(tmp_path):
    ensure_assets()
    limit = 2 << 20
    with DaemonCluster(tmp_path) as cluster:
        consumer = cluster.start("consumer", config=CONSUMER_ONLY)
        prov = cluster.start("p0", bootstrap=consumer.p2p_addrs(),
                             config=f"[storage]\ncache_max_bytes = {limit}\n")
        wait_for(lambda: prov.status()["peer_id"] in providers_in_book(consumer), 40, what="the ask")
        blobs = prov.home / "artifacts"
        # A long task whose artefact must survive every eviction while it runs.
        sleeper = padded_wasm(tmp_path / "sleeper.wasm", 900 << 10, "sleeper")
        sleeping = submit(consumer, "--cpus", "0.5", str(sleeper), "--", "sleep", "120")
        wait_for(lambda: job(consumer, sleeping)["state"] == "running", 60, what="the sleeper running")
        shas = []
        for i in range(3):
            mod = padded_wasm(tmp_path / f"m{i}.wasm", 900 << 10, f"m{i}")
            jid = submit(consumer, "--cpus", "0.5", str(mod), "--", "hello")
            assert wait_job(consumer, jid)["state"] == "succeeded"
            assert output(consumer, jid) == "hello, wasm\n"
            shas.append(_sha(mod))
            wait_for(lambda: sum(p.stat().st_size for p in blobs.iterdir()) <= limit, 10,
                     what="the cache back under its limit")
        present = {p.name for p in blobs.iterdir()}
        assert _sha(sleeper) in present, "a running task's artefact was evicted"
        assert shas[0] not in present and shas[-1] in present  # least recently used went first
        assert storage(prov)["cache"]["evicted"] >= 2
        assert job(consumer, sleeping)["state"] == "running"
        consumer.cli("cancel", sleeping)


def _sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_consumer_keeps_every_byte_of_output_and_recovers(tmp_path):
    count = 20_000
    with mesh_with_home_on_tmpfs(tmp_path, "consumer", "24m",
                                 consumer_config="[storage]\nmin_free_bytes = 1048576\n"
                                 "[jobs]\ncheckpoint_interval_s = 3600.0\n") as (consumer, prov, home):
        job_id = submit(consumer, "-e", f"COUNT={count}", "-e", "WORK=2000", str(COUNTER_WASM))
        wait_for(lambda: job(consumer, job_id)["state"] == "running", 60, what="running")
        filler = fill(home)
        wait_for(lambda: storage(consumer)["ok"] is False, 10, what="consumer storage not ok")
        # New work is refused with the reason; the daemon stays up.
        res = consumer.cli("run", "--detach", str(PROBE_WASM), check=False)
        assert res.returncode != 0 and "storage full" in res.stderr, res.stderr
        checks = {c["name"]: c for c in doctor(consumer)["checks"]}
        assert checks["storage"]["ok"] is False
        wait_for(lambda: "disk full" in (storage(consumer)["reason"] or ""), 30,
                 what="a write refused by the full disk")
        assert consumer.proc.poll() is None
        filler.unlink()
        wait_for(lambda: storage(consumer)["ok"], 15, what="storage healthy again")
        j = wait_job(consumer, job_id, timeout=120)
        assert j["exit_code"] is not None, j
        lines = output(consumer, job_id).splitlines()
        steps = [int(m[1]) for line in lines if (m := re.match(r"step (\d+) acc ", line))]
        assert steps == list(range(1, count + 1)), "output lost or duplicated"
        assert lines[-1].startswith(f"done steps={count} ")
        assert consumer.proc.poll() is None


async def test_disk_filling_during_an_upload_is_answered_not_a_closed_stream(tmp_path):
    """The receiver passed the up-front check, then its disk filled mid-upload: it reads
    the rest, drops the partial file, and the sender hears "provider storage full"."""
    import trio
    import trio.testing

    from synord.protocols.envelope import EnvelopeValidator, seal
    from synord.protocols.framing import FramedStream
    from synord.protocols.identity import Identity
    from synord.protocols.transfer import BlobStore, TransferError, receive_file, send_file
    from test_mesh import _Mem  # a trio in-memory byte stream as our framing's ByteStream

    sender = Identity.generate()
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 << 20))
    sha = _sha(blob)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        store = BlobStore(disk / "artifacts")
        a, b = trio.testing.memory_stream_pair()
        validator = EnvelopeValidator()
        offer = seal(sender, "blob.offer", {"sha256": sha, "size": 3 << 20, "kind": "artifact"})

        async def allow(peer, offer):
            return None

        outcome = {}

        async def receiver():
            with pytest.raises(TransferError) as exc:
                await receive_file(FramedStream(_Mem(b), remote_peer=sender.peer_id), store,
                                   validator.check, allow)
            outcome["receiver"] = exc.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            with pytest.raises(TransferError) as sent:
                await send_file(FramedStream(_Mem(a)), offer.encode(), blob)
        assert "provider storage full" in str(sent.value)
        assert isinstance(outcome["receiver"].__cause__, OSError)
        assert not list(store.dir.iterdir())  # the partial file is gone, the disk usable again
        # the handler counts it under this slug (the wire test above checks /metrics)
        assert outcome["receiver"].slug == "storage-full"
