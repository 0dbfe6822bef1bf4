"""GSI routing on KVM's in-kernel irqchip: the legacy pins plus one MSI route per vector.

``KVM_SET_GSI_ROUTING`` replaces the whole table, so the router keeps the
default PIC/IOAPIC routes and rewrites them with every MSI change.  An MSI
vector is delivered by writing its irqfd (an eventfd KVM listens on), which
works from any thread or process without a VM exit.
"""
from __future__ import annotations

import os
import threading

from ..kvm import constants as C
from ..kvm import structs as S

IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS


def _irqchip(gsi: int, chip: int, pin: int) -> S.kvm_irq_routing_entry:
    e = S.kvm_irq_routing_entry(gsi=gsi, type=C.KVM_IRQ_ROUTING_IRQCHIP)
    e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
    return e


def default_routes() -> list[S.kvm_irq_routing_entry]:
    """KVM's own defaults: GSI 0-15 to the 8259 pair and the IOAPIC, 16-23 to the IOAPIC."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 16:
            routes.append(_irqchip(gsi, C.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else C.KVM_IRQCHIP_PIC_SLAVE, gsi % 8))
        routes.append(_irqchip(gsi, C.KVM_IRQCHIP_IOAPIC, gsi))
    return routes


class MsiVector:
    """One MSI(-X) vector: a GSI with an MSI route and an irqfd."""

    def __init__(self, router: "IrqRouter", gsi: int):
        self.router = router
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.address = 0
        self.data = 0
        router.vm.irqfd(self.fd, gsi)

    def program(self, address: int, data: int) -> None:
        if (address, data) != (self.address, self.data):
            self.address, self.data = address, data
            self.router.commit()

    def fire(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            self.router.vm.irqfd(self.fd, self.gsi, deassign=True)
            os.close(self.fd)
            self.fd = -1


class IrqRouter:
    def __init__(self, vm):
        self.vm = vm
        self._lock = threading.Lock()
        self._vectors: dict[int, MsiVector] = {}
        self._next_gsi = FIRST_MSI_GSI

    def allocate_msi(self) -> MsiVector:
        with self._lock:
            gsi = self._next_gsi
            self._next_gsi += 1
        vec = MsiVector(self, gsi)
        self._vectors[gsi] = vec
        return vec

    def commit(self) -> None:
        with self._lock:
            routes = default_routes()
            for vec in self._vectors.values():
                if vec.address:
                    e = S.kvm_irq_routing_entry(gsi=vec.gsi, type=C.KVM_IRQ_ROUTING_MSI)
                    e.u.msi.address_lo = vec.address & 0xFFFFFFFF
                    e.u.msi.address_hi = vec.address >> 32
                    e.u.msi.data = vec.data
                    routes.append(e)
            self.vm.set_gsi_routing(routes)

    def close(self) -> None:
        for vec in self._vectors.values():
            vec.close()
        self._vectors.clear()
