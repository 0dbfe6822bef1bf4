"""A doorbell device that, once rung with 0xBAD, makes a forbidden system call (for test_confine.py)."""
import socket

from exitless.devices.doorbell import DoorbellDevice


class ForbiddenDevice(DoorbellDevice):
    def on_doorbell(self, reg, value):
        if value == 0xBAD:
            socket.socket()          # a new socket: not in a confined back-end's allow-list
        super().on_doorbell(reg, value)
