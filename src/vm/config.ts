// VmConfig: everything a Machine needs, validated once here. Engines only consume it.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { inspectKernel, type KernelInfo } from '../kernel/inspect.js';

export class VmConfigError extends Error {}

export const LIMITS = {
  cpus: { min: 1, max: 64 },
  memoryMiB: { min: 32, max: 64 * 1024 },
  timeoutSec: { min: 0.1, max: 7 * 24 * 3600 },
  /** x86 COMMAND_LINE_SIZE, including the terminating NUL. */
  cmdlineBytes: 2048,
  /** Kept free for what an engine appends (QEMU: virtio_mmio.device=..., TCG timer settings). */
  engineCmdlineReserve: 256,
  /** virtio-mmio slots left for disks after the other devices (layout.h). */
  disks: 8,
} as const;

export const DEFAULTS = { cpus: 1, memoryMiB: 256 } as const;

/** The port of the exit device: QEMU's isa-debug-exit, and the native VMM's own. */
export const EXIT_PORT = 0xf4;

export interface VmConfigInput {
  kernel: string;
  initrd?: string;
  /** Extra kernel command line, appended after skiff's own. */
  cmdline?: string;
  /** The command skiff-init runs; absent: an interactive shell on the console. */
  command?: string[];
  cpus?: number;
  memoryMiB?: number;
  timeoutSec?: number;
  /** Keep the kernel's boot messages (drops "quiet"). */
  verbose?: boolean;
  /** virtio-blk disks: raw image files, in the order the guest sees them (vda, vdb, ...). */
  disks?: readonly DiskInput[];
  /** 'nat': a virtio-net NIC behind libslirp (rootless NAT, DNS); 'none': no NIC. */
  network?: NetworkMode;
  /** Host loopback ports forwarded into the guest (implies network 'nat'). */
  publish?: readonly PortForward[];
  /** The VM's directory for its sockets (vsock, vsock_PORT); absent: a fresh private one. */
  vmDir?: string;
}

export type NetworkMode = 'nat' | 'none';

export interface PortForward {
  readonly hostPort: number;
  readonly guestPort: number;
  readonly protocol: 'tcp' | 'udp';
}

export interface DiskInput {
  path: string;
  readOnly?: boolean;
}

export interface Disk {
  /** Absolute path of a raw image file. */
  readonly path: string;
  readonly readOnly: boolean;
  /** GET_ID's 20-byte serial: the guest sees it as /sys/block/vdX/serial. */
  readonly serial: string;
}

export interface VmConfig {
  readonly kernel: KernelInfo;
  readonly initrd?: string;
  /** The whole kernel command line, as the guest will see it. */
  readonly cmdline: string;
  readonly cpus: number;
  readonly memoryMiB: number;
  readonly timeoutMs?: number;
  readonly disks: readonly Disk[];
  readonly network: NetworkMode;
  readonly publish: readonly PortForward[];
  /** The directory the user chose for the VM's sockets (src/store/store.ts makeVmDir). */
  readonly vmDir?: string;
}

function checkRange(name: string, value: number, range: { min: number; max: number }, integer: boolean): number {
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value)) || value < range.min || value > range.max) {
    throw new VmConfigError(`${name} must be ${integer ? 'a whole number ' : ''}from ${range.min} to ${range.max}, got ${value}`);
  }
  return value;
}

/** skiff-init reads the command hex-encoded, NUL-separated: no quoting rule of the kernel can mangle it. */
export function encodeCommand(argv: readonly string[]): string {
  if (argv.length === 0) throw new VmConfigError('the command is empty');
  for (const arg of argv) if (arg.includes('\0')) throw new VmConfigError('a command argument contains a NUL byte');
  return Buffer.from(argv.map((a) => `${a}\0`).join(''), 'utf8').toString('hex');
}

export function buildCmdline(input: Pick<VmConfigInput, 'cmdline' | 'command' | 'verbose'>): string {
  const parts = [
    'console=ttyS0',
    // End the VM on reboot and on panic: QEMU runs with -no-reboot, reboot=t is a triple fault.
    'reboot=t',
    'panic=-1',
    // Only one UART is ever present; probing the default four costs boot time.
    '8250.nr_uarts=1',
    // The IO-APIC timer check is a timed wait that TCG's scheduling can fail (printing
    // "MP-BIOS bug" with 2+ vCPUs); the timer is wired the same on every skiff machine.
    'no_timer_check',
    `skiff.exit_port=0x${EXIT_PORT.toString(16)}`,
  ];
  // The console carries the command's output: only critical kernel messages (a panic) belong there.
  // Without it, a PCI-capable kernel on a machine without PCI prints "PCI: Fatal: ..." at KERN_ERR.
  if (!input.verbose) parts.push('quiet', 'loglevel=2');
  if (input.cmdline?.trim()) parts.push(input.cmdline.trim());
  if (input.command) parts.push(`skiff.cmd=${encodeCommand(input.command)}`);
  const cmdline = parts.join(' ');
  const limit = LIMITS.cmdlineBytes - LIMITS.engineCmdlineReserve - 1;
  if (Buffer.byteLength(cmdline) > limit) {
    throw new VmConfigError(`kernel command line is ${Buffer.byteLength(cmdline)} bytes, the limit is ${limit}: shorten the command or --cmdline`);
  }
  return cmdline;
}

