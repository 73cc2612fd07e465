// Kernel flavors: kernel-config/6.1/<flavor>/ holds `config` (a fragment applied on top of the
// default one) and `*.patch` (unified diffs against the source, applied with `patch -p1` in name
// order). Kept apart from build.ts so the CLI can name them without loading the build code.

/** pvm-native: compatibility changes for KVM on PVM's instruction emulator only (docs/backends.md). */
export const KERNEL_FLAVORS = ['pvm-native'] as const;
export type KernelFlavor = (typeof KERNEL_FLAVORS)[number];

/**
 * The kernel command line a pvm-native kernel needs on KVM on PVM, where KVM_SET_CPUID2 is mostly
 * ignored, so the kernel is told itself to leave alone what the emulator cannot run in ring 0
 * (xrstor: noxsave; cmpxchg16b: cx16) and features it would otherwise use from there. The rest
 * only saves boot time: no legacy BSD ptys (512 devices to create, about a minute emulated).
 */
export const PVM_NATIVE_CMDLINE = 'noxsave clearcpuid=cx16,popcnt,rdrand,rdseed,fsgsbase,smap,pku,pcid,invpcid pty.legacy_count=0';
