/*
 * A small virtio-mmio driver (virtio 1.2 §4.2, modern only) for the test guest, written to run in
 * ring 3: it touches only memory and MMIO (no port I/O, no privileged instructions), so on KVM on
 * PVM it runs at native speed. What it finds it writes into vlog[], which ring 0 prints.
 * Split virtqueues in guest RAM (physical = virtual: the identity map), VIRTIO_F_VERSION_1 and
 * VIRTIO_F_EVENT_IDX negotiated; completions are polled from the used ring, and the device's
 * interrupt is counted by a ring-0 handler (virtio_irq_handler) that acknowledges it.
 */
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define VIRTIO_MAX_DEVICES 8
#define VIRTIO_MAX_QUEUES 3
#define VIRTIO_QUEUE_SIZE 16

struct vq {
    u16 size;
    u16 index;
    volatile u8 *desc;  /* struct virtq_desc[size] */
    volatile u8 *avail; /* flags, idx, ring[size], used_event */
    volatile u8 *used;  /* flags, idx, {id, len}[size], avail_event */
    u16 avail_idx;      /* next avail->idx */
    u16 last_used;      /* used entries consumed */
};

struct vdev {
    u64 base;
    u32 size;
    u32 irq;
    u32 device_id; /* 0 until probed */
    u64 features;  /* negotiated */
    struct vq q[VIRTIO_MAX_QUEUES];
    u32 nq;
    volatile u64 irqs; /* interrupts taken (virtio_irq_handler, ring 0) */
};

/* Filled by ring 0 from the command line's virtio_mmio.device= words. */
extern struct vdev vdevs[VIRTIO_MAX_DEVICES];
extern u32 nvdevs;

/* What ring 3 reports: lines of text, and whether every check passed. */
extern char vlog[8192];
extern u32 vlog_len;
extern int vresult; /* 1 ok, 0 failed */

/* Set before a ring-3 entry point: completions are looked for only after the device's interrupt,
   as a Linux driver does (skiff.test=virtio-vsock-irq); a completion that came without one is
   counted in virtio_irq_stalls. 0: the used rings are polled (the interrupt is only counted). */
extern int virtio_irq_driven;
extern u64 virtio_irq_stalls, virtio_irq_waits;
/* The ring-0 handler ignores this many interrupts (no ACK, not counted), as if their edges had
   been lost (skiff.test=virtio-vsock-irq-drop): the transport must signal again at the next cause. */
extern volatile u32 virtio_irq_drop, virtio_irq_dropped;

/* Ring 3 entry points (ring3_fn). Each fills vlog and vresult. */
void virtio_rng_ring3(void);
void virtio_blk_ring3(void);
void virtio_vsock_ring3(void);
void virtio_hostile_ring3(void);

/* Ring 0, from the device interrupt: acknowledge every device's InterruptStatus. */
void virtio_irq_handler(void);
