/*
 * skiff test guest: the 64-bit part. The entry code enters guest_main() in
 * long mode, ring 0, interrupts off, on the guest's own GDT, page tables and
 * stack, with the guest-physical address of what the loader handed over:
 *   - BOOT_PVH (entry.S, the ELF build): struct hvm_start_info;
 *   - BOOT_BZIMAGE (bzimage.S, the bzImage build): struct boot_params (the
 *     "zero page" of the Linux x86 64-bit boot protocol).
 * The test to run comes from the kernel command line ("skiff.test=NAME");
 * see README.md for the tests and their output.
 *
 * Everything the guest reports is printed on the 8250 UART at 0x3f8 as lines
 * starting with "guest: "; it ends by writing a 32-bit status to the exit
 * device at I/O port 0xf4.
 *
 * Ring 0 is slow on some hosts (every instruction emulated), so this code
 * stays short and loop-light.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#include "virtio.h"

#define PORT_COM1 0x3f8
#define PORT_EXIT 0xf4
#define PORT_I8042 0x64

#define EXIT_OK 0
#define EXIT_FAIL 1          /* a check failed */
#define EXIT_USAGE 2         /* unknown test or bad argument */
#define EXIT_EXCEPTION 3     /* unexpected CPU exception */
#define EXIT_NOT_ENDED 99    /* reset / triple fault did not end the VM */

#define BOOT_PVH 0
#define BOOT_BZIMAGE 1

#define HVM_START_MAGIC 0x336ec578u
#define MAPPED_LIMIT 0x100000000ull /* entry.S identity-maps the first 4 GiB */

#define MAX_CMDLINE 4096
#define MAX_MEMMAP 1024
#define MAX_MODULES 64
#define ECHO_MAX 256

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    /* version >= 1 */
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_modlist_entry {
    u64 paddr;
    u64 size;
    u64 cmdline_paddr;
    u64 reserved;
};

struct hvm_memmap_table_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

/*
 * struct boot_params (Linux arch/x86/include/uapi/asm/bootparam.h): one 4 KiB
 * page. Only these fields are read, at these offsets; hdr (struct
 * setup_header) starts at 0x1f1, so its fields are unaligned.
 */
#define BP_SIZE 0x1000
#define BP_EXT_RAMDISK_IMAGE 0x0c0 /* u32: high 32 bits of ramdisk_image */
#define BP_EXT_RAMDISK_SIZE 0x0c4  /* u32: high 32 bits of ramdisk_size */
#define BP_EXT_CMD_LINE_PTR 0x0c8  /* u32: high 32 bits of cmd_line_ptr */
#define BP_E820_ENTRIES 0x1e8      /* u8 */
#define BP_HDR_MAGIC 0x202         /* u32: "HdrS" */
#define BP_HDR_VERSION 0x206       /* u16 */
#define BP_TYPE_OF_LOADER 0x210    /* u8 */
#define BP_LOADFLAGS 0x211         /* u8 */
#define BP_RAMDISK_IMAGE 0x218     /* u32 */
#define BP_RAMDISK_SIZE 0x21c      /* u32 */
#define BP_CMD_LINE_PTR 0x228      /* u32 */
#define BP_E820_TABLE 0x2d0        /* struct boot_e820_entry[128] */
#define BP_E820_MAX 128            /* E820_MAX_ENTRIES_ZEROPAGE */
#define E820_ENTRY_SIZE 20         /* packed: u64 addr, u64 size, u32 type */
#define HDRS_MAGIC 0x53726448u     /* "HdrS" */

typedef u16 u16_unaligned __attribute__((aligned(1), may_alias));
typedef u32 u32_unaligned __attribute__((aligned(1), may_alias));
typedef u64 u64_unaligned __attribute__((aligned(1), may_alias));

static u8 rd8(const u8 *p, u32 off) { return p[off]; }
static u16 rd16(const u8 *p, u32 off) { return *(const u16_unaligned *)(p + off); }
static u32 rd32(const u8 *p, u32 off) { return *(const u32_unaligned *)(p + off); }
static u64 rd64(const u8 *p, u32 off) { return *(const u64_unaligned *)(p + off); }

/* From entry.S (PVH entry state; the bzImage entry state, which bzimage.S
   records). */
extern u32 entry_eflags, entry_ebx, entry_cr0, entry_cr4;
extern u16 entry_cs, entry_ds, entry_es, entry_ss;
extern u64 entry64_cr0, entry64_cr4, entry64_efer, entry64_rsi;
extern u16 entry64_cs, entry64_ds, entry64_ss;
extern u64 gdt[];
extern char exc_stubs[];
extern char ring3_entry[], ring3_ud2[], ring3_doorbell[], ring3_doorbell_ud2[], doorbell_irq[];
extern char ring3_call[], ring3_call_ud2[], virtio_irq[];
void (*ring3_fn)(void); /* what ring3_call runs */
void enter_ring3_irq(u64 rip, u64 rsp) __attribute__((noreturn));
extern const u8 ap_tramp_start[], ap_tramp_end[];
void enter_ring3(u64 rip, u64 rsp) __attribute__((noreturn));

void guest_main(u64 info_paddr, u32 boot_mode) __attribute__((noreturn));

