/*
 * skiff test guest: PVH entry, switch to 64-bit long mode, exception stubs
 * and the ring-3 payload.
 *
 * The VMM enters pvh_entry in 32-bit protected mode with paging off, flat
 * segments, interrupts off and %ebx = guest-physical address of struct
 * hvm_start_info (the Xen PVH boot ABI; see Linux arch/x86/platform/pvh/head.S).
 * Nothing else is assumed: not the stack, not the GDT, not the selectors.
 *
 * The bzImage build (bzimage.S, bzimage.ld) links this file too, without
 * .text.entry and the Xen note: it enters at its own 64-bit entry and reuses
 * the GDT, page tables, stack, exception stubs and ring-3 payload below.
 *
 * This machine's KVM emulates ring-0 instructions one by one (slowly), so the
 * page tables are built by the assembler, not by a loop at run time.
 */

#include "early.h"

#define SEL_KCODE	0x08	/* 64-bit kernel code */
#define SEL_KDATA	0x10	/* kernel data */

/* ------------------------------------------------------------------------ */
/* The Xen note the VMM looks for: PHYS32_ENTRY (type 18), 4-byte value.     */

	.section .note.Xen, "a", @note
	.balign 4
	.long 4			/* namesz: "Xen\0" */
	.long 4			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_entry

/* ------------------------------------------------------------------------ */
	.section .text.entry, "ax", @progbits
	.code32
	.globl pvh_entry
pvh_entry:
	/* Record the entry state before changing anything. The stack is
	   ours (.bss); PVH promises none. pushfl is the only way to read
	   EFLAGS, so point %esp at our stack first. */
	movl	$boot_stack_top, %esp
	pushfl
	popl	%eax
	movl	%eax, entry_eflags
	movl	%ebx, entry_ebx
	movl	%cr0, %eax
	movl	%eax, entry_cr0
	movl	%cr4, %eax
	movl	%eax, entry_cr4
	movw	%cs, entry_cs
	movw	%ds, entry_ds
	movw	%es, entry_es
	movw	%ss, entry_ss

	cld

	/* Zero .bss (the ELF loader should have, but it costs one
	   instruction to not depend on it). */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	shrl	$2, %ecx
	xorl	%eax, %eax
	rep stosl

	/* Long mode supported? CPUID.80000001h:EDX bit 29. */
	movl	$0x80000000, %eax
	cpuid
	cmpl	$0x80000001, %eax
	jb	no_long_mode
	movl	$0x80000001, %eax
	cpuid
	btl	$29, %edx
	jnc	no_long_mode

	lgdt	gdt_ptr

	/* PAE on, page tables (built statically in .data), EFER.LME, paging. */
	movl	%cr4, %eax
	orl	$0x20, %eax			/* CR4.PAE */
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx		/* EFER */
	rdmsr
	orl	$0x100, %eax			/* EFER.LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax		/* CR0.PG | CR0.PE */
	movl	%eax, %cr0
	ljmp	$SEL_KCODE, $long_mode_entry

no_long_mode:
	movl	$msg_no_long_mode, %esi
	EARLY_SAY_AND_EXIT 4

/* ------------------------------------------------------------------------ */
	.code64
long_mode_entry:
	movl	$SEL_KDATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movq	$boot_stack_top, %rsp
	movl	entry_ebx, %edi			/* zero-extends: start_info paddr */
	xorl	%esi, %esi			/* boot_mode: BOOT_PVH (guest.c) */
	call	guest_main
	/* guest_main does not return; if it did, stop here. */
1:	cli
	hlt
	jmp	1b

/* ------------------------------------------------------------------------ */
/* Shared with the bzImage build (which leaves .text.entry out). */
	.text

/*
 * Exception stubs for vectors 0..31, each 16 bytes apart (exc_stubs + 16*n).
 * Stubs for vectors without a CPU error code push a 0 so every frame looks
 * the same: vector, error code, rip, cs, rflags, rsp, ss.
 */
	.balign 16
	.globl exc_stubs
