/* guestkit: PCI type-1 configuration access, BARs, capabilities, MSI-X */
#ifndef GK_PCI_H
#define GK_PCI_H
#include "gk.h"

#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_HEADER_TYPE 0x0E
#define PCI_BAR0 0x10
#define PCI_CAP_PTR 0x34
#define PCI_CMD_IO 0x1
#define PCI_CMD_MEM 0x2
#define PCI_CMD_MASTER 0x4
#define PCI_CMD_INTX_DISABLE 0x400
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_ID_MSIX 0x11
#define PCI_CAP_ID_VNDR 0x09

struct pci_dev {
    u8 bus, dev, fn;
    u16 vendor, device;
    u64 bar[6];      /* memory BAR base (0 if none / not yet known) */
    bool bar_valid[6];
    bool bar_64[6];
    bool bar_io[6];
    u16 msix_cap;    /* config offset of the MSI-X capability, 0 if none */
    u16 msix_n;      /* table size */
    uptr msix_table; /* MMIO address of the table */
};

u32 pci_cfg_read32(const struct pci_dev *d, u16 off);
u16 pci_cfg_read16(const struct pci_dev *d, u16 off);
u8 pci_cfg_read8(const struct pci_dev *d, u16 off);
void pci_cfg_write32(const struct pci_dev *d, u16 off, u32 v);
void pci_cfg_write16(const struct pci_dev *d, u16 off, u16 v);

/* find the index'th function on bus 0 with vendor:device; false if none */
bool pci_find(u16 vendor, u16 device, u32 index, struct pci_dev *out);
/* address of memory BAR i; sizes and programs it from the free window when it
 * is 0 or lies above the 4 GiB identity map */
u64 pci_bar_addr(struct pci_dev *d, u32 i);
void pci_enable(struct pci_dev *d); /* memory decode + bus master, INTx off */
/* next capability offset with the given id after 'after' (0: first); 0 if none */
u16 pci_find_cap(const struct pci_dev *d, u8 id, u16 after);

/* MSI-X: enable with all entries masked, then program entries */
bool msix_init(struct pci_dev *d);
void msix_set(struct pci_dev *d, u32 entry, u32 apic_id, u8 vector);
extern u64 pci_bar_window; /* next free address for BAR assignment */
extern u32 pci_bars_assigned;
extern bool pci_force_assign; /* testing aid: reassign every BAR that is used */

#endif
