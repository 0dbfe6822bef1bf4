"""A doorbell device that, once rung with 0xBAD, makes a forbidden system call (for test_confine.py)."""
import socket

from exitless.devices.doorbell import DoorbellDevice


class ForbiddenDevice(DoorbellDevice):
    def on_doorbell(self, reg, value):
        if value == 0xBAD:
            socket.socket()          # a new socket: not in a confined back-end's allow-list
        super().on_doorbell(reg, value)


def serve_net_main(argv):
    """``exitless <argv>`` (``serve net ...``) with one planted flaw: a vhost-user GET_CONFIG at
    offset 0xBA (with 3 bytes) makes the device model open a socket, as a taken-over model might."""
    from exitless.cli import main
    from exitless.devices.virtio.net import VirtioNet

    read_config = VirtioNet.read_config

    def planted(self, offset, length):
        if (offset, length) == (0xBA, 3):
            socket.socket()
        return read_config(self, offset, length)

    VirtioNet.read_config = planted
    return main(argv)