exc_stubs:
	vec = 0
	.rept 32
	.balign 16
	.if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq	$0
	.endif
	pushq	$vec
	jmp	exc_common
	vec = vec + 1
	.endr

exc_common:
	/* The CPU aligned %rsp to 16 before pushing 5 (or 6) quadwords; with
	   the two pushes above %rsp is 8 mod 16. Align for the C call. */
	movq	%rsp, %rdi
	andq	$-16, %rsp
	call	exception_handler		/* does not return */
1:	cli
	hlt
	jmp	1b

/*
 * enter_ring3(rip, rsp): iretq to ring 3 with interrupts off.
 */
	.globl enter_ring3
enter_ring3:
	pushq	$0x1b				/* SS: user data, RPL 3 */
	pushq	%rsi				/* RSP */
	pushq	$0x2				/* RFLAGS: IF=0, IOPL=0 */
	pushq	$0x23				/* CS: user code, RPL 3 */
	pushq	%rdi				/* RIP */
	iretq

/*
 * enter_ring3_irq(rip, rsp): the same with interrupts on (RFLAGS.IF), so that a device
 * interrupt can reach the guest while ring 3 runs (skiff.test=doorbell).
 */
	.globl enter_ring3_irq
enter_ring3_irq:
	pushq	$0x1b
	pushq	%rsi
	pushq	$0x202				/* RFLAGS: IF=1, IOPL=0 */
	pushq	$0x23
	pushq	%rdi
	iretq

/*
 * The doorbell test device's interrupt (IDT vector DOORBELL_VECTOR in guest.c): count it,
 * end it at the local APIC (EOI register at 0xfee000b0), return to where it came from.
 */
	.globl doorbell_irq
doorbell_irq:
	pushq	%rax
	incq	doorbell_irqs(%rip)
	movabsq	$0xfee000b0, %rax
	movl	$0, (%rax)
	popq	%rax
	iretq

/*
 * The virtio devices' interrupt (IDT vector VIRTIO_VECTOR in guest.c): virtio_irq_handler (C,
 * virtio.c) acknowledges and counts it; then EOI. Saves what the C ABI lets a callee clobber.
 */
	.globl virtio_irq
virtio_irq:
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%rbp
	movq	%rsp, %rbp
	andq	$-16, %rsp
	call	virtio_irq_handler
	movq	%rbp, %rsp
	popq	%rbp
	movabsq	$0xfee000b0, %rax
	movl	$0, (%rax)
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rax
	iretq

/*
 * Ring-3 payload: sum 1..10,000,000, store it in ring3_result, then ud2.
 * The #UD (vector 6) enters ring 0 through the IDT and TSS.rsp0, where
 * exception_handler checks it came from ring3_ud2 at CPL 3.
 * Ring 3 cannot do port I/O on this machine, hence the round trip.
 */
	.section .text.user, "ax", @progbits
	.globl ring3_entry, ring3_ud2
ring3_entry:
	xorl	%eax, %eax
	movl	$1, %ecx
1:	addq	%rcx, %rax
	incq	%rcx
	cmpq	$10000000, %rcx
	jbe	1b
	movq	%rax, ring3_result(%rip)
ring3_ud2:
	ud2
	jmp	ring3_ud2

/*
 * Ring-3 payload of skiff.test=doorbell. For round = 1..doorbell_rounds: write the round to
 * the device's doorbell (MMIO, from ring 3), then wait until the host has written the number
 * of rings it saw to doorbell_reply AND the device's interrupt has been taken that many times
 * (doorbell_irqs, counted by doorbell_irq in ring 0); with doorbell_lost set, only for the
 * interrupt. Gives up on a round after 2^30 polls
 * (about a second). Stores the first round not completed in doorbell_round, then ud2 back to
 * ring 0, which reports.
 */
