/* guestkit: PCI (bus 0) via configuration mechanism #1 (ports 0xCF8/0xCFC) */
#include "pci.h"

u64 pci_bar_window = 0xE0000000ULL;
bool pci_force_assign;
u32 pci_bars_assigned;

static u32 cfg_addr(const struct pci_dev *d, u16 off)
{
    return 0x80000000u | ((u32)d->bus << 16) | ((u32)d->dev << 11) | ((u32)d->fn << 8) |
           (off & 0xFC);
}

u32 pci_cfg_read32(const struct pci_dev *d, u16 off)
{
    outl(0xCF8, cfg_addr(d, off));
    return inl(0xCFC);
}

u16 pci_cfg_read16(const struct pci_dev *d, u16 off)
{
    outl(0xCF8, cfg_addr(d, off));
    return inw(0xCFC + (off & 2));
}

u8 pci_cfg_read8(const struct pci_dev *d, u16 off)
{
    outl(0xCF8, cfg_addr(d, off));
    return inb(0xCFC + (off & 3));
}

void pci_cfg_write32(const struct pci_dev *d, u16 off, u32 v)
{
    outl(0xCF8, cfg_addr(d, off));
    outl(0xCFC, v);
}

void pci_cfg_write16(const struct pci_dev *d, u16 off, u16 v)
{
    outl(0xCF8, cfg_addr(d, off));
    outw(0xCFC + (off & 2), v);
}

bool pci_find(u16 vendor, u16 device, u32 index, struct pci_dev *out)
{
    struct pci_dev d;
    memset(&d, 0, sizeof(d));
    for (u32 dev = 0; dev < 32; dev++) {
        d.dev = dev;
        d.fn = 0;
        u32 id = pci_cfg_read32(&d, PCI_VENDOR_ID);
        if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
            continue;
        u32 nfn = (pci_cfg_read8(&d, PCI_HEADER_TYPE) & 0x80) ? 8 : 1;
        for (u32 fn = 0; fn < nfn; fn++) {
            d.fn = fn;
            if (fn)
                id = pci_cfg_read32(&d, PCI_VENDOR_ID);
            if ((id & 0xffff) == 0xffff)
                continue;
            if ((id & 0xffff) == vendor && (id >> 16) == device) {
                if (index--)
                    continue;
                d.vendor = vendor;
                d.device = device;
                *out = d;
                return true;
            }
        }
    }
    return false;
}

u16 pci_find_cap(const struct pci_dev *d, u8 id, u16 after)
{
    if (!(pci_cfg_read16(d, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return 0;
    u16 off = after ? (pci_cfg_read8(d, after + 1) & 0xFC) : (pci_cfg_read8(d, PCI_CAP_PTR) & 0xFC);
    for (int guard = 0; off && guard < 48; guard++) {
        u16 w = pci_cfg_read16(d, off); /* id | next << 8 */
        if ((w & 0xff) == id)
            return off;
        off = (w >> 8) & 0xFC;
    }
    return 0;
}

u64 pci_bar_addr(struct pci_dev *d, u32 i)
{
    if (i > 5)
        panic("pci: bad BAR index %u", i);
    if (d->bar_valid[i])
        return d->bar[i];
    u16 off = PCI_BAR0 + 4 * i;
    u32 lo = pci_cfg_read32(d, off);
    if (lo & 1) {
        d->bar_io[i] = true;
        d->bar[i] = lo & ~3u;
        d->bar_valid[i] = true;
        return d->bar[i];
    }
    bool is64 = ((lo >> 1) & 3) == 2;
    if (is64 && i == 5)
        panic("pci: 64-bit BAR5");
    u64 base = lo & ~0xFULL;
    if (is64)
        base |= (u64)pci_cfg_read32(d, off + 4) << 32;
    d->bar_64[i] = is64;
    if (base == 0 || base >= 0x100000000ULL || pci_force_assign) {
        /* size it with decoding off, then place it in the free window */
        u16 cmd = pci_cfg_read16(d, PCI_COMMAND);
        pci_cfg_write16(d, PCI_COMMAND, cmd & ~(PCI_CMD_MEM | PCI_CMD_IO));
        pci_cfg_write32(d, off, 0xFFFFFFFF);
        u32 m = pci_cfg_read32(d, off) & ~0xFu;
        u64 size = (u64)(~m + 1u);
        if (is64) {
            pci_cfg_write32(d, off + 4, 0xFFFFFFFF);
            u32 mh = pci_cfg_read32(d, off + 4);
            if (mh != 0xFFFFFFFF)
                panic("pci %02x:%02x.%x BAR%u larger than 4 GiB", d->bus, d->dev, d->fn, i);
        }
        if (!m)
            panic("pci %02x:%02x.%x BAR%u not implemented", d->bus, d->dev, d->fn, i);
        if (size < 4096)
            size = 4096;
        base = ALIGN_UP(pci_bar_window, size);
        if (base + size > 0xFEC00000ULL)
            panic("pci: BAR window exhausted");
        pci_bar_window = base + size;
        pci_cfg_write32(d, off, (u32)base | (lo & 0xF));
        if (is64)
            pci_cfg_write32(d, off + 4, 0);
        pci_cfg_write16(d, PCI_COMMAND, cmd);
        pci_bars_assigned++;
        printf("guestkit: pci %02x:%02x.%x BAR%u assigned %#llx size %#llx\n", d->bus, d->dev,
               d->fn, i, base, size);
    }
    d->bar[i] = base;
    d->bar_valid[i] = true;
    return base;
}

void pci_enable(struct pci_dev *d)
{
    u16 cmd = pci_cfg_read16(d, PCI_COMMAND);
    u16 want = cmd | PCI_CMD_MEM | PCI_CMD_MASTER | PCI_CMD_INTX_DISABLE;
    if (want != cmd)
        pci_cfg_write16(d, PCI_COMMAND, want);
}

#define MSIX_CTRL_ENABLE 0x8000
#define MSIX_CTRL_MASKALL 0x4000

bool msix_init(struct pci_dev *d)
{
    u16 cap = pci_find_cap(d, PCI_CAP_ID_MSIX, 0);
    if (!cap)
        return false;
    u16 ctrl = pci_cfg_read16(d, cap + 2);
    u32 tbl = pci_cfg_read32(d, cap + 4);
    d->msix_cap = cap;
    d->msix_n = (ctrl & 0x7FF) + 1;
    d->msix_table = (uptr)(pci_bar_addr(d, tbl & 7) + (tbl & ~7u));
    /* enable with the function masked, mask every entry, then unmask function */
    pci_cfg_write16(d, cap + 2, ctrl | MSIX_CTRL_ENABLE | MSIX_CTRL_MASKALL);
    for (u32 i = 0; i < d->msix_n; i++)
        mmio_w32(d->msix_table + 16 * i + 12, 1);
    pci_cfg_write16(d, cap + 2, (ctrl | MSIX_CTRL_ENABLE) & ~MSIX_CTRL_MASKALL);
    return true;
}

void msix_set(struct pci_dev *d, u32 entry, u32 apic_id, u8 vector)
{
    if (entry >= d->msix_n)
        panic("msix entry %u >= table size %u", entry, d->msix_n);
    uptr e = d->msix_table + 16 * entry;
    mmio_w32(e + 12, 1);                                   /* mask while editing */
    mmio_w32(e + 0, 0xFEE00000u | ((apic_id & 0xff) << 12)); /* fixed, physical */
    mmio_w32(e + 4, 0);
    mmio_w32(e + 8, vector);                               /* edge, fixed */
    mmio_w32(e + 12, 0);                                   /* unmask */
}