async function checkReadable(what: string, file: string): Promise<string> {
  const abs = path.resolve(file);
  try {
    const st = await fs.stat(abs);
    if (!st.isFile()) throw new VmConfigError(`${what} ${file} is not a regular file`);
    await fs.access(abs, fs.constants.R_OK);
  } catch (err) {
    if (err instanceof VmConfigError) throw err;
    throw new VmConfigError(`${what} ${file}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
  }
  return abs;
}

/** `--disk FILE[,ro]`: the flag's text → a DiskInput. */
export function parseDiskFlag(flag: string): DiskInput {
  const parts = flag.split(',');
  const options = parts.slice(1);
  for (const o of options) if (o !== 'ro') throw new VmConfigError(`--disk ${flag}: unknown option "${o}" (expected FILE or FILE,ro)`);
  if (!parts[0]) throw new VmConfigError(`--disk ${flag}: no file`);
  return { path: parts[0], readOnly: options.includes('ro') };
}

/** `--publish HOSTPORT:GUESTPORT[/udp]` → a PortForward. */
export function parsePublishFlag(flag: string): PortForward {
  const m = /^(\d{1,5}):(\d{1,5})(?:\/(tcp|udp))?$/.exec(flag);
  const port = (text: string, what: string) => {
    const n = Number(text);
    if (n < 1 || n > 65535) throw new VmConfigError(`--publish ${flag}: ${what} port must be 1-65535`);
    return n;
  };
  if (!m) throw new VmConfigError(`--publish ${flag}: expected HOSTPORT:GUESTPORT or HOSTPORT:GUESTPORT/udp`);
  return { hostPort: port(m[1], 'host'), guestPort: port(m[2], 'guest'), protocol: (m[3] ?? 'tcp') as 'tcp' | 'udp' };
}

function checkPublish(forwards: readonly PortForward[]): PortForward[] {
  const seen = new Set<string>();
  for (const f of forwards) {
    const key = `${f.hostPort}/${f.protocol}`;
    if (seen.has(key)) throw new VmConfigError(`--publish: host port ${key} is given twice`);
    seen.add(key);
  }
  return forwards.map((f) => Object.freeze({ ...f }));
}

async function checkDisks(inputs: readonly DiskInput[]): Promise<Disk[]> {
  if (inputs.length > LIMITS.disks) throw new VmConfigError(`at most ${LIMITS.disks} disks, got ${inputs.length}`);
  const seen = new Set<string>();
  const disks: Disk[] = [];
  for (const [i, d] of inputs.entries()) {
    const abs = await checkReadable('disk', d.path);
    if (!d.readOnly) {
      await fs.access(abs, fs.constants.W_OK).catch(() => {
        throw new VmConfigError(`disk ${d.path} is not writable (give it as ${d.path},ro to attach it read-only)`);
      });
    }
    if (seen.has(abs)) throw new VmConfigError(`disk ${d.path} is given twice`);
    seen.add(abs);
    disks.push(Object.freeze({ path: abs, readOnly: d.readOnly ?? false, serial: `skiff-disk-${i}` }));
  }
  return disks;
}

/**
 * The NIC both engines hand the addon for `config.network` (undefined for 'none'). `seed` picks
 * the MAC (the addon's Net::stableMac, the one place it is computed): the engines pass the VM's
 * directory, which no two running VMs share (a private one, or a --vm-dir that skiff locks), so
 * each VM gets its own locally administered address.
 */
export function netDevice(config: VmConfig, seed: string): { seed: string; forwards: { hostPort: number; guestPort: number; udp: boolean }[] } | undefined {
  if (config.network === 'none') return undefined;
  return { seed, forwards: config.publish.map((f) => ({ hostPort: f.hostPort, guestPort: f.guestPort, udp: f.protocol === 'udp' })) };
}

export async function makeVmConfig(input: VmConfigInput): Promise<VmConfig> {
  const kernelPath = await checkReadable('kernel', input.kernel);
  let kernel: KernelInfo;
  try {
    kernel = await inspectKernel(kernelPath, { version: false });
  } catch (err) {
    throw new VmConfigError((err as Error).message);
  }
  if (kernel.format === 'elf' && kernel.pvhEntry === undefined) {
    throw new VmConfigError(`${input.kernel} is an ELF vmlinux without a PVH entry note (build it with CONFIG_PVH=y, or boot its bzImage)`);
  }
  const config: VmConfig = {
    kernel,
    initrd: input.initrd === undefined ? undefined : await checkReadable('initrd', input.initrd),
    cmdline: buildCmdline(input),
    cpus: checkRange('--cpus', input.cpus ?? DEFAULTS.cpus, LIMITS.cpus, true),
    memoryMiB: checkRange('--memory (MiB)', input.memoryMiB ?? DEFAULTS.memoryMiB, LIMITS.memoryMiB, true),
    timeoutMs: input.timeoutSec === undefined ? undefined : checkRange('--timeout (seconds)', input.timeoutSec, LIMITS.timeoutSec, false) * 1000,
    disks: Object.freeze(await checkDisks(input.disks ?? [])),
    publish: Object.freeze(checkPublish(input.publish ?? [])),
    network: input.network ?? ((input.publish?.length ?? 0) > 0 ? 'nat' : 'none'),
    vmDir: input.vmDir,
  };
  if (config.network === 'none' && config.publish.length > 0) throw new VmConfigError('--publish needs a network: drop --network none');
  return Object.freeze(config);
}
