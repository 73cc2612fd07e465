/* Shared by entry.S and bzimage.S: the ports the guest relies on, and the one early way out
   before any C code runs (a wrong entry, no long mode). */
#define PORT_EXIT	0xf4
#define PORT_COM1	0x3f8

/* Prints the NUL-terminated message at %si/%esi (loaded by the caller, in whatever code size is
   current) on the UART, polling LSR.THRE, then writes `status` to the exit port and halts. */
.macro EARLY_SAY_AND_EXIT status
1:	lodsb
	testb	%al, %al
	jz	2f
	movb	%al, %bl
	movw	$(PORT_COM1 + 5), %dx
3:	inb	%dx, %al
	testb	$0x20, %al
	jz	3b
	movw	$PORT_COM1, %dx
	movb	%bl, %al
	outb	%al, %dx
	jmp	1b
2:	movl	$\status, %eax
	movw	$PORT_EXIT, %dx
	outl	%eax, %dx
4:	cli
	hlt
	jmp	4b
.endm
