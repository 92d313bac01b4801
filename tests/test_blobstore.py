"""The content-addressed blob store under concurrent imports of the same file."""

import threading

from synord.protocols.transfer import BlobStore, sha256_of


def test_concurrent_imports_of_one_file(tmp_path):
    src = tmp_path / "artefact.bin"
    src.write_bytes(b"synord" * 200_000)
    store = BlobStore(tmp_path / "blobs")
    errors, shas = [], []

    def add():
        try:
            shas.append(store.add_file(src))
        except Exception as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)
    threads = [threading.Thread(target=add) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(shas) == {sha256_of(src)}
    assert store.path(shas[0]).read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [shas[0]]  # no temp files left