/* gcc may emit calls to these even with -ffreestanding. */
void *memset(void *d, int c, usize n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, usize n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

/* ------------------------------------------------------------------------ */
/* Port I/O and the UART. */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void putc(char c)
{
    /* Wait for THRE (LSR bit 5), but never forever: a stuck LSR must not
       hang the guest silently, so after a while write anyway. */
    for (u32 i = 0; i < 100000 && !(inb(PORT_COM1 + 5) & 0x20); i++)
        ;
    outb(PORT_COM1, (u8)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void putn(const char *s, usize n)
{
    for (usize i = 0; i < n; i++)
        putc(s[i]);
}

static void put_hex(u64 v)
{
    char buf[16];
    int n = 0;
    puts("0x");
    do {
        buf[n++] = "0123456789abcdef"[v & 0xf];
        v >>= 4;
    } while (v);
    while (n)
        putc(buf[--n]);
}

static void put_dec(u64 v)
{
    char buf[20];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(buf[--n]);
}

static void halt_forever(void) __attribute__((noreturn));
static void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void guest_exit(u32 status) __attribute__((noreturn));
static void guest_exit(u32 status)
{
    puts("guest: exit ");
    put_dec(status);
    putc('\n');
    outl(PORT_EXIT, status);
    halt_forever();
}

/* Spin a little so a VMM that acts on a port write only at the next
   instruction-block boundary (QEMU TCG) gets the chance to. Not reached on
   KVM-based VMMs, where the port write itself exits to the VMM. */
static void settle(void)
{
    for (u32 i = 0; i < 100000; i++)
        __asm__ volatile("pause" ::: "memory");
}

/* ------------------------------------------------------------------------ */
/* Memory the guest may touch: the identity map covers [0, 4 GiB). */

static int mapped(u64 addr, u64 len)
{
    return addr < MAPPED_LIMIT && len <= MAPPED_LIMIT - addr;
}

/* FNV-1a, 32-bit. Ring 0 may run at ~1 M instructions/s, so the main loop
   does 8 bytes in 16 instructions + 3 for the loop (gcc's own loop takes 6 per
   byte): "h ^= byte" only touches the low byte of h, so it is one xorb with a
   memory operand. */
static u32 fnv1a32(const u8 *p, u64 n)
{
    u32 h = 0x811c9dc5u;
    u64 i = 0;
    for (; i + 8 <= n; i += 8) {
        __asm__("xorb 0(%1), %b0\n\timul $0x01000193, %0, %0\n\t"
                "xorb 1(%1), %b0\n\timul $0x01000193, %0, %0\n\t"
                "xorb 2(%1), %b0\n\timul $0x01000193, %0, %0\n\t"
                "xorb 3(%1), %b0\n\timul $0x01000193, %0, %0\n\t"
                "xorb 4(%1), %b0\n\timul $0x01000193, %0, %0\n\t"
                "xorb 5(%1), %b0\n\timul $0x01000193, %0, %0\n\t"
                "xorb 6(%1), %b0\n\timul $0x01000193, %0, %0\n\t"
                "xorb 7(%1), %b0\n\timul $0x01000193, %0, %0"
                : "+r"(h)
                : "r"(p + i), "m"(*(const u8(*)[8])(p + i)));
    }
    for (; i < n; i++) {
        h ^= p[i];
        h *= 0x01000193u;
    }
    return h;
}

/* ------------------------------------------------------------------------ */
/* IDT, TSS. */

struct idt_gate {
    u16 off0;
    u16 sel;
    u8 ist;
    u8 type;
    u16 off1;
    u32 off2;
    u32 zero;
} __attribute__((packed));

struct tss64 {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct desc_ptr {
    u16 limit;
    u64 base;
} __attribute__((packed));

/* skiff.test=doorbell: the doorbell test device (hypervisor/devices/doorbell_test.h) in the
   last virtio-mmio slot and its IO-APIC pin (hypervisor/vmm/layout.h). */
#define DOORBELL_BASE 0xd0000e00ull
#define DOORBELL_IRQ 23
#define DOORBELL_MAGIC 0x42444b53u
#define DOORBELL_VECTOR 0x40
#define DOORBELL_ROUNDS 3 /* skiff.test=doorbell; doorbell=N does N (benchmarks) */
#define DOORBELL_LOST_ADDR 0xfffffffffffffffcull /* doorbell-lost: 8 bytes there would wrap */
#define IOAPIC_BASE 0xfec00000ull
#define LAPIC_BASE 0xfee00000ull

#define VIRTIO_VECTOR 0x41 /* every virtio device's pin (virtio.c counts per device) */

/* Vectors 0-31 are the CPU's exceptions; VIRTIO_VECTOR is the last one the IDT covers. */
static struct idt_gate idt[VIRTIO_VECTOR + 1] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
static u8 ring0_stack[8192] __attribute__((aligned(16)));  /* TSS.rsp0 */
static u8 ring3_stack[4096] __attribute__((aligned(16)));
u64 ring3_result;
static int ring3_running; /* 0, or which ring-3 payload runs: RING3_SUM or RING3_DOORBELL */
#define RING3_SUM 1
#define RING3_DOORBELL 2
#define RING3_CALL 3
struct exc_frame;
static void (*ring3_after)(struct exc_frame *f) __attribute__((noreturn)); /* ring 0's continuation after RING3_CALL */
/* Written by ring 3, the host (doorbell_reply) and doorbell_irq: hence volatile reads. */
u64 doorbell_reply, doorbell_irqs, doorbell_round, doorbell_rounds, doorbell_lost;

struct exc_frame {
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

static void set_gate(int i, u64 a)
{
    idt[i].off0 = (u16)a;
    idt[i].sel = 0x08;
    idt[i].ist = 0;
    idt[i].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
    idt[i].off1 = (u16)(a >> 16);
    idt[i].off2 = (u32)(a >> 32);
    idt[i].zero = 0;
}

static void setup_idt(void)
{
    for (int i = 0; i < 32; i++)
        set_gate(i, (u64)(usize)exc_stubs + 16 * (u64)i);
    struct desc_ptr p = { sizeof(idt) - 1, (u64)(usize)idt };
    __asm__ volatile("lidt %0" : : "m"(p));
}

static void setup_tss(void)
{
    u64 base = (u64)(usize)&tss;
    u64 limit = sizeof(tss) - 1;
    tss.rsp0 = (u64)(usize)(ring0_stack + sizeof(ring0_stack));
    tss.iomap_base = sizeof(tss); /* no I/O permission bitmap */
    /* 64-bit available TSS descriptor, DPL 0, in GDT slots 5-6 (0x28). */
    gdt[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
             (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt[6] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(0x28) : "memory");
}

void exception_handler(struct exc_frame *f) __attribute__((noreturn));
static void doorbell_report(struct exc_frame *f) __attribute__((noreturn));

void exception_handler(struct exc_frame *f)
{
    if (ring3_running == RING3_DOORBELL && f->vector == 6 && (f->cs & 3) == 3)
        doorbell_report(f);
    if (ring3_running == RING3_CALL && f->vector == 6 && (f->cs & 3) == 3 && f->rip == (u64)(usize)ring3_call_ud2) {
        ring3_running = 0;
        ring3_after(f);
    }
    if (ring3_running == RING3_SUM && f->vector == 6 && (f->cs & 3) == 3) {
        ring3_running = 0;
        u64 sum = *(volatile u64 *)&ring3_result;
        const u64 want = 10000000ull * 10000001ull / 2;
        puts("guest: ring3 trap vector=6 cs=");
        put_hex(f->cs);
        puts(" ss=");
        put_hex(f->ss);
        puts(" rip=");
        put_hex(f->rip);
        putc('\n');
        puts("guest: ring3 sum=");
        put_dec(sum);
        putc('\n');
        int ok = 1;
        if (f->cs != 0x23 || f->ss != 0x1b || f->rip != (u64)(usize)ring3_ud2) {
            puts("guest: ring3 trap did not come from the ring-3 ud2 (want cs=0x23 ss=0x1b rip=");
            put_hex((u64)(usize)ring3_ud2);
            puts(")\n");
            ok = 0;
        }
        if (sum != want) {
            puts("guest: ring3 wrong sum, want ");
            put_dec(want);
            putc('\n');
            ok = 0;
        }
        guest_exit(ok ? EXIT_OK : EXIT_FAIL);
    }
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    puts("guest: exception vector=");
    put_dec(f->vector);
    puts(" error=");
    put_hex(f->error);
    puts(" rip=");
    put_hex(f->rip);
    puts(" cs=");
    put_hex(f->cs);
    puts(" cr2=");
    put_hex(cr2);
    putc('\n');
    guest_exit(EXIT_EXCEPTION);
}

/* ------------------------------------------------------------------------ */
/* Command line. */

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static usize bounded_strlen(const char *s, usize max)
{
    usize n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

static int starts_with(const char *s, usize n, const char *prefix)
{
    usize i = 0;
    for (; prefix[i]; i++)
        if (i >= n || s[i] != prefix[i])
            return 0;
    return 1;
}

static int equals(const char *s, usize n, const char *word)
{
    return bounded_strlen(word, n + 1) == n && starts_with(s, n, word);
}

/* Finds the value of the last "skiff.test=" word; returns its length or -1. */
static long find_test(const char *cmd, usize len, const char **val)
{
    static const char key[] = "skiff.test=";
    long found = -1;
    usize i = 0;
    while (i < len) {
        while (i < len && is_space(cmd[i]))
            i++;
        usize start = i;
        while (i < len && !is_space(cmd[i]))
            i++;
        usize wl = i - start;
        if (wl >= sizeof(key) - 1 && starts_with(cmd + start, wl, key)) {
            *val = cmd + start + sizeof(key) - 1;
            found = (long)(wl - (sizeof(key) - 1));
        }
    }
    return found;
}

/* Decimal 0..2^32-1, digits only. */
static int parse_u32(const char *s, usize n, u32 *out)
{
    if (n == 0 || n > 10)
        return 0;
    u64 v = 0;
    for (usize i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (u64)(s[i] - '0');
    }
    if (v > 0xffffffffull)
        return 0;
    *out = (u32)v;
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Tests. */

/* FNV-1a of [paddr, paddr + size) after " fnv1a=", or why not. Returns 0 if
   the bytes are not below 4 GiB. */
static int put_fnv1a(u64 paddr, u64 size)
{
    if (mapped(paddr, size)) {
        puts(" fnv1a=");
        put_hex(fnv1a32((const u8 *)(usize)paddr, size));
        putc('\n');
        return 1;
    }
    puts(" fnv1a=none (not below 4 GiB)\n");
    return 0;
}

static void facts_end(int ok) __attribute__((noreturn));
static void facts_end(int ok)
{
    if (ok) {
        puts("guest: facts ok\n");
        guest_exit(EXIT_OK);
    }
    puts("guest: facts failed\n");
    guest_exit(EXIT_FAIL);
}

static void facts_pvh(const struct hvm_start_info *si, u32 si_paddr, const char *cmd, usize cmdlen)
    __attribute__((noreturn));
static void facts_pvh(const struct hvm_start_info *si, u32 si_paddr, const char *cmd, usize cmdlen)
{
    int ok = 1;

    puts("guest: entry cr0=");
    put_hex(entry_cr0);
    puts(" cr4=");
    put_hex(entry_cr4);
    puts(" eflags=");
    put_hex(entry_eflags);
    puts(" cs=");
    put_hex(entry_cs);
    puts(" ds=");
    put_hex(entry_ds);
    puts(" es=");
    put_hex(entry_es);
    puts(" ss=");
    put_hex(entry_ss);
    puts(" ebx=");
    put_hex(si_paddr);
    putc('\n');

    puts("guest: start_info magic=");
    put_hex(si->magic);
    puts(" version=");
    put_dec(si->version);
    puts(" flags=");
    put_hex(si->flags);
    puts(" rsdp=");
    put_hex(si->rsdp_paddr);
    putc('\n');

    puts("guest: cmdline ");
    putn(cmd, cmdlen);
    putc('\n');

    if (si->version < 1) {
        puts("guest: memmap absent (start_info version 0)\n");
    } else {
        u64 n = si->memmap_entries;
        puts("guest: memmap count=");
        put_dec(n);
        puts(" paddr=");
        put_hex(si->memmap_paddr);
        putc('\n');
        if (n > MAX_MEMMAP) {
            puts("guest: memmap too many entries\n");
            ok = 0;
        } else if (n && !mapped(si->memmap_paddr, n * sizeof(struct hvm_memmap_table_entry))) {
            puts("guest: memmap table not below 4 GiB\n");
            ok = 0;
        } else {
            const struct hvm_memmap_table_entry *m =
                (const struct hvm_memmap_table_entry *)(usize)si->memmap_paddr;
            for (u64 i = 0; i < n; i++) {
                puts("guest: memmap addr=");
                put_hex(m[i].addr);
                puts(" size=");
                put_hex(m[i].size);
                puts(" type=");
                put_hex(m[i].type);
                putc('\n');
            }
        }
    }

    u64 nm = si->nr_modules;
    puts("guest: modules count=");
    put_dec(nm);
    puts(" paddr=");
    put_hex(si->modlist_paddr);
    putc('\n');
    if (nm > MAX_MODULES) {
        puts("guest: modules too many\n");
        ok = 0;
    } else if (nm && !mapped(si->modlist_paddr, nm * sizeof(struct hvm_modlist_entry))) {
        puts("guest: modules list not below 4 GiB\n");
        ok = 0;
    } else {
        const struct hvm_modlist_entry *mod = (const struct hvm_modlist_entry *)(usize)si->modlist_paddr;
        for (u64 i = 0; i < nm; i++) {
            puts("guest: module index=");
            put_dec(i);
            puts(" paddr=");
            put_hex(mod[i].paddr);
            puts(" size=");
            put_hex(mod[i].size);
            if (!put_fnv1a(mod[i].paddr, mod[i].size))
                ok = 0;
        }
    }
    facts_end(ok);
}

static void facts_bzimage(const u8 *bp, const char *cmd, usize cmdlen) __attribute__((noreturn));
static void facts_bzimage(const u8 *bp, const char *cmd, usize cmdlen)
{
    int ok = 1;

    puts("guest: entry64 cs=");
    put_hex(entry64_cs);
    puts(" ds=");
    put_hex(entry64_ds);
    puts(" ss=");
    put_hex(entry64_ss);
    puts(" cr0=");
    put_hex(entry64_cr0);
    puts(" cr4=");
    put_hex(entry64_cr4);
    puts(" efer=");
    put_hex(entry64_efer);
    puts(" rsi=");
    put_hex(entry64_rsi);
    putc('\n');

    puts("guest: boot_params hdr_magic=");
    put_hex(rd32(bp, BP_HDR_MAGIC));
    puts(" version=");
    put_hex(rd16(bp, BP_HDR_VERSION));
    puts(" type_of_loader=");
    put_hex(rd8(bp, BP_TYPE_OF_LOADER));
    puts(" loadflags=");
    put_hex(rd8(bp, BP_LOADFLAGS));
    putc('\n');

    puts("guest: cmdline ");
    putn(cmd, cmdlen);
    putc('\n');

    u32 n = rd8(bp, BP_E820_ENTRIES);
    puts("guest: e820 count=");
    put_dec(n);
    putc('\n');
    if (n > BP_E820_MAX) {
        puts("guest: e820 too many entries\n");
        ok = 0;
    } else {
        for (u32 i = 0; i < n; i++) {
            const u8 *e = bp + BP_E820_TABLE + E820_ENTRY_SIZE * i;
            puts("guest: e820 addr=");
            put_hex(rd64(e, 0));
            puts(" size=");
            put_hex(rd64(e, 8));
            puts(" type=");
            put_hex(rd32(e, 16));
            putc('\n');
        }
    }

    u64 rd_paddr = rd32(bp, BP_RAMDISK_IMAGE) | (u64)rd32(bp, BP_EXT_RAMDISK_IMAGE) << 32;
    u64 rd_size = rd32(bp, BP_RAMDISK_SIZE) | (u64)rd32(bp, BP_EXT_RAMDISK_SIZE) << 32;
    if (rd_size) {
        puts("guest: ramdisk paddr=");
        put_hex(rd_paddr);
        puts(" size=");
        put_hex(rd_size);
        if (!put_fnv1a(rd_paddr, rd_size))
            ok = 0;
    }
    facts_end(ok);
}

static void test_echo(void)
{
    char line[ECHO_MAX];
    usize n = 0;
    puts("guest: ready for input\n");
    for (;;) {
        while (!(inb(PORT_COM1 + 5) & 0x01))
            __asm__ volatile("pause");
        char c = (char)inb(PORT_COM1);
        if (c == '\n' || c == '\r')
            break;
        if (n == sizeof(line)) {
            puts("guest: line too long (more than 256 bytes before a newline)\n");
            guest_exit(EXIT_FAIL);
        }
        line[n++] = c;
    }
    puts("guest: echo ");
    putn(line, n);
    putc('\n');
    guest_exit(EXIT_OK);
}

static void test_reset(void)
{
    puts("guest: resetting via i8042 (port 0x64 <- 0xfe)\n");
    outb(PORT_I8042, 0xfe);
    settle();
    puts("guest: still running after reset\n");
    guest_exit(EXIT_NOT_ENDED);
}

static void test_triplefault(void)
{
    puts("guest: triple fault (empty IDT, ud2)\n");
    struct desc_ptr p = { 0, 0 };
    __asm__ volatile("lidt %0\n\tud2" : : "m"(p) : "memory");
    settle();
    puts("guest: still running after triple fault\n");
    guest_exit(EXIT_NOT_ENDED);
}

static void test_ring3(void)
{
    setup_tss();
    puts("guest: entering ring 3\n");
    ring3_running = RING3_SUM;
    enter_ring3((u64)(usize)ring3_entry, (u64)(usize)(ring3_stack + sizeof(ring3_stack)));
}

/* ------------------------------------------------------------------------ */
/* skiff.test=doorbell: a doorbell rung from ring 3, answered by the host's event loop with a
   memory write and an interrupt. */

static volatile u32 *doorbell_reg(u32 off) { return (volatile u32 *)(usize)(DOORBELL_BASE + off); }

static void ioapic_write(u32 reg, u32 v)
{
    *(volatile u32 *)(usize)IOAPIC_BASE = reg;          /* IOREGSEL */
    *(volatile u32 *)(usize)(IOAPIC_BASE + 0x10) = v;   /* IOWIN */
}

/* lost: point the reply address outside guest RAM; the host must refuse to write there, say
   so in register 0x14, and still raise the interrupt. */
static void test_doorbell(u32 rounds, int lost)
{
    doorbell_rounds = rounds;
    doorbell_lost = (u64)lost;
    u32 magic = *doorbell_reg(0x00);
    if (magic != DOORBELL_MAGIC) {
        puts("guest: doorbell device not found: magic=");
        put_hex(magic);
        puts(" at ");
        put_hex(DOORBELL_BASE);
        putc('\n');
        guest_exit(EXIT_FAIL);
    }
    u32 paths = *doorbell_reg(0x04);
    puts("guest: doorbell device at ");
    put_hex(DOORBELL_BASE);
    puts(" irq=");
    put_dec(DOORBELL_IRQ);
    puts(" doorbell=");
    puts((paths & 1) ? "backend" : "emulated");
    puts(" interrupt=");
    puts((paths & 2) ? "backend" : "emulated");
    putc('\n');
    u64 reply_at = lost ? DOORBELL_LOST_ADDR : (u64)(usize)&doorbell_reply;
    *doorbell_reg(0x08) = (u32)reply_at;
    *doorbell_reg(0x0c) = (u32)(reply_at >> 32);
    /* The device's pin -> DOORBELL_VECTOR on this CPU (APIC id 0): fixed delivery, physical
       destination, active high, edge, unmasked, as the MP table describes the pin. */
    set_gate(DOORBELL_VECTOR, (u64)(usize)doorbell_irq);
    ioapic_write(0x10 + 2 * DOORBELL_IRQ + 1, 0);
    ioapic_write(0x10 + 2 * DOORBELL_IRQ, DOORBELL_VECTOR);
    *(volatile u32 *)(usize)(LAPIC_BASE + 0x80) = 0;     /* TPR: accept every priority */
    *(volatile u32 *)(usize)(LAPIC_BASE + 0xf0) = 0x1ff; /* SVR: APIC on, spurious vector 0xff */
    setup_tss();
    puts("guest: ringing from ring 3\n");
    ring3_running = RING3_DOORBELL;
    enter_ring3_irq((u64)(usize)ring3_doorbell, (u64)(usize)(ring3_stack + sizeof(ring3_stack)));
}

static void doorbell_report(struct exc_frame *f)
{
    ring3_running = 0;
    u64 done = *(volatile u64 *)&doorbell_round - 1;
    u64 reply = *(volatile u64 *)&doorbell_reply;
    u64 irqs = *(volatile u64 *)&doorbell_irqs;
    u32 rings = *doorbell_reg(0x10), lost = *doorbell_reg(0x14);
    puts("guest: doorbell rounds=");
    put_dec(done);
    puts(" reply=");
    put_dec(reply);
    puts(" irqs=");
    put_dec(irqs);
    puts(" host_rings=");
    put_dec(rings);
    puts(" lost_replies=");
    put_dec(lost);
    putc('\n');
    u64 want = doorbell_rounds;
    int ok = f->rip == (u64)(usize)ring3_doorbell_ud2 && done == want && irqs == want && rings == want &&
             (doorbell_lost ? reply == 0 && lost == want : reply == want && lost == 0);
    guest_exit(ok ? EXIT_OK : EXIT_FAIL);
}

/* ------------------------------------------------------------------------ */
/* skiff.test=virtio-*: skiff's virtio devices over virtio-mmio, driven from ring 3 (virtio.c). */

static const char *cmd_line; /* the command line, for the virtio tests */
static usize cmd_len;
static u8 virtio_stack[16384] __attribute__((aligned(16)));

/* A number in C syntax: 0x hex or decimal. */
static int parse_num(const char *s, usize n, u64 *out)
{
    u64 v = 0;
    int hex = n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
    usize i = hex ? 2 : 0;
    if (i == n)
        return 0;
    for (; i < n; i++) {
        char c = s[i];
        u64 d;
        if (c >= '0' && c <= '9')
            d = (u64)(c - '0');
        else if (hex && c >= 'a' && c <= 'f')
            d = (u64)(c - 'a' + 10);
        else if (hex && c >= 'A' && c <= 'F')
            d = (u64)(c - 'A' + 10);
        else
            return 0;
        if (v > (~0ull - d) / (hex ? 16 : 10))
            return 0;
        v = v * (hex ? 16 : 10) + d;
    }
    *out = v;
    return 1;
}

/* Every "virtio_mmio.device=SIZE@BASE:IRQ" word into vdevs[], in command-line order. */
static void find_virtio_devices(void)
{
    static const char key[] = "virtio_mmio.device=";
    usize i = 0;
    while (i < cmd_len) {
        while (i < cmd_len && is_space(cmd_line[i]))
            i++;
        usize start = i;
        while (i < cmd_len && !is_space(cmd_line[i]))
            i++;
        const char *w = cmd_line + start;
        usize n = i - start;
        if (!starts_with(w, n, key))
            continue;
        w += sizeof(key) - 1;
        n -= sizeof(key) - 1;
        usize at = 0, colon = 0;
        while (at < n && w[at] != '@')
            at++;
        colon = at;
        while (colon < n && w[colon] != ':')
            colon++;
        u64 size, base, irq;
        if (at >= n || colon >= n || !parse_num(w, at, &size) || !parse_num(w + at + 1, colon - at - 1, &base) ||
            !parse_num(w + colon + 1, n - colon - 1, &irq) || size < 0x100 || !mapped(base, size) || irq >= 24 ||
            nvdevs >= VIRTIO_MAX_DEVICES) {
            puts("guest: bad or too many virtio_mmio.device= words: ");
            putn(cmd_line + start, i - start);
            putc('\n');
            guest_exit(EXIT_FAIL);
        }
        struct vdev *d = &vdevs[nvdevs++];
        d->base = base;
        d->size = (u32)size;
        d->irq = (u32)irq;
    }
}

static void virtio_report(struct exc_frame *f) __attribute__((noreturn));
static void virtio_report(struct exc_frame *f)
{
    (void)f;
    /* vlog is ring 3's: bounded by its size whatever it wrote into vlog_len. */
    usize n = vlog_len < sizeof(vlog) ? vlog_len : sizeof(vlog);
    usize line = 0;
    for (usize i = 0; i < n; i++) {
        if (vlog[i] == '\n') {
            puts("guest: ");
            putn(vlog + line, i - line);
            putc('\n');
            line = i + 1;
        }
    }
    for (u32 i = 0; i < nvdevs; i++) {
        puts("guest: virtio irqs slot=");
        put_hex(vdevs[i].base);
        puts(" count=");
        put_dec(vdevs[i].irqs);
        putc('\n');
    }
    puts(vresult ? "guest: virtio ok\n" : "guest: virtio FAILED\n");
    guest_exit(vresult ? EXIT_OK : EXIT_FAIL);
}

/* Finds the devices, routes their pins to VIRTIO_VECTOR, runs `fn` in ring 3 with interrupts
   on, and reports when it traps back. */
static void test_virtio(void (*fn)(void))
{
    find_virtio_devices();
    puts("guest: virtio devices=");
    put_dec(nvdevs);
    putc('\n');
    set_gate(VIRTIO_VECTOR, (u64)(usize)virtio_irq);
    for (u32 i = 0; i < nvdevs; i++) {
        ioapic_write(0x10 + 2 * vdevs[i].irq + 1, 0);
        ioapic_write(0x10 + 2 * vdevs[i].irq, VIRTIO_VECTOR);
    }
    *(volatile u32 *)(usize)(LAPIC_BASE + 0x80) = 0;     /* TPR: accept every priority */
    *(volatile u32 *)(usize)(LAPIC_BASE + 0xf0) = 0x1ff; /* SVR: APIC on, spurious vector 0xff */
    setup_tss();
    ring3_fn = fn;
    ring3_after = virtio_report;
    ring3_running = RING3_CALL;
    enter_ring3_irq((u64)(usize)ring3_call, (u64)(usize)(virtio_stack + sizeof(virtio_stack)));
}

/* ------------------------------------------------------------------------ */
/* skiff.test=cpus: the Intel MP table (MultiProcessor Specification 1.4). */

#define MP_FLOAT_SIG 0x5f504d5fu /* "_MP_" */
#define MP_CONF_SIG 0x504d4350u  /* "PCMP" */
#define MP_CONF_HDR 44           /* configuration table header bytes */
#define MP_MAX_CPUS 256          /* APIC ids are 8 bits */

struct mp_info {
    u64 floating, table, lapic;
    u32 spec_rev, length, count_field, entries;
    u32 cpus, bsp, bsps, ioapics, ioapic_addr, ioapic_id;
    u32 ncpu;                  /* processor entries, enabled or not */
    u8 cpu_id[MP_MAX_CPUS];    /* their APIC ids, in table order */
    u8 cpu_flags[MP_MAX_CPUS]; /* their flags: bit 0 enabled, bit 1 bootstrap */
};

/* A pointer to guest-physical memory that the compiler may not reason about:
   address 0 is a valid place to look (the first KiB), not a null pointer. */
static const u8 *phys(u64 addr)
{
    const u8 *p = (const u8 *)(usize)addr;
    __asm__("" : "+r"(p));
    return p;
}

static u8 sum8(const u8 *p, u32 n)
{
    u8 s = 0;
    for (u32 i = 0; i < n; i++)
        s = (u8)(s + p[i]);
    return s;
}

/* This CPU's initial APIC id: CPUID.1:EBX[31:24]. */
static u32 cpuid_apic_id(void)
{
    u32 a = 1, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return b >> 24;
}

/* Linux's smp_scan_config(): a floating pointer is "_MP_" on a 16-byte
   boundary, 16 bytes long (length 1), spec revision 1 or 4, bytes summing to
   0. Prints why any "_MP_" it skips was not one. Returns its address or 0. */
static u64 mp_scan(u64 base, u64 len)
{
    for (u64 a = base; a + 16 <= base + len; a += 16) {
        const u8 *p = phys(a);
        if (rd32(p, 0) != MP_FLOAT_SIG)
            continue;
        const char *why = 0;
        if (p[8] != 1)
            why = "length is not 1";
        else if (p[9] != 1 && p[9] != 4)
            why = "spec revision is not 1 or 4";
        else if (sum8(p, 16) != 0)
            why = "checksum: bytes do not sum to 0";
        if (!why)
            return a;
        puts("guest: mptable skipped _MP_ at ");
        put_hex(a);
        puts(": ");
        puts(why);
        putc('\n');
    }
    return 0;
}

static void put_text(const u8 *p, u32 n) /* an ID string, trailing spaces dropped */
{
    while (n && (p[n - 1] == ' ' || p[n - 1] == 0))
        n--;
    for (u32 i = 0; i < n; i++)
        putc(p[i] > ' ' && p[i] < 0x7f ? (char)p[i] : '?');
}

static int mp_fail(const char *why)
{
    puts("guest: mptable ");
    puts(why);
    putc('\n');
    return 0;
}

/* Finds and checks the MP table, prints it, fills *m. Returns 1 if it is
   usable: both checksums, the revisions, every entry, exactly one enabled
   bootstrap processor that is this CPU, and an IO-APIC. */
static int mp_read(struct mp_info *m)
{
    memset(m, 0, sizeof(*m));
    /* Where Linux looks (default_find_smp_config), in its order: the first
       KiB, the last KiB of base memory (QEMU's qboot puts it there), the BIOS
       area 0xf0000-0xfffff (skiff puts it there), then the EBDA. */
    u64 f = mp_scan(0x0, 0x400);
    if (!f)
        f = mp_scan(639 * 0x400, 0x400);
    if (!f)
        f = mp_scan(0xf0000, 0x10000);
    if (!f) {
        u64 ebda = (u64)rd16(phys(0x40e), 0) << 4;
        if (ebda >= 0x400 && ebda < 0xa0000)
            f = mp_scan(ebda, 0x400);
    }
    if (!f)
        return mp_fail("not found (no valid _MP_ in 0x0-0x3ff, 0x9fc00-0x9ffff, 0xf0000-0xfffff or the EBDA)");
    m->floating = f;
    const u8 *fp = phys(f);
    m->table = rd32(fp, 4);
    if (!m->table) {
        puts("guest: mptable floating=");
        put_hex(f);
        puts(" names default configuration ");
        put_dec(fp[11]);
        puts(", no table\n");
        return 0;
    }
    if (!mapped(m->table, MP_CONF_HDR))
        return mp_fail("configuration table not below 4 GiB");
    const u8 *t = phys(m->table);
    m->spec_rev = t[6];
    m->length = rd16(t, 4);
    m->count_field = rd16(t, 34);
    m->lapic = rd32(t, 36);
    u32 ext_len = rd16(t, 40);

    puts("guest: mptable floating=");
    put_hex(f);
    puts(" spec_rev=");
    put_dec(fp[9]);
    puts(" table=");
    put_hex(m->table);
    puts(" table_spec_rev=");
    put_dec(m->spec_rev);
    puts(" length=");
    put_dec(m->length);
    puts(" count_field=");
    put_dec(m->count_field);
    puts(" lapic=");
    put_hex(m->lapic);
    puts(" oem=");
    put_text(t + 8, 8);
    puts(" product=");
    put_text(t + 16, 12);
    putc('\n');

    if (rd32(t, 0) != MP_CONF_SIG)
        return mp_fail("configuration table signature is not PCMP");
    if (m->length < MP_CONF_HDR || !mapped(m->table, (u64)m->length + ext_len))
        return mp_fail("configuration table length is bad");
    if (m->spec_rev != 1 && m->spec_rev != 4)
        return mp_fail("configuration table spec revision is not 1 or 4");
    if (sum8(t, m->length) != 0)
        return mp_fail("configuration table checksum: bytes do not sum to 0");
    if (ext_len && (u8)(sum8(t + m->length, ext_len) + t[42]) != 0)
        return mp_fail("extended table checksum: bytes do not sum to 0");

    /* The entries, walked by the table's length as Linux does (its entry
       count field is printed above; qboot leaves it 0). */
    u32 buses = 0, io_ints = 0, local_ints = 0;
    for (u32 off = MP_CONF_HDR; off < m->length; m->entries++) {
        const u8 *e = t + off;
        u32 size = e[0] == 0 ? 20 : e[0] <= 4 ? 8 : 0;
        if (!size || off + size > m->length) {
            puts("guest: mptable entry at offset ");
            put_dec(off);
            puts(size ? " runs past the table's end\n" : " has an unknown type ");
            if (!size) {
                put_dec(e[0]);
                putc('\n');
            }
            return 0;
        }
        switch (e[0]) {
        case 0: /* processor: id, version, flags */
            if (m->ncpu == MP_MAX_CPUS)
                return mp_fail("more than 256 processor entries");
            m->cpu_id[m->ncpu] = e[1];
            m->cpu_flags[m->ncpu] = e[3];
            m->ncpu++;
            if (e[3] & 1) {
                m->cpus++;
                if (e[3] & 2) {
                    m->bsp = e[1];
                    m->bsps++;
                }
            }
            break;
        case 1:
            buses++;
            break;
        case 2: /* IO-APIC: id, version, flags (bit 0 usable), address */
            if ((e[3] & 1) && !m->ioapics++) {
                m->ioapic_id = e[1];
                m->ioapic_addr = rd32(e, 4);
            }
            break;
        case 3:
            io_ints++;
            break;
        default:
            local_ints++;
            break;
        }
        off += size;
    }

    puts("guest: mptable processors=");
    for (u32 i = 0; i < m->ncpu; i++) {
        if (i)
            putc(',');
        put_dec(m->cpu_id[i]);
        if (!(m->cpu_flags[i] & 1))
            puts(":disabled");
    }
    puts(" buses=");
    put_dec(buses);
    puts(" ioapics=");
    put_dec(m->ioapics);
    puts(" io_ints=");
    put_dec(io_ints);
    puts(" local_ints=");
    put_dec(local_ints);
    putc('\n');

    puts("guest: mptable cpus=");
    put_dec(m->cpus);
    puts(" bsp=");
    put_dec(m->bsp);
    puts(" ioapic=");
    put_hex(m->ioapic_addr);
    puts(" ioapic_id=");
    put_dec(m->ioapic_id);
    puts(" entries=");
    put_dec(m->entries);
    putc('\n');

    int ok = 1;
    for (u32 i = 0; i < m->ncpu; i++)
        for (u32 j = 0; j < i; j++)
            if (m->cpu_id[i] == m->cpu_id[j])
                ok = mp_fail("two processor entries have the same APIC id");
    if (m->bsps != 1)
        ok = mp_fail("there is not exactly one enabled bootstrap processor");
    else if (m->bsp != cpuid_apic_id()) {
        puts("guest: mptable bootstrap processor is not this CPU (CPUID.1 APIC id ");
        put_dec(cpuid_apic_id());
        puts(")\n");
        ok = 0;
    }
    if (!m->ioapics)
        ok = mp_fail("has no usable IO-APIC");
    if (!m->lapic || !mapped(m->lapic, 0x1000))
        ok = mp_fail("local APIC address is 0 or not below 4 GiB");
    return ok;
}

static struct mp_info mp;

static void test_cpus(void)
{
    int ok = mp_read(&mp);
    puts(ok ? "guest: mptable ok\n" : "guest: mptable failed\n");
    guest_exit(ok ? EXIT_OK : EXIT_FAIL);
}

/* ------------------------------------------------------------------------ */
/* skiff.test=smp: the MP table, then INIT-SIPI-SIPI to every AP it lists. */

#define AP_TRAMP_BASE 0x10000 /* entry.S: AP_TRAMP_BASE; free in skiff's layout */
#define AP_STAGE_OFF 0x800    /* entry.S: AP_STAGE_OFF; one byte per APIC id */
#define LAPIC_ID 0x20
#define LAPIC_VERSION 0x30
#define LAPIC_SVR 0xf0
#define LAPIC_ESR 0x280
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_INIT 0x500
#define ICR_STARTUP 0x600
#define ICR_BUSY (1u << 12) /* delivery status: send pending */
#define ICR_ASSERT (1u << 14)
#define ICR_LEVEL (1u << 15)
#define MSR_APIC_BASE 0x1b

/* Waits are spin counts ("pause" loops), not time. Measured on this machine's
   KVM (ring 0 emulated): a bare delay spin takes ~3 us, a poll spin (which
   also reads memory) ~8 us; on QEMU TCG a spin takes ~0.3 us. The bounds are
   sized for the slow KVM (a total failure ends after ~1 s with 3 APs); an AP
   that starts ends its wait early. QEMU TCG sometimes needs the second SIPI. */
#define SPIN_AFTER_INIT 3000      /* ~10 ms here (the spec's 10 ms after INIT) */
#define SPIN_SIPI_POLL 10000      /* per SIPI, polling the AP's stage byte: ~80 ms */
#define SPIN_ALL_POLL 100000      /* then all APs in long mode: ~0.8 s */

volatile u32 ap_started; /* entry.S: each AP adds 1 in long mode */

static volatile u8 *ap_stage(void) { return (volatile u8 *)(usize)(AP_TRAMP_BASE + AP_STAGE_OFF); }

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return lo | (u64)hi << 32;
}

static void spin(u32 n)
{
    for (u32 i = 0; i < n; i++)
        __asm__ volatile("pause" ::: "memory");
}

static u32 lapic_rd(u32 reg) { return *(volatile u32 *)(usize)(mp.lapic + reg); }
static void lapic_wr(u32 reg, u32 v) { *(volatile u32 *)(usize)(mp.lapic + reg) = v; }

/* Sends one IPI; returns 0 if the ICR still says "send pending" after a while. */
static int send_ipi(u32 apic_id, u32 icr)
{
    lapic_wr(LAPIC_ICR_HI, apic_id << 24);
    lapic_wr(LAPIC_ICR_LO, icr);
    for (u32 i = 0; i < 1000; i++)
        if (!(lapic_rd(LAPIC_ICR_LO) & ICR_BUSY))
            return 1;
    return 0;
}

/* Polls the AP's stage byte for up to n spins, adding the spins to *spins;
   returns the stage reached. */
static u8 wait_stage(u32 apic_id, u8 want, u32 n, u32 *spins)
{
    volatile u8 *st = ap_stage();
    u32 i = 0;
    for (; i < n && st[apic_id] < want; i++)
        __asm__ volatile("pause" ::: "memory");
    *spins += i;
    return st[apic_id];
}

static const char *stage_name(u8 s)
{
    static const char *const names[] = { "none", "real-mode", "32-bit", "long-mode" };
    return s < 4 ? names[s] : "bad";
}

static void test_smp(void)
{
    if (!mp_read(&mp)) {
        puts("guest: mptable failed\n");
        guest_exit(EXIT_FAIL);
    }
    puts("guest: mptable ok\n");

    /* The local APIC: globally enabled in IA32_APIC_BASE (bit 11), this CPU
       the bootstrap processor (bit 8); enable it in software (SVR bit 8). */
    u64 base_msr = rdmsr(MSR_APIC_BASE);
    u32 id = lapic_rd(LAPIC_ID) >> 24;
    puts("guest: smp apic_base_msr=");
    put_hex(base_msr);
    puts(" lapic_id=");
    put_dec(id);
    puts(" lapic_version=");
    put_hex(lapic_rd(LAPIC_VERSION));
    putc('\n');
    if ((base_msr & ~0xfffull) != mp.lapic || !(base_msr & (1u << 11)) || !(base_msr & (1u << 8)) || id != mp.bsp) {
        puts("guest: smp the local APIC is not the MP table's, not enabled, or not the bootstrap processor's\n");
        guest_exit(EXIT_FAIL);
    }
    lapic_wr(LAPIC_SVR, lapic_rd(LAPIC_SVR) | 0x1ff); /* enabled, spurious vector 0xff */

    /* The trampoline page: the code, then a zeroed stage byte per APIC id. */
    u8 *page = (u8 *)(usize)AP_TRAMP_BASE;
    __asm__("" : "+r"(page));
    memset(page, 0, 0x1000);
    memcpy(page, ap_tramp_start, (usize)(ap_tramp_end - ap_tramp_start));
    __asm__ volatile("" ::: "memory");

    u32 aps = 0, sipis[MP_MAX_CPUS], spins[MP_MAX_CPUS];
    int ipi_ok = 1;
    for (u32 i = 0; i < mp.ncpu; i++) {
        u32 ap = mp.cpu_id[i];
        sipis[i] = spins[i] = 0;
        if (!(mp.cpu_flags[i] & 1) || ap == mp.bsp)
            continue;
        aps++;
        lapic_wr(LAPIC_ESR, 0);
        ipi_ok &= send_ipi(ap, ICR_INIT | ICR_ASSERT | ICR_LEVEL);
        ipi_ok &= send_ipi(ap, ICR_INIT | ICR_LEVEL); /* de-assert */
        spin(SPIN_AFTER_INIT);
        /* The spec's two SIPIs; the second only if the AP is not running
           real-mode code after the first (a running AP ignores it anyway). */
        while (sipis[i] < 2) {
            ipi_ok &= send_ipi(ap, ICR_STARTUP | (AP_TRAMP_BASE >> 12));
            sipis[i]++;
            if (wait_stage(ap, 1, SPIN_SIPI_POLL, &spins[i]) >= 1)
                break;
        }
    }
    if (!ipi_ok)
        puts("guest: smp an IPI stayed pending (ICR delivery status busy)\n");

    u32 waited = 0;
    for (; waited < SPIN_ALL_POLL && ap_started < aps; waited++)
        __asm__ volatile("pause" ::: "memory");
    u32 started = ap_started;

    for (u32 i = 0; i < mp.ncpu; i++) {
        u32 ap = mp.cpu_id[i];
        if (!(mp.cpu_flags[i] & 1) || ap == mp.bsp)
            continue;
        puts("guest: ap apic_id=");
        put_dec(ap);
        puts(" sipis=");
        put_dec(sipis[i]);
        puts(" spins=");
        put_dec(spins[i]);
        puts(" stage=");
        puts(stage_name(ap_stage()[ap]));
        putc('\n');
    }
    /* A stage byte for an APIC id the table does not list means an AP
       that is not where the table says. */
    u8 listed[MP_MAX_CPUS];
    memset(listed, 0, sizeof(listed));
    for (u32 i = 0; i < mp.ncpu; i++)
        listed[mp.cpu_id[i]] = 1;
    for (u32 a = 0; a < MP_MAX_CPUS; a++) {
        if (!listed[a] && ap_stage()[a]) {
            puts("guest: ap apic_id=");
            put_dec(a);
            puts(" is not in the MP table but reached stage=");
            puts(stage_name(ap_stage()[a]));
            putc('\n');
        }
    }
    puts("guest: smp waited spins=");
    put_dec(waited);
    puts(" of ");
    put_dec(SPIN_ALL_POLL);
    putc('\n');
    puts("guest: aps started=");
    put_dec(started);
    puts(" of ");
    put_dec(aps);
    putc('\n');
    guest_exit(started == aps ? EXIT_OK : EXIT_FAIL);
}

/* The command line at paddr (0: none): at most MAX_CMDLINE bytes, up to its
   NUL, never past 4 GiB. */
static usize cmdline_at(u64 paddr, const char **cmd)
{
    *cmd = "";
    if (!paddr)
        return 0;
    if (!mapped(paddr, 1)) {
        puts("guest: cmdline not below 4 GiB\n");
        guest_exit(EXIT_FAIL);
    }
    *cmd = (const char *)(usize)paddr;
    usize max = MAX_CMDLINE;
    if (MAPPED_LIMIT - paddr < max)
        max = (usize)(MAPPED_LIMIT - paddr);
    return bounded_strlen(*cmd, max);
}

void guest_main(u64 info_paddr, u32 boot_mode)
{
    setup_idt();

    const struct hvm_start_info *si = 0;
    const u8 *bp = 0;
    const char *cmd;
    usize cmdlen;
    if (boot_mode == BOOT_BZIMAGE) {
        if (!mapped(info_paddr, BP_SIZE)) {
            puts("guest: boot_params not below 4 GiB\n");
            guest_exit(EXIT_FAIL);
        }
        bp = (const u8 *)(usize)info_paddr;
        if (rd32(bp, BP_HDR_MAGIC) != HDRS_MAGIC) {
            puts("guest: bad boot_params hdr magic=");
            put_hex(rd32(bp, BP_HDR_MAGIC));
            puts(" at ");
            put_hex(info_paddr);
            puts(" (want 0x53726448)\n");
            guest_exit(EXIT_FAIL);
        }
        cmdlen = cmdline_at(rd32(bp, BP_CMD_LINE_PTR) | (u64)rd32(bp, BP_EXT_CMD_LINE_PTR) << 32, &cmd);
    } else {
        if (!mapped(info_paddr, sizeof(struct hvm_start_info))) {
            puts("guest: start_info not below 4 GiB\n");
            guest_exit(EXIT_FAIL);
        }
        si = (const struct hvm_start_info *)(usize)info_paddr;
        if (si->magic != HVM_START_MAGIC) {
            puts("guest: bad start_info magic=");
            put_hex(si->magic);
            puts(" at ");
            put_hex(info_paddr);
            puts(" (want 0x336ec578)\n");
            guest_exit(EXIT_FAIL);
        }
        cmdlen = cmdline_at(si->cmdline_paddr, &cmd);
    }

    const char *t = "";
    long tl = find_test(cmd, cmdlen, &t);
    puts("guest: boot test=");
    if (tl > 0)
        putn(t, (usize)tl);
    putc('\n');

    usize n = tl > 0 ? (usize)tl : 0;
    if (tl > 0) {
        if (equals(t, n, "facts")) {
            if (bp)
                facts_bzimage(bp, cmd, cmdlen);
            else
                facts_pvh(si, (u32)info_paddr, cmd, cmdlen);
        }
        if (equals(t, n, "echo"))
            test_echo();
        if (equals(t, n, "reset"))
            test_reset();
        if (equals(t, n, "triplefault"))
            test_triplefault();
        if (equals(t, n, "ring3"))
            test_ring3();
        if (equals(t, n, "cpus"))
            test_cpus();
        if (equals(t, n, "doorbell"))
            test_doorbell(DOORBELL_ROUNDS, 0);
        if (equals(t, n, "doorbell-lost"))
            test_doorbell(DOORBELL_ROUNDS, 1);
        if (starts_with(t, n, "doorbell=")) {
            u32 rounds;
            if (!parse_u32(t + 9, n - 9, &rounds) || rounds == 0) {
                puts("guest: bad doorbell rounds (want decimal 1..4294967295)\n");
                guest_exit(EXIT_USAGE);
            }
            test_doorbell(rounds, 0);
        }
        if (equals(t, n, "smp"))
            test_smp();
        cmd_line = cmd;
        cmd_len = cmdlen;
        if (equals(t, n, "virtio-rng"))
            test_virtio(virtio_rng_ring3);
        if (equals(t, n, "virtio-blk"))
            test_virtio(virtio_blk_ring3);
        if (equals(t, n, "virtio-vsock"))
            test_virtio(virtio_vsock_ring3);
        if (equals(t, n, "virtio-vsock-irq")) {
            virtio_irq_driven = 1;
            test_virtio(virtio_vsock_ring3);
        }
        if (equals(t, n, "virtio-vsock-irq-drop")) {
            virtio_irq_driven = 1;
            virtio_irq_drop = 1;
            test_virtio(virtio_vsock_ring3);
        }
        if (equals(t, n, "virtio-hostile"))
            test_virtio(virtio_hostile_ring3);
        if (starts_with(t, n, "exit=")) {
            u32 status;
            if (!parse_u32(t + 5, n - 5, &status)) {
                puts("guest: bad exit status (want decimal 0..4294967295)\n");
                guest_exit(EXIT_USAGE);
            }
            guest_exit(status);
        }
    }
    puts("guest: unknown test\n");
    guest_exit(EXIT_USAGE);
}