#define DOORBELL_RING	0xd0000e50	/* guest.c DOORBELL_BASE + 0x50 */
	.globl ring3_doorbell, ring3_doorbell_ud2
ring3_doorbell:
	movl	$1, %ecx
1:	movabsq	$DOORBELL_RING, %rdx
	movl	%ecx, (%rdx)
	movl	$0x40000000, %r8d
2:	cmpq	$0, doorbell_lost(%rip)		/* doorbell-lost: no reply is coming */
	jne	6f
	cmpq	%rcx, doorbell_reply(%rip)
	jne	3f
6:	cmpq	%rcx, doorbell_irqs(%rip)
	je	4f
3:	decq	%r8
	jnz	2b
	jmp	5f
4:	incq	%rcx
	cmpq	doorbell_rounds(%rip), %rcx
	jbe	1b
5:	movq	%rcx, doorbell_round(%rip)
ring3_doorbell_ud2:
	ud2
	jmp	ring3_doorbell_ud2

/*
 * Ring-3 payload that calls a C function (ring3_fn, set by ring 0; the virtio tests' driver in
 * virtio.c), then ud2 back to ring 0. The stack is 16-byte aligned at entry, so after the call
 * pushes the return address the callee sees the ABI's alignment.
 */
	.globl ring3_call, ring3_call_ud2
ring3_call:
	call	*ring3_fn(%rip)
ring3_call_ud2:
	ud2
	jmp	ring3_call_ud2

/* ------------------------------------------------------------------------ */
/*
 * The AP trampoline (skiff.test=smp). Only ever executed from its copy at
 * AP_TRAMP_BASE (guest.c copies ap_tramp_start..ap_tramp_end there before it
 * sends the SIPIs; the SIPI vector is AP_TRAMP_BASE >> 12), so it lives in
 * .rodata, and every address in it is computed for that copy.
 *
 * An AP leaves INIT/SIPI in real mode with CS = AP_TRAMP_BASE >> 4, IP = 0.
 * It goes real mode -> 32-bit protected mode -> 64-bit long mode (the
 * guest's own page tables), and writes how far it got into
 * stage[its APIC id] (CPUID.1:EBX[31:24]) at AP_TRAMP_BASE + AP_STAGE_OFF:
 *   1 = running in real mode, 2 = in 32-bit protected mode, 3 = in long mode.
 * In long mode it adds 1 to ap_started with a locked add, then halts with
 * interrupts off, forever. It uses no stack and takes no interrupts.
 */
#define AP_TRAMP_BASE	0x10000		/* guest.c: AP_TRAMP_BASE */
#define AP_STAGE_OFF	0x800		/* guest.c: AP_STAGE_OFF */
#define AP_ABS(sym)	(AP_TRAMP_BASE + ((sym) - ap_tramp_start))

	.section .rodata
	.balign 16
	.globl ap_tramp_start, ap_tramp_end
	.code16
ap_tramp_start:
	cli
	movw	%cs, %ax			/* AP_TRAMP_BASE >> 4 */
	movw	%ax, %ds
	movl	$1, %eax
	cpuid
	shrl	$24, %ebx			/* %ebx = this CPU's initial APIC id */
	movb	$1, AP_STAGE_OFF(%bx)		/* stage 1: real mode */
	lgdtl	(ap_gdt_ptr - ap_tramp_start)
	movl	%cr0, %eax
	orl	$0x1, %eax			/* CR0.PE */
	movl	%eax, %cr0
	ljmpl	$0x08, $AP_ABS(ap_pm32)

	.code32
ap_pm32:
	movl	$0x10, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movb	$2, AP_TRAMP_BASE + AP_STAGE_OFF(%ebx)	/* stage 2: 32-bit */
	movl	%cr4, %eax
	orl	$0x20, %eax			/* CR4.PAE */
	movl	%eax, %cr4
	movl	$pml4, %eax			/* the BSP's page tables (below 4 GiB) */
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx		/* EFER */
	rdmsr
	orl	$0x100, %eax			/* EFER.LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000000, %eax		/* CR0.PG */
	movl	%eax, %cr0
	ljmp	$0x18, $AP_ABS(ap_lm64)

	.code64
