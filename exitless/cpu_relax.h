/* cpu_relax(): the spin-wait hint, shared by the C extensions that poll shared memory
 * (exitless/sidecore/_spin.c, exitless/devices/virtio/_vring.c).  PAUSE on x86 lets the sibling
 * hyper-thread run and avoids the memory-order mis-speculation penalty on loop exit. */
#ifndef EXITLESS_CPU_RELAX_H
#define EXITLESS_CPU_RELAX_H

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

#endif
