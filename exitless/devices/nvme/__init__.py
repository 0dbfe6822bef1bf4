"""NVMe: a PCI NVMe controller (NVMe 1.4) with shadow doorbells (Doorbell Buffer Config) on every I/O path."""
