"""virtio-blk and NVMe open and size their backing files alike: the same words for the same mistake."""
import logging
import os

import pytest

from exitless.devices.nvme.namespace import Namespace, NamespaceError
from exitless.devices.virtio.blk import BackingFileError, BackingFileMissing, VirtioBlk


def test_same_message_for_disk_and_nvme(tmp_path):
    missing, folder = tmp_path / "missing.img", tmp_path
    with pytest.raises(BackingFileMissing) as blk:
        VirtioBlk(missing)
    with pytest.raises(NamespaceError) as nvme:
        Namespace(missing)
    assert str(blk.value) == f"{missing}: virtio-blk backing file does not exist"
    assert str(nvme.value) == f"{missing}: NVMe backing file does not exist"
    with pytest.raises(BackingFileError) as blk:
        VirtioBlk(folder)
    with pytest.raises(NamespaceError) as nvme:
        Namespace(folder)
    assert str(blk.value) == f"{folder}: virtio-blk backing file: Is a directory"
    assert str(nvme.value) == f"{folder}: NVMe backing file: Is a directory"


def test_image_smaller_than_a_block_is_refused(tmp_path):
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(bytes(100))
    with pytest.raises(BackingFileError, match="100 bytes is smaller than one 512-byte block"):
        VirtioBlk(tiny)
    with pytest.raises(NamespaceError, match="smaller than one 512-byte block"):
        Namespace(tiny)
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    with pytest.raises(NamespaceError, match="1000 bytes is smaller than one 4096-byte block"):
        Namespace(odd, lba_size=4096)


def test_partial_tail_is_reported(tmp_path, caplog):
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    with caplog.at_level(logging.WARNING):
        dev = VirtioBlk(odd)
    try:
        assert dev.capacity == 1
    finally:
        dev.close()
    assert "last 488 bytes are not visible to the guest" in caplog.text
    os.truncate(odd, 4096)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Namespace(odd, lba_size=4096).close()
    assert caplog.text == ""
