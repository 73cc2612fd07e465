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
extern char ring3_entry[], ring3_ud2[];
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

static struct idt_gate idt[32] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
static u8 ring0_stack[8192] __attribute__((aligned(16)));  /* TSS.rsp0 */
static u8 ring3_stack[4096] __attribute__((aligned(16)));
u64 ring3_result;
static int ring3_running;

struct exc_frame {
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

static void setup_idt(void)
{
    for (int i = 0; i < 32; i++) {
        u64 a = (u64)(usize)exc_stubs + 16 * (u64)i;
        idt[i].off0 = (u16)a;
        idt[i].sel = 0x08;
        idt[i].ist = 0;
        idt[i].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
        idt[i].off1 = (u16)(a >> 16);
        idt[i].off2 = (u32)(a >> 32);
        idt[i].zero = 0;
    }
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
void exception_handler(struct exc_frame *f)
{
    if (ring3_running && f->vector == 6 && (f->cs & 3) == 3) {
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
    ring3_running = 1;
    enter_ring3((u64)(usize)ring3_entry, (u64)(usize)(ring3_stack + sizeof(ring3_stack)));
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
