/*
 * The test guest's ring-3 virtio-mmio driver and the virtio tests that use it (virtio.h).
 * Nothing here does port I/O or anything privileged: results go to vlog[], printed by ring 0.
 */
#include "virtio.h"

struct vdev vdevs[VIRTIO_MAX_DEVICES];
u32 nvdevs;
char vlog[8192];
u32 vlog_len;
int vresult;

/* ------------------------------------------------------------------------ */
/* Log (ring 3 cannot reach the UART). */

static void vl_str(const char *s)
{
    while (*s && vlog_len < sizeof(vlog) - 1)
        vlog[vlog_len++] = *s++;
}

static void vl_dec(u64 v)
{
    char b[24];
    int n = 0;
    do {
        b[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && vlog_len < sizeof(vlog) - 1)
        vlog[vlog_len++] = b[--n];
}

static void vl_hex(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    char b[16];
    int n = 0;
    do {
        b[n++] = digits[v & 15];
        v >>= 4;
    } while (v);
    vl_str("0x");
    while (n && vlog_len < sizeof(vlog) - 1)
        vlog[vlog_len++] = b[--n];
}

static void vl_bytes(const u8 *p, u32 n) /* printable bytes up to the first NUL */
{
    for (u32 i = 0; i < n && p[i] && vlog_len < sizeof(vlog) - 1; i++)
        vlog[vlog_len++] = (p[i] >= 0x20 && p[i] < 0x7f) ? (char)p[i] : '?';
}

static void check(int ok, const char *what)
{
    if (!ok) {
        vl_str("FAILED: ");
        vl_str(what);
        vl_str("\n");
        vresult = 0;
    }
}

/* ------------------------------------------------------------------------ */
/* Memory helpers (no libc). */

static void zero(volatile void *p, usize n)
{
    volatile u8 *b = p;
    for (usize i = 0; i < n; i++)
        b[i] = 0;
}

static void copy(void *d, const volatile void *s, usize n)
{
    u8 *a = d;
    const volatile u8 *b = s;
    for (usize i = 0; i < n; i++)
        a[i] = b[i];
}

static int same(const u8 *a, const u8 *b, usize n)
{
    for (usize i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

static usize slen(const char *s)
{
    usize n = 0;
    while (s[n])
        n++;
    return n;
}

#define barrier() __asm__ volatile("" ::: "memory")
#define mb() __asm__ volatile("mfence" ::: "memory")

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* A few seconds at any clock rate this machine has (the TSC runs at 1-4 GHz). */
#define WAIT_TICKS (8ull << 30)

/* ------------------------------------------------------------------------ */
/* virtio-mmio registers (§4.2.2). */

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64

#define F_EVENT_IDX (1ull << 29)
#define F_VERSION_1 (1ull << 32)

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

static volatile u32 *reg(const struct vdev *d, u32 off) { return (volatile u32 *)(usize)(d->base + off); }
static u32 rd(const struct vdev *d, u32 off) { return *reg(d, off); }
static void wr(const struct vdev *d, u32 off, u32 v) { *reg(d, off) = v; }
static u64 cfg64(const struct vdev *d, u32 off)
{
    return rd(d, R_CONFIG + off) | (u64)rd(d, R_CONFIG + off + 4) << 32;
}

int virtio_irq_driven;
u64 virtio_irq_stalls, virtio_irq_waits;
volatile u32 virtio_irq_drop, virtio_irq_dropped;

void virtio_irq_handler(void)
{
    for (u32 i = 0; i < nvdevs; i++) {
        struct vdev *d = &vdevs[i];
        u32 st = rd(d, R_INTERRUPT_STATUS);
        if (st && virtio_irq_drop) {
            /* As if this edge had been lost on its way: not acknowledged, not counted. */
            virtio_irq_drop--;
            virtio_irq_dropped++;
            continue;
        }
        if (st) {
            wr(d, R_INTERRUPT_ACK, st);
            d->irqs++;
        }
    }
}

/* Queue memory: a bump allocator over a static arena (physical = virtual). */
static u8 arena[64 * 1024] __attribute__((aligned(4096)));
static usize arena_used;

static volatile u8 *alloc(usize n, usize align)
{
    arena_used = (arena_used + align - 1) & ~(align - 1);
    if (arena_used + n > sizeof(arena))
        return 0;
    volatile u8 *p = arena + arena_used;
    arena_used += n;
    zero(p, n);
    return p;
}

static volatile u16 *avail_idx_p(struct vq *q) { return (volatile u16 *)(q->avail + 2); }
static volatile u16 *avail_ring(struct vq *q, u16 i) { return (volatile u16 *)(q->avail + 4 + 2 * (u32)i); }
static volatile u16 *used_event_p(struct vq *q) { return (volatile u16 *)(q->avail + 4 + 2 * (u32)q->size); }
static volatile u16 *used_idx_p(struct vq *q) { return (volatile u16 *)(q->used + 2); }
static volatile u32 *used_elem(struct vq *q, u16 i) { return (volatile u32 *)(q->used + 4 + 8 * (u32)i); }
static volatile u16 *avail_event_p(struct vq *q) { return (volatile u16 *)(q->used + 4 + 8 * (u32)q->size); }

/* Probe, reset, negotiate (VERSION_1 and EVENT_IDX required, plus `want`), set up nq queues.
   Returns 1 with DRIVER_OK set, or 0 with the reason in the log. */
static int vdev_init(struct vdev *d, u64 want, u32 nq)
{
    if (rd(d, R_MAGIC) != 0x74726976 || rd(d, R_VERSION) != 2) {
        vl_str("no virtio-mmio v2 device at ");
        vl_hex(d->base);
        vl_str("\n");
        return 0;
    }
    d->device_id = rd(d, R_DEVICE_ID);
    wr(d, R_STATUS, 0);
    wr(d, R_STATUS, S_ACKNOWLEDGE);
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(d, R_DEVICE_FEATURES_SEL, 0);
    u64 offered = rd(d, R_DEVICE_FEATURES);
    wr(d, R_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)rd(d, R_DEVICE_FEATURES) << 32;
    u64 need = F_VERSION_1 | F_EVENT_IDX;
    if ((offered & need) != need) {
        vl_str("device does not offer VERSION_1 and EVENT_IDX: ");
        vl_hex(offered);
        vl_str("\n");
        return 0;
    }
    d->features = offered & (need | want);
    wr(d, R_DRIVER_FEATURES_SEL, 0);
    wr(d, R_DRIVER_FEATURES, (u32)d->features);
    wr(d, R_DRIVER_FEATURES_SEL, 1);
    wr(d, R_DRIVER_FEATURES, (u32)(d->features >> 32));
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(rd(d, R_STATUS) & S_FEATURES_OK)) {
        vl_str("device refused FEATURES_OK\n");
        return 0;
    }
    d->nq = nq;
    for (u32 i = 0; i < nq; i++) {
        struct vq *q = &d->q[i];
        wr(d, R_QUEUE_SEL, i);
        u32 max = rd(d, R_QUEUE_NUM_MAX);
        if (max == 0 || rd(d, R_QUEUE_READY)) {
            vl_str("queue unavailable\n");
            return 0;
        }
        q->size = max < VIRTIO_QUEUE_SIZE ? (u16)max : VIRTIO_QUEUE_SIZE;
        q->index = (u16)i;
        q->desc = alloc(16 * (usize)q->size, 16);
        q->avail = alloc(6 + 2 * (usize)q->size, 2);
        q->used = alloc(6 + 8 * (usize)q->size, 4);
        if (!q->desc || !q->avail || !q->used) {
            vl_str("out of queue memory\n");
            return 0;
        }
        q->avail_idx = q->last_used = 0;
        wr(d, R_QUEUE_NUM, q->size);
        u64 a = (u64)(usize)q->desc, b = (u64)(usize)q->avail, c = (u64)(usize)q->used;
        wr(d, R_QUEUE_DESC, (u32)a);
        wr(d, R_QUEUE_DESC + 4, (u32)(a >> 32));
        wr(d, R_QUEUE_DRIVER, (u32)b);
        wr(d, R_QUEUE_DRIVER + 4, (u32)(b >> 32));
        wr(d, R_QUEUE_DEVICE, (u32)c);
        wr(d, R_QUEUE_DEVICE + 4, (u32)(c >> 32));
        wr(d, R_QUEUE_READY, 1);
    }
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return 1;
}

struct buf {
    const volatile void *addr;
    u32 len;
    int writable;
};

/* Writes the chain into descriptors head.. and makes it available (not yet notified). */
static void vq_add(struct vq *q, u16 head, const struct buf *b, u32 n)
{
    for (u32 i = 0; i < n; i++) {
        volatile u8 *e = q->desc + 16 * (u32)((head + i) % q->size);
        *(volatile u64 *)e = (u64)(usize)b[i].addr;
        *(volatile u32 *)(e + 8) = b[i].len;
        *(volatile u16 *)(e + 12) = (u16)((i + 1 < n ? DESC_F_NEXT : 0) | (b[i].writable ? DESC_F_WRITE : 0));
        *(volatile u16 *)(e + 14) = (u16)((head + i + 1) % q->size);
    }
    *avail_ring(q, q->avail_idx % q->size) = head;
    /* Ask for an interrupt when the next used entry appears (EVENT_IDX, §2.7.10). */
    *used_event_p(q) = q->last_used;
    barrier();
    q->avail_idx++;
    *avail_idx_p(q) = q->avail_idx;
}

static u64 kicks, kicks_suppressed;

/* Notifies the device unless its avail_event says it does not need to hear (vring_need_event). */
static void vq_kick(struct vdev *d, struct vq *q, u16 old)
{
    mb(); /* the avail idx store before the avail_event load */
    u16 event = *avail_event_p(q), now = q->avail_idx;
    if ((u16)(now - event - 1) < (u16)(now - old)) {
        wr(d, R_QUEUE_NOTIFY, q->index);
        kicks++;
    } else {
        kicks_suppressed++;
    }
}



/* How long a used entry may sit in the ring without its interrupt before irq-driven mode calls it
   a stall: far beyond any delivery (microseconds) or a vCPU descheduled on a busy host. */
#define STALL_TICKS (4ull << 30)

/* Interrupt-driven wait, like a Linux driver: look at the used ring once, then only after an
   interrupt from this device. used_event was set (vq_add) before this look, with a full barrier
   between, so an entry the look misses is one the device must interrupt for. An entry that sits
   there STALL_TICKS with no interrupt is a lost interrupt: counted, reported with
   InterruptStatus, and then taken anyway so the run goes on and every stall is counted. */
static int vq_wait_irq(struct vdev *d, struct vq *q, u64 ticks)
{
    u64 seen = d->irqs;
    mb(); /* used_event (and seen) before the used idx load, as virtqueue_enable_cb does */
    if (*used_idx_p(q) != q->last_used)
        return 1;
    virtio_irq_waits++;
    u64 start = rdtsc(), appeared = 0; /* when an entry was first seen there without an interrupt */
    for (;;) {
        u64 now = d->irqs;
        if (now != seen) {
            seen = now;
            if (*used_idx_p(q) != q->last_used)
                return 1;
            continue;
        }
        u64 t = rdtsc();
        if (*used_idx_p(q) != q->last_used && !appeared)
            appeared = t;
        if (appeared && t - appeared > STALL_TICKS) {
            virtio_irq_stalls++;
            vl_str("virtio irq-stall queue=");
            vl_dec(q->index);
            vl_str(" interrupt-status=");
            vl_dec(rd(d, R_INTERRUPT_STATUS));
            vl_str(" irqs=");
            vl_dec(d->irqs);
            vl_str("\n");
            return 1;
        }
        if (t - start > ticks || (rd(d, R_STATUS) & S_NEEDS_RESET))
            return 0;
        __asm__ volatile("pause");
    }
}

/* Waits for the next used entry; 1 with its id and len, 0 on timeout or a device that failed. */
static int vq_wait(struct vdev *d, struct vq *q, u32 *id, u32 *len, u64 ticks)
{
    u64 start = rdtsc();
    if (virtio_irq_driven) {
        if (!vq_wait_irq(d, q, ticks))
            return 0;
    }
    while (*used_idx_p(q) == q->last_used) {
        if (rdtsc() - start > ticks || (rd(d, R_STATUS) & S_NEEDS_RESET))
            return 0;
        __asm__ volatile("pause");
    }
    barrier();
    volatile u32 *e = used_elem(q, q->last_used % q->size);
    *id = e[0];
    *len = e[1];
    q->last_used++;
    return 1;
}

/* Waits until the device's interrupt count passes `before` (the ring-0 handler counts it). */
static int wait_irq(struct vdev *d, u64 before)
{
    u64 start = rdtsc();
    while (d->irqs <= before) {
        if (rdtsc() - start > WAIT_TICKS)
            return 0;
        __asm__ volatile("pause");
    }
    return 1;
}

static struct vdev *find_device(u32 id, u32 nth)
{
    for (u32 i = 0; i < nvdevs; i++) {
        struct vdev *d = &vdevs[i];
        if (rd(d, R_MAGIC) == 0x74726976 && rd(d, R_DEVICE_ID) == id && nth-- == 0)
            return d;
    }
    return 0;
}

static void vl_device(const char *name, struct vdev *d)
{
    vl_str(name);
    vl_str(" at ");
    vl_hex(d->base);
    vl_str(" irq=");
    vl_dec(d->irq);
    vl_str(" features=");
    vl_hex(d->features);
    vl_str("\n");
}

/* ------------------------------------------------------------------------ */
/* skiff.test=virtio-rng: two reads of random bytes; the interrupt arrives. */

#define RNG_BYTES 64
static u8 rng_a[RNG_BYTES], rng_b[RNG_BYTES];

static int rng_read(struct vdev *d, u8 *out, u32 *got)
{
    struct vq *q = &d->q[0];
    struct buf b = { out, RNG_BYTES, 1 };
    u16 old = q->avail_idx;
    vq_add(q, 0, &b, 1);
    vq_kick(d, q, old);
    u32 id, len;
    if (!vq_wait(d, q, &id, &len, WAIT_TICKS))
        return 0;
    *got = len;
    return id == 0 && len <= RNG_BYTES;
}

void virtio_rng_ring3(void)
{
    vresult = 1;
    struct vdev *d = find_device(4, 0);
    if (!d || !vdev_init(d, 0, 1)) {
        check(0, "virtio-rng device");
        return;
    }
    vl_device("virtio-rng", d);
    u64 irqs0 = d->irqs;
    u32 got_a = 0, got_b = 0;
    int ok_a = rng_read(d, rng_a, &got_a);
    int irq = wait_irq(d, irqs0);
    int ok_b = rng_read(d, rng_b, &got_b);
    int nonzero = 0;
    for (u32 i = 0; i < RNG_BYTES; i++)
        nonzero |= rng_a[i] | rng_b[i];
    int differ = !same(rng_a, rng_b, RNG_BYTES);
    wait_irq(d, irqs0 + 1);
    vl_str("virtio-rng read=");
    vl_dec(got_a);
    vl_str("+");
    vl_dec(got_b);
    vl_str(" nonzero=");
    vl_dec(nonzero != 0);
    vl_str(" differ=");
    vl_dec(differ);
    vl_str(" irqs=");
    vl_dec(d->irqs - irqs0);
    vl_str(" kicks=");
    vl_dec(kicks);
    vl_str("\n");
    check(ok_a && ok_b && got_a == RNG_BYTES && got_b == RNG_BYTES, "two full reads");
    check(nonzero && differ, "random bytes");
    check(irq, "the interrupt arrived");
}

/* ------------------------------------------------------------------------ */
/* skiff.test=virtio-blk: every disk; the host checks the file afterwards (README.md). */

#define BLK_F_RO (1ull << 5)
#define BLK_F_FLUSH (1ull << 9)
#define BLK_F_DISCARD (1ull << 13)
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_T_DISCARD 11
#define BLK_HOST_SECTOR 1    /* the host put (i * 31 + 7) & 0xff there */
#define BLK_GUEST_SECTOR 2   /* the guest writes (i * 13 + 0x5a) & 0xff there */
#define BLK_DISCARD_SECTOR 8 /* 8 sectors (a 4 KiB page) discarded: a hole in the file */
#define BLK_DISCARD_COUNT 8

static struct {
    u32 type, reserved;
    u64 sector;
} __attribute__((aligned(16))) blk_hdr;
static u8 blk_data[4096] __attribute__((aligned(512)));
static u8 blk_pattern[512];
static volatile u8 blk_status;

/* One request: header, optional data (to or from the device), status. Returns the status, or
   0xff when the device did not answer. */
static u8 blk_request(struct vdev *d, u32 type, u64 sector, void *data, u32 len, int device_writes)
{
    struct vq *q = &d->q[0];
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xee;
    struct buf b[3];
    u32 n = 0;
    b[n++] = (struct buf){ &blk_hdr, 16, 0 };
    if (len)
        b[n++] = (struct buf){ data, len, device_writes };
    b[n++] = (struct buf){ &blk_status, 1, 1 };
    u16 old = q->avail_idx;
    vq_add(q, 0, b, n);
    vq_kick(d, q, old);
    u32 id, used;
    if (!vq_wait(d, q, &id, &used, WAIT_TICKS) || id != 0)
        return 0xff;
    return blk_status;
}

static void blk_disk(struct vdev *d, u32 index)
{
    if (!vdev_init(d, BLK_F_RO | BLK_F_FLUSH | BLK_F_DISCARD, 1)) {
        check(0, "virtio-blk device");
        return;
    }
    int ro = (d->features & BLK_F_RO) != 0;
    u64 capacity = cfg64(d, 0);
    vl_device("virtio-blk", d);
    u8 st = blk_request(d, BLK_T_GET_ID, 0, blk_data, 20, 1);
    blk_data[20] = 0;
    vl_str("virtio-blk disk=");
    vl_dec(index);
    vl_str(" capacity=");
    vl_dec(capacity);
    vl_str(" ro=");
    vl_dec(ro);
    vl_str(" serial=");
    vl_bytes(blk_data, 20);
    vl_str("\n");
    check(st == 0, "GET_ID");

    st = blk_request(d, BLK_T_IN, BLK_HOST_SECTOR, blk_data, 512, 1);
    int host_ok = st == 0;
    for (u32 i = 0; i < 512; i++)
        host_ok &= blk_data[i] == (u8)(i * 31 + 7);
    vl_str("virtio-blk disk=");
    vl_dec(index);
    vl_str(" host-pattern=");
    vl_str(host_ok ? "ok" : "wrong");
    vl_str("\n");
    check(host_ok, "the host's pattern");

    for (u32 i = 0; i < 512; i++)
        blk_pattern[i] = (u8)(i * 13 + 0x5a);
    copy(blk_data, blk_pattern, 512);
    u8 wst = blk_request(d, BLK_T_OUT, BLK_GUEST_SECTOR, blk_data, 512, 0);
    vl_str("virtio-blk disk=");
    vl_dec(index);
    vl_str(" write-status=");
    vl_dec(wst);
    if (ro) {
        vl_str("\n");
        check(wst == 1, "a read-only disk answers IOERR to a write");
        return;
    }
    u8 fst = (d->features & BLK_F_FLUSH) ? blk_request(d, BLK_T_FLUSH, 0, 0, 0, 0) : 0xfe;
    zero(blk_data, 512);
    u8 rst = blk_request(d, BLK_T_IN, BLK_GUEST_SECTOR, blk_data, 512, 1);
    int back = rst == 0 && same(blk_data, blk_pattern, 512);
    vl_str(" flush-status=");
    vl_dec(fst);
    vl_str(" read-back=");
    vl_str(back ? "ok" : "wrong");
    check(wst == 0 && fst == 0 && back, "write, flush, read back");
    if (d->features & BLK_F_DISCARD) {
        struct {
            u64 sector;
            u32 num_sectors, flags;
        } seg = { BLK_DISCARD_SECTOR, BLK_DISCARD_COUNT, 0 };
        copy(blk_data, &seg, sizeof seg);
        u8 dst = blk_request(d, BLK_T_DISCARD, 0, blk_data, sizeof seg, 0);
        zero(blk_data, 512);
        blk_data[0] = 0x77;
        u8 zst = blk_request(d, BLK_T_IN, BLK_DISCARD_SECTOR, blk_data, 512, 1);
        int zeros = zst == 0;
        for (u32 i = 0; i < 512; i++)
            zeros &= blk_data[i] == 0;
        vl_str(" discard-status=");
        vl_dec(dst);
        vl_str(" discarded-reads-zero=");
        vl_dec(zeros);
        check(dst == 0 && zeros, "discard");
    }
    vl_str("\n");
    /* Out of range: the device must say IOERR, not touch anything. */
    u8 oob = blk_request(d, BLK_T_IN, capacity, blk_data, 512, 1);
    vl_str("virtio-blk disk=");
    vl_dec(index);
    vl_str(" beyond-end-status=");
    vl_dec(oob);
    vl_str("\n");
    check(oob == 1, "a read past the end is IOERR");
}

void virtio_blk_ring3(void)
{
    vresult = 1;
    u32 n = 0;
    for (struct vdev *d; (d = find_device(2, n)) != 0; n++)
        blk_disk(d, n);
    vl_str("virtio-blk disks=");
    vl_dec(n);
    vl_str(" kicks=");
    vl_dec(kicks);
    vl_str(" suppressed=");
    vl_dec(kicks_suppressed);
    vl_str("\n");
    check(n > 0, "a virtio-blk device");
}

/* ------------------------------------------------------------------------ */
/* skiff.test=virtio-vsock: the guest connects to the host, then the host to the guest. */

#define VS_OP_REQUEST 1
#define VS_OP_RESPONSE 2
#define VS_OP_RST 3
#define VS_OP_SHUTDOWN 4
#define VS_OP_RW 5
#define VS_OP_CREDIT_UPDATE 6
#define VS_OP_CREDIT_REQUEST 7
#define VS_HOST_PORT 5000   /* the guest connects to CID 2 port 5000: <vm-dir>/vsock_5000 */
#define VS_GUEST_PORT 6000  /* the host connects here through <vm-dir>/vsock, "CONNECT 6000" */
#define VS_LOCAL_PORT 40000 /* the guest's own end of its connection */
#define VS_RX_BUFS 8
#define VS_RX_BUF 4096
#define VS_BUF_ALLOC 65536

struct vs_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static u8 vs_rx[VS_RX_BUFS][VS_RX_BUF] __attribute__((aligned(64)));
static u8 vs_tx[sizeof(struct vs_hdr) + 512] __attribute__((aligned(64)));
static u64 vs_cid;
static u32 vs_fwd; /* payload bytes taken from the current connection */

static void vs_post_rx(struct vdev *d, u16 i, int kick)
{
    struct vq *q = &d->q[0];
    struct buf b = { vs_rx[i], VS_RX_BUF, 1 };
    u16 old = q->avail_idx;
    vq_add(q, i, &b, 1);
    if (kick)
        vq_kick(d, q, old);
}

static int vs_send(struct vdev *d, u32 src_port, u32 dst_port, u16 op, u32 flags, const void *data, u32 len)
{
    struct vs_hdr h = { vs_cid, 2, src_port, dst_port, len, 1, op, flags, VS_BUF_ALLOC, vs_fwd };
    if (len > sizeof(vs_tx) - sizeof h)
        return 0;
    copy(vs_tx, &h, sizeof h);
    copy(vs_tx + sizeof h, data, len);
    struct vq *q = &d->q[1];
    struct buf b = { vs_tx, (u32)sizeof h + len, 0 };
    u16 old = q->avail_idx;
    vq_add(q, 0, &b, 1);
    vq_kick(d, q, old);
    u32 id, used;
    return vq_wait(d, q, &id, &used, WAIT_TICKS) && id == 0;
}

/* The next packet from the device (header and up to `max` payload bytes), its rx buffer given
   back. 0 on timeout. */
static int vs_recv(struct vdev *d, struct vs_hdr *h, u8 *payload, u32 max, u64 ticks)
{
    struct vq *q = &d->q[0];
    u32 id, len;
    if (!vq_wait(d, q, &id, &len, ticks))
        return 0;
    if (id >= VS_RX_BUFS || len < sizeof *h || len > VS_RX_BUF) {
        check(0, "a sane rx completion");
        return 0;
    }
    copy(h, vs_rx[id], sizeof *h);
    u32 n = h->len < max ? h->len : max;
    if (h->len > len - sizeof *h)
        n = 0, check(0, "rx payload within the used length");
    copy(payload, vs_rx[id] + sizeof *h, n);
    vs_post_rx(d, (u16)id, 1);
    return 1;
}

static void vl_vs(const char *what, const u8 *data, u32 n)
{
    vl_str("virtio-vsock ");
    vl_str(what);
    vl_str("=\"");
    for (u32 i = 0; i < n && vlog_len < sizeof(vlog) - 1; i++)
        vlog[vlog_len++] = (data[i] >= 0x20 && data[i] < 0x7f && data[i] != '"') ? (char)data[i] : '?';
    vl_str("\"\n");
}

static u8 vs_in[512];
static u32 vs_pending_peer; /* a host connection to VS_GUEST_PORT that arrived early (its port) */

/* Packets that are not for the connection being waited on: a host REQUEST to VS_GUEST_PORT is
   kept for later (the host may connect as soon as the driver is up). */
static void vs_other(struct vdev *d, const struct vs_hdr *h)
{
    if (h->op == VS_OP_REQUEST && h->dst_port == VS_GUEST_PORT && h->src_cid == 2 && !vs_pending_peer)
        vs_pending_peer = h->src_port;
    else if (h->op == VS_OP_REQUEST) /* a port nobody listens on */
        vs_send(d, h->dst_port, h->src_port, VS_OP_RST, 0, 0, 0);
}

void virtio_vsock_ring3(void)
{
    vresult = 1;
    struct vdev *d = find_device(19, 0);
    if (!d || !vdev_init(d, 0, 3)) {
        check(0, "virtio-vsock device");
        return;
    }
    vs_cid = cfg64(d, 0);
    vl_device("virtio-vsock", d);
    vl_str("virtio-vsock guest_cid=");
    vl_dec(vs_cid);
    vl_str("\n");
    for (u16 i = 0; i < VS_RX_BUFS; i++)
        vs_post_rx(d, i, i + 1 == VS_RX_BUFS);

    /* Guest -> host: connect, send, read the echo, shut down. */
    static const char hello[] = "hello from the guest over vsock";
    u32 hello_len = (u32)slen(hello);
    struct vs_hdr h;
    vs_fwd = 0;
    int ok = vs_send(d, VS_LOCAL_PORT, VS_HOST_PORT, VS_OP_REQUEST, 0, 0, 0);
    int connected = 0;
    while (ok && vs_recv(d, &h, vs_in, 0, WAIT_TICKS)) {
        if (h.src_port == VS_HOST_PORT && h.dst_port == VS_LOCAL_PORT) {
            connected = h.op == VS_OP_RESPONSE;
            break;
        }
        vs_other(d, &h);
    }
    vl_str("virtio-vsock connect cid=2 port=5000 ");
    vl_str(connected ? "connected\n" : "refused\n");
    check(connected, "the host listener accepted");
    u32 got = 0;
    if (connected && vs_send(d, VS_LOCAL_PORT, VS_HOST_PORT, VS_OP_RW, 0, hello, hello_len)) {
        static u8 chunk[VS_RX_BUF];
        while (got < hello_len && vs_recv(d, &h, chunk, sizeof chunk, WAIT_TICKS)) {
            if (h.src_port != VS_HOST_PORT || h.dst_port != VS_LOCAL_PORT) {
                vs_other(d, &h);
                continue;
            }
            if (h.op == VS_OP_RW) {
                for (u32 i = 0; i < h.len && got < sizeof vs_in; i++)
                    vs_in[got++] = chunk[i];
                vs_fwd += h.len;
            } else if (h.op == VS_OP_RST || h.op == VS_OP_SHUTDOWN) {
                break;
            }
        }
    }
    vl_vs("echo", vs_in, got);
    check(got == hello_len && same(vs_in, (const u8 *)hello, hello_len), "the host echoed what the guest sent");
    if (connected) {
        vs_send(d, VS_LOCAL_PORT, VS_HOST_PORT, VS_OP_SHUTDOWN, 3, 0, 0);
        /* The device answers a full shutdown with RST once it has flushed. */
        int rst = 0;
        while (!rst && vs_recv(d, &h, vs_in, 0, WAIT_TICKS)) {
            rst = h.op == VS_OP_RST && h.src_port == VS_HOST_PORT;
            if (h.src_port != VS_HOST_PORT)
                vs_other(d, &h);
        }
        check(rst, "RST after SHUTDOWN");
    }

    /* Host -> guest: wait for a connection to VS_GUEST_PORT, echo what comes, until the host
       closes. The host retries until the driver is up, so this waits long. */
    vs_fwd = 0;
    u32 peer = 0;
    int accepted = 0;
    for (int tries = 0; !vs_pending_peer && tries < 4; tries++) {
        while (!vs_pending_peer && vs_recv(d, &h, vs_in, 0, WAIT_TICKS))
            vs_other(d, &h);
    }
    if (vs_pending_peer) {
        peer = vs_pending_peer;
        accepted = vs_send(d, VS_GUEST_PORT, peer, VS_OP_RESPONSE, 0, 0, 0);
    }
    vl_str("virtio-vsock accept port=6000 ");
    vl_str(accepted ? "accepted\n" : "nothing came\n");
    check(accepted, "the host connected to the guest");
    u32 echoed = 0;
    int closed = 0;
    while (accepted && !closed && vs_recv(d, &h, vs_in, sizeof vs_in, WAIT_TICKS)) {
        if (h.src_port != peer || h.dst_port != VS_GUEST_PORT)
            continue;
        if (h.op == VS_OP_RW) {
            u32 n = h.len < sizeof vs_in ? h.len : sizeof vs_in;
            vs_fwd += h.len;
            vl_vs("from-host", vs_in, n);
            if (vs_send(d, VS_GUEST_PORT, peer, VS_OP_RW, 0, vs_in, n))
                echoed += n;
        } else if (h.op == VS_OP_SHUTDOWN || h.op == VS_OP_RST) {
            closed = 1;
            if (h.op == VS_OP_SHUTDOWN)
                vs_send(d, VS_GUEST_PORT, peer, VS_OP_RST, 0, 0, 0);
        } else if (h.op == VS_OP_CREDIT_REQUEST) {
            vs_send(d, VS_GUEST_PORT, peer, VS_OP_CREDIT_UPDATE, 0, 0, 0);
        }
    }
    vl_str("virtio-vsock echoed=");
    vl_dec(echoed);
    vl_str(" host-closed=");
    vl_dec(closed);
    vl_str(" irqs=");
    vl_dec(d->irqs);
    vl_str(" interrupt-status=");
    vl_dec(rd(d, R_INTERRUPT_STATUS));
    vl_str("\n");
    check(echoed > 0 && closed, "echo to the host, then its close");
    /* The last completions may have been taken before their interrupt came (polled, or found by
       the first look): give the handler STALL_TICKS to acknowledge what is pending. Still set
       after that: an interrupt that never came, with no later cause to bring another. */
    u64 t0 = rdtsc();
    while (rd(d, R_INTERRUPT_STATUS) && rdtsc() - t0 < STALL_TICKS)
        __asm__ volatile("pause");
    vl_str("virtio-vsock interrupt-status-after-wait=");
    vl_dec(rd(d, R_INTERRUPT_STATUS));
    vl_str("\n");
    if (virtio_irq_driven) {
        vl_str("virtio-vsock irq-driven waits=");
        vl_dec(virtio_irq_waits);
        vl_str(" stalls=");
        vl_dec(virtio_irq_stalls);
        vl_str(" dropped=");
        vl_dec(virtio_irq_dropped);
        vl_str("\n");
        /* With an interrupt dropped on purpose, the completion it was for may be found without
           one (when no other cause follows it soon); every later one must come with its own. */
        check(virtio_irq_stalls <= virtio_irq_dropped, "every completion the driver waited for came with its interrupt");
        check(d->irqs > 0 && rd(d, R_INTERRUPT_STATUS) == 0, "interrupts came and nothing was left unacknowledged");
    }
}

/* ------------------------------------------------------------------------ */
/* skiff.test=virtio-hostile: garbage in every device's registers, rings that point outside RAM,
   descriptor loops, absurd lengths. The VMM must stay up; afterwards each device must still come
   back after a reset and serve a request (rng), and the guest must still reach the exit. */

static u64 hostile_seed = 0x9e3779b97f4a7c15ull;
static u64 rnd(void)
{
    hostile_seed ^= hostile_seed << 13;
    hostile_seed ^= hostile_seed >> 7;
    hostile_seed ^= hostile_seed << 17;
    return hostile_seed;
}

void virtio_hostile_ring3(void)
{
    vresult = 1;
    u32 failed_seen = 0;
    for (u32 i = 0; i < nvdevs; i++) {
        struct vdev *d = &vdevs[i];
        /* 1. Register garbage: every offset, odd widths, random values (not the status). */
        for (u32 round = 0; round < 2000; round++) {
            u32 off = (u32)(rnd() % 0x200);
            u64 v = rnd();
            switch (rnd() % 4) {
            case 0: *(volatile u8 *)(usize)(d->base + off) = (u8)v; break;
            case 1: *(volatile u16 *)(usize)(d->base + (off & ~1u)) = (u16)v; break;
            case 2: *(volatile u32 *)(usize)(d->base + (off & ~3u)) = (u32)v; break;
            default: (void)*(volatile u32 *)(usize)(d->base + (off & ~3u)); break;
            }
        }
        /* 2. A negotiated device with a ring whose descriptors point nowhere and loop. */
        if (!vdev_init(d, ~0ull, 1))
            continue;
        struct vq *q = &d->q[0];
        for (u16 k = 0; k < q->size; k++) {
            volatile u8 *e = q->desc + 16 * (u32)k;
            *(volatile u64 *)e = k & 1 ? 0xfffffffffffff000ull : rnd();
            *(volatile u32 *)(e + 8) = (u32)rnd();
            *(volatile u16 *)(e + 12) = (u16)(rnd() & 7);
            *(volatile u16 *)(e + 14) = (u16)((k + 1) % q->size); /* a cycle through all of them */
        }
        for (u16 k = 0; k < q->size; k++)
            *avail_ring(q, k) = (u16)rnd();
        *avail_idx_p(q) = (u16)(q->size * 3 + 5); /* more than the ring holds */
        wr(d, R_QUEUE_NOTIFY, 0);
        wr(d, R_QUEUE_NOTIFY, 7);      /* a queue that does not exist */
        wr(d, R_QUEUE_NOTIFY, 0xffff);
        u64 start = rdtsc();
        while (!(rd(d, R_STATUS) & S_NEEDS_RESET) && rdtsc() - start < (1ull << 30))
            __asm__ volatile("pause");
        if (rd(d, R_STATUS) & S_NEEDS_RESET)
            failed_seen++;
        /* 3. Moved rings: the queue's addresses rewritten while it runs (ignored by the spec). */
        wr(d, R_QUEUE_SEL, 0);
        wr(d, R_QUEUE_DESC, 0xfffff000u);
        wr(d, R_QUEUE_DESC + 4, 0xffffffffu);
        wr(d, R_QUEUE_NOTIFY, 0);
    }
    vl_str("virtio-hostile devices=");
    vl_dec(nvdevs);
    vl_str(" failed=");
    vl_dec(failed_seen);
    vl_str("\n");
    /* Afterwards: a reset brings the rng back, and it serves. */
    arena_used = 0;
    struct vdev *r = find_device(4, 0);
    u32 got = 0;
    int ok = r && vdev_init(r, 0, 1) && rng_read(r, rng_a, &got);
    vl_str("virtio-hostile rng-after-reset=");
    vl_str(ok && got == RNG_BYTES ? "ok" : "broken");
    vl_str("\n");
    check(ok && got == RNG_BYTES, "the rng serves after a reset");
    check(failed_seen > 0, "a device reported DEVICE_NEEDS_RESET");
}
