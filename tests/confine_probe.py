"""A doorbell device that, once rung with 0xBAD, makes a forbidden system call (for test_confine.py)."""
import socket

from exitless.devices.doorbell import DoorbellDevice


class ForbiddenDevice(DoorbellDevice):
    def on_doorbell(self, reg, value):
        if value == 0xBAD:
            socket.socket()          # a new socket: not in a confined back-end's allow-list
        super().on_doorbell(reg, value)



def serve_main(argv):
    """``exitless <argv>`` (``serve blk|net ...``) with one planted flaw: a vhost-user GET_CONFIG of
    3 bytes at offset 0xBA makes the device model open a socket, as a taken-over model might."""
    from exitless.cli import main
    from exitless.devices.virtio.device import VirtioDevice

    read_config = VirtioDevice.read_config

    def planted(self, offset, length):
        if (offset, length) == (0xBA, 3):
            socket.socket()
        return read_config(self, offset, length)

    VirtioDevice.read_config = planted
    return main(argv)