ap_lm64:
	movb	$3, AP_TRAMP_BASE + AP_STAGE_OFF(%rbx)	/* stage 3: long mode */
	lock incl ap_started			/* absolute address, not %rip-relative */
	cli
	hlt
	.byte	0xeb, 0xfc			/* jmp back to the cli (a fixed-size jump keeps
						   the size check below constant) */

ap_gdt:						/* (unaligned: an alignment would make the size check below non-constant) */
	.quad 0				/* 0x00 null */
	.quad 0x00cf9a000000ffff	/* 0x08 code, 32-bit */
	.quad 0x00cf92000000ffff	/* 0x10 data */
	.quad 0x00af9a000000ffff	/* 0x18 code, 64-bit */
ap_gdt_end:
ap_gdt_ptr:
	.word ap_gdt_end - ap_gdt - 1
	.long AP_ABS(ap_gdt)
ap_tramp_end:
	.if (ap_tramp_end - ap_tramp_start) > AP_STAGE_OFF
	.error "the AP trampoline overlaps its stage bytes"
	.endif

/* ------------------------------------------------------------------------ */
	.section .rodata
msg_no_long_mode:
	.asciz "guest: no long mode\n"

	.data
	.balign 8
	.globl entry_eflags, entry_ebx, entry_cr0, entry_cr4
	.globl entry_cs, entry_ds, entry_es, entry_ss
entry_eflags:	.long 0
entry_ebx:	.long 0
entry_cr0:	.long 0
entry_cr4:	.long 0
entry_cs:	.word 0
entry_ds:	.word 0
entry_es:	.word 0
entry_ss:	.word 0

/* The bzImage build's 64-bit entry state (bzimage.S writes these before it
   zeroes .bss, so they live here in .data). Unused in the PVH build. */
	.balign 8
	.globl entry64_cr0, entry64_cr4, entry64_efer, entry64_rsi
	.globl entry64_cs, entry64_ds, entry64_ss
entry64_cr0:	.quad 0
entry64_cr4:	.quad 0
entry64_efer:	.quad 0
entry64_rsi:	.quad 0
entry64_cs:	.word 0
entry64_ds:	.word 0
entry64_ss:	.word 0

/*
 * GDT. The TSS descriptor (slots 5-6) is filled in by C before ltr.
 */
	.balign 16
	.globl gdt, gdt_ptr
gdt:
	.quad 0				/* 0x00 null */
	.quad 0x00af9a000000ffff	/* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff	/* 0x10 kernel data */
	.quad 0x00cff2000000ffff	/* 0x18 user data, DPL 3 */
	.quad 0x00affa000000ffff	/* 0x20 user code, 64-bit, DPL 3 */
	.quad 0, 0			/* 0x28 TSS (16 bytes) */
gdt_end:
	.balign 8
	.word 0				/* so the base below is 8-aligned */
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt			/* lgdt in 32-bit mode reads 4 bytes */

/*
 * Identity map of the first 4 GiB with 2 MiB pages, built by the assembler
 * (no run-time loop). User bit set everywhere so ring 3 can run its code
 * and stack in place; no SMEP/SMAP.
 */
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + 0x7			/* P | RW | US */
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + 0x7
	.quad pd + 0x1000 + 0x7
	.quad pd + 0x2000 + 0x7
	.quad pd + 0x3000 + 0x7
	.fill 508, 8, 0
pd:
	addr = 0
	.rept 2048
	.quad addr + 0x87			/* P | RW | US | PS (2 MiB) */
	addr = addr + 0x200000
	.endr

/* ------------------------------------------------------------------------ */
	.bss
	.balign 16
boot_stack:
	.skip 16384
	.globl boot_stack_top
boot_stack_top:
