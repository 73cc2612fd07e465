/*
 * skiff test guest, bzImage build: the Linux x86 boot-protocol header and the
 * 64-bit entry (Linux Documentation/x86/boot.rst, "THE REAL-MODE KERNEL
 * HEADER" and "64-bit BOOT PROTOCOL"; layout as in arch/x86/boot/header.S).
 *
 * The file is the "real-mode" part, (setup_sects + 1) * 512 = 1024 bytes
 * (section .bzimage.setup), followed by the "protected-mode" part, which the
 * loader copies to 0x100000 (bzimage.ld puts .bzimage.head first there):
 *
 *   load + 0x000  32-bit entry (code32_start): not supported, says so, exit 5
 *   load + 0x200  startup_64: the 64-bit entry this build is booted through
 *
 * At startup_64 the loader guarantees: 64-bit mode, paging on with an
 * identity map covering the image, boot_params and the command line, a GDT
 * with flat __BOOT_CS (0x10) and __BOOT_DS (0x18) loaded into CS and DS/ES/SS,
 * interrupts off, %rsi = guest-physical address of struct boot_params. The
 * guest records that state, then switches to its own GDT, page tables and
 * stack (the ones entry.S builds for the PVH build) and joins guest_main().
 *
 * Nothing is computed at run time that the assembler or linker can compute:
 * this machine's KVM emulates every ring-0 instruction (slowly).
 */

#include "early.h"

#define SEL_KCODE	0x08	/* entry.S's GDT: 64-bit kernel code */
#define SEL_KDATA	0x10	/* entry.S's GDT: kernel data */

#define BOOT_BZIMAGE	1	/* guest_main()'s boot_mode (guest.c) */
#define EXIT_BAD_ENTRY	5	/* entered somewhere this build does not support */

#define LOADED_HIGH	0x01	/* loadflags bit 0: protected-mode part at 0x100000 */
#define XLF_KERNEL_64	0x01	/* xloadflags bit 0: has the 64-bit entry at +0x200 */

/* ------------------------------------------------------------------------ */
/* The real-mode part: 1024 bytes, file offsets 0x000-0x3ff. Its addresses
   (VMA) are file offsets, which is what a real-mode loader's DS would use. */

	.section .bzimage.setup, "a", @progbits
	.code16

	.org	0x1f1
hdr:
setup_sects:	.byte	1			/* + 1 boot sector = 1024 bytes */
root_flags:	.word	0
syssize:	.long	__syssize		/* protected-mode part / 16 (bzimage.ld) */
ram_size:	.word	0
vid_mode:	.word	0xffff			/* "normal", as Linux */
root_dev:	.word	0
boot_flag:	.word	0xaa55

	/* 0x200: a short jump over the header; its offset byte tells a
	   loader where the header ends (0x202 + byte at 0x201). */
jump:		.byte	0xeb, start_of_setup - 1f
1:
header:		.ascii	"HdrS"			/* 0x53726448 */
version:	.word	0x020f			/* boot protocol 2.15 */
realmode_swtch:	.long	0
start_sys_seg:	.word	0x1000			/* obsolete; Linux's value */
kernel_version:	.word	0			/* no version string */
type_of_loader:	.byte	0			/* set by the loader */
loadflags:	.byte	LOADED_HIGH
setup_move_size: .word	0x8000			/* Linux's value; unused */
code32_start:	.long	0x100000
ramdisk_image:	.long	0			/* set by the loader */
ramdisk_size:	.long	0			/* set by the loader */
bootsect_kludge: .long	0
heap_end_ptr:	.word	0
ext_loader_ver:	.byte	0
ext_loader_type: .byte	0
cmd_line_ptr:	.long	0			/* set by the loader */
initrd_addr_max: .long	0x7fffffff		/* as Linux */
kernel_alignment: .long	0x1000
relocatable_kernel: .byte 0			/* load at pref_address only */
min_alignment:	.byte	12			/* 4 KiB */
xloadflags:	.word	XLF_KERNEL_64
cmdline_size:	.long	2047
hardware_subarch: .long	0			/* X86_SUBARCH_PC */
hardware_subarch_data: .quad 0
payload_offset:	.long	0			/* not compressed: no payload */
payload_length:	.long	0
setup_data:	.quad	0
pref_address:	.quad	0x100000
init_size:	.long	__init_size		/* load address to end of .bss (bzimage.ld) */
handover_offset: .long	0			/* no EFI handover */
kernel_info_offset: .long kernel_info - 0x100000
hdr_end:
	.if (hdr_end - hdr) != (0x26c - 0x1f1)
	.error "the setup header must end at 0x26c (boot protocol 2.15)"
	.endif

	/* Real-mode entry (a loader that runs the setup code jumps to
	   setup + 0x200 with DS = ES = SS = the setup segment). This
	   build has no real-mode setup: say so and stop. */
start_of_setup:
	cli
	cld
	movw	$msg_real_mode, %si
	EARLY_SAY_AND_EXIT EXIT_BAD_ENTRY

msg_real_mode:
	.asciz	"guest: bzImage real-mode entry is not supported (boot through the 64-bit entry at load address + 0x200)\n"

	.org	0x400			/* end of the real-mode part */

/* ------------------------------------------------------------------------ */
/* The protected-mode part, at the load address 0x100000. */

	.section .bzimage.head, "ax", @progbits

	/* load + 0: the 32-bit entry (code32_start). Not supported. */
	.code32
	.globl	startup_32
startup_32:
	cli
	cld
	movl	$msg_32bit, %esi
	EARLY_SAY_AND_EXIT EXIT_BAD_ENTRY

	/* load + 0x200: the 64-bit entry. */
	.org	0x200
	.code64
	.globl	startup_64
startup_64:
	/* Record the entry state before changing anything (no stack: ours
	   is in .bss, which is not zeroed yet, and the loader's is not
	   trusted). These variables live in .data (entry.S). */
	movw	%cs, entry64_cs(%rip)
	movw	%ds, entry64_ds(%rip)
	movw	%ss, entry64_ss(%rip)
	movq	%rsi, entry64_rsi(%rip)
	movq	%cr0, %rax
	movq	%rax, entry64_cr0(%rip)
	movq	%cr4, %rax
	movq	%rax, entry64_cr4(%rip)
	movl	$0xc0000080, %ecx		/* EFER */
	rdmsr
	movl	%eax, entry64_efer(%rip)
	movl	%edx, entry64_efer+4(%rip)

	cld

	/* Zero .bss: the loader copies only the file; init_size told it
	   how much memory the image needs, not that it is zero. */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	shrl	$3, %ecx
	xorl	%eax, %eax
	rep stosq

	movq	$boot_stack_top, %rsp

	/* Our GDT (with the ring-3 segments and the TSS slot) and our page
	   tables (U/S set, so ring 3 can run in place), both from entry.S. */
	lgdt	gdt_ptr(%rip)
	movq	$pml4, %rax
	movq	%rax, %cr3
	pushq	$SEL_KCODE
	pushq	$1f
	lretq
1:	movl	$SEL_KDATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs

	movq	entry64_rsi(%rip), %rdi		/* boot_params */
	movl	$BOOT_BZIMAGE, %esi
	call	guest_main
	/* guest_main does not return; if it did, stop here. */
2:	cli
	hlt
	jmp	2b

/* ------------------------------------------------------------------------ */
	.section .rodata
msg_32bit:
	.asciz	"guest: bzImage 32-bit entry is not supported (boot through the 64-bit entry at load address + 0x200)\n"

/*
 * kernel_info (boot protocol 2.15), at kernel_info_offset from the load
 * address. setup_type_max = 0: the guest reads no setup_data.
 */
	.balign	4
kernel_info:
	.ascii	"LToP"				/* header */
	.long	kernel_info_var_len_data - kernel_info	/* size */
	.long	kernel_info_end - kernel_info	/* size_total */
	.long	0				/* setup_type_max */
kernel_info_var_len_data:
kernel_info_end:
