// The native engine: skiff's own VMM (hypervisor/) runs the guest on a native thread of this
// process. The guest reports its status through the exit device at the same port as on QEMU.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { PVM_NATIVE_CMDLINE } from '../kernel/flavors.js';
import type { KernelInfo } from '../kernel/inspect.js';
import { loadAddon, type NativeMachineConfig, type NativeResult } from './addon.js';
import { EngineUnavailableError, probeHost } from './host.js';
import { makeVmDir, type VmDir } from '../store/store.js';
import { ConsoleTap, findPanic, type ReadyMarker } from './console.js';
import { netDevice, type VmConfig } from './config.js';
import type { Machine, MachineExit } from './machine.js';

export async function startNative(config: VmConfig): Promise<Machine> {
  // Only KVM on PVM needs the pvm-native flavor's command line; elsewhere nothing is looked up.
  const release = probeHost().pvm ? (config.kernel.version ?? (await kernelRelease(config.kernel))) : undefined;
  const maxDisks = nativeMaxDisks(config);
  if (config.disks.length > maxDisks) {
    const others = config.network === 'none' ? 'one each for rng and vsock' : 'one each for rng, vsock and net';
    throw new EngineUnavailableError(`the native engine takes at most ${maxDisks} disks with --network ${config.network} (8 virtio-mmio slots, ${others}), got ${config.disks.length}`);
  }
  const vmDir = await makeVmDir(config.vmDir);
  try {
    return new NativeMachine(config, engineCmdline(config.cmdline, release), vmDir);
  } catch (err) {
    await vmDir.release();
    throw err;
  }
}

/** virtio-mmio slots (hypervisor/vmm/layout.h) less rng and vsock. */
export const NATIVE_MAX_DISKS = 6;

/** Disks a VM can have on the native engine: net takes a slot only when it is attached. */
export function nativeMaxDisks(config: Pick<VmConfig, 'network'>): number {
  return config.network === 'none' ? NATIVE_MAX_DISKS : NATIVE_MAX_DISKS - 1;
}

/** The kernel flavor built for KVM on PVM's instruction emulator (src/kernel/flavors.ts) says so in its release. */
const PVM_NATIVE_RELEASE = /-skiff-pvm-native$/;

/**
 * The command line the native engine boots with: the config's, plus PVM_NATIVE_CMDLINE's words
 * (those not already there) when the kernel is the pvm-native flavor, which cannot boot on KVM on
 * PVM without them (docs/backends.md). `added` says what was added, for --verbose.
 */
export function engineCmdline(cmdline: string, release: string | undefined): { cmdline: string; added: string } {
  if (!release || !PVM_NATIVE_RELEASE.test(release)) return { cmdline, added: '' };
  const have = new Set(cmdline.split(/\s+/));
  const added = PVM_NATIVE_CMDLINE.split(' ').filter((w) => !have.has(w)).join(' ');
  return { cmdline: added ? `${cmdline} ${added}` : cmdline, added };
}

const BANNER = Buffer.from('Linux version ');
/** Linux puts linux_banner near the start of .rodata (0x100 in skiff's 6.1 builds); looked for in this much of it. */
const BANNER_WINDOW = 1 << 20;

/**
 * A kernel's release ("6.1.192-skiff-pvm-native") without reading the whole file: a boot reads
 * only the ELF headers and notes (src/kernel/inspect.ts, version: false), and the release is in
 * neither. For a vmlinux: the section headers, then the start of .rodata for linux_banner; for a
 * bzImage: the version string its setup header points to. Undefined when it is not found.
 */
export async function kernelRelease(kernel: KernelInfo): Promise<string | undefined> {
  const fh = await fs.open(kernel.path, 'r');
  try {
    const { size } = await fh.stat();
    const read = async (offset: number, length: number): Promise<Buffer | undefined> => {
      if (!Number.isSafeInteger(offset) || offset < 0 || length <= 0 || offset >= size) return undefined;
      const buf = Buffer.alloc(Math.min(length, size - offset));
      const { bytesRead } = await fh.read(buf, 0, buf.length, offset);
      return buf.subarray(0, bytesRead);
    };
    const firstWord = (b: Buffer | undefined, at: number) => {
      if (!b || at < 0 || at >= b.length) return undefined;
      const end = b.indexOf(0, at);
      const text = b.toString('latin1', at, end < 0 ? Math.min(b.length, at + 256) : Math.min(end, at + 256));
      return /^\d+\.\d+\S*/.exec(text)?.[0];
    };
    if (kernel.format === 'bzimage') {
      const hdr = await read(0x20e, 2);
      if (!hdr || hdr.length < 2 || hdr.readUInt16LE(0) === 0) return undefined;
      return firstWord(await read(hdr.readUInt16LE(0) + 0x200, 256), 0);
    }
    const eh = await read(0, 64);
    if (!eh || eh.length < 64) return undefined;
    const shoff = Number(eh.readBigUInt64LE(0x28));
    const shentsize = eh.readUInt16LE(0x3a);
    const shnum = eh.readUInt16LE(0x3c);
    const shstrndx = eh.readUInt16LE(0x3e);
    if (shentsize < 64 || shnum === 0 || shstrndx >= shnum) return undefined;
    const sh = await read(shoff, shentsize * shnum);
    if (!sh || sh.length < shentsize * shnum) return undefined;
    const section = (i: number) => ({ name: sh.readUInt32LE(i * shentsize), offset: Number(sh.readBigUInt64LE(i * shentsize + 0x18)), size: Number(sh.readBigUInt64LE(i * shentsize + 0x20)) });
    const strtab = section(shstrndx);
    const names = await read(strtab.offset, Math.min(strtab.size, 1 << 16));
    if (!names) return undefined;
    for (let i = 0; i < shnum; i++) {
      const s = section(i);
      if (names.toString('latin1', s.name, s.name + 8) !== '.rodata\0') continue;
      // The first 64 KiB nearly always holds it; the rest of the window only if not.
      for (const window of [1 << 16, BANNER_WINDOW]) {
        const data = await read(s.offset, Math.min(s.size, window));
        const at = data?.indexOf(BANNER) ?? -1;
        if (at >= 0) return firstWord(data, at + BANNER.length);
        if (window >= s.size) break;
      }
      return undefined;
    }
    return undefined;
  } finally {
    await fh.close();
  }
}

/**
 * What the native engine attaches to every VM: virtio-rng, the config's disks (virtio-blk, in
 * order: vda, vdb, ...) and virtio-vsock (guest CID 3) with its Unix sockets in `vmDir`; then
 * virtio-net when the config has a network.
 */
export function nativeDevices(config: VmConfig, vmDir: string): Pick<NativeMachineConfig, 'rng' | 'disks' | 'vsockDir' | 'net'> {
  return { rng: true, disks: config.disks.map((d) => ({ path: d.path, readOnly: d.readOnly, serial: d.serial })), vsockDir: vmDir, net: netDevice(config, vmDir) };
}

export class NativeMachine implements Machine {
  readonly engine = 'native' as const;
  readonly description: string;
  readonly output: ConsoleTap;
  readonly input: Writable;
  readonly ready: Promise<ReadyMarker | undefined>;
  /** Host-side timing of the last run, for benchmarks. */
  lastResult?: NativeResult;
  private readonly exit: Promise<MachineExit>;
  private timedOut = false;
  private readonly handle;
  /** The VM's directory (0700); what skiff made there goes when the VM ends. */
  readonly vmDir: string;
  /** Host -> guest vsock: connect here, send "CONNECT <port>\n", read "OK <port>\n", then the stream is the guest's. */
  readonly vsockPath: string;

  constructor(
    private readonly config: VmConfig,
    boot: { cmdline: string; added: string },
    dir: VmDir,
  ) {
    const vmDir = dir.path;
    this.vmDir = vmDir;
    this.vsockPath = path.join(vmDir, 'vsock');
    const addon = loadAddon();
    this.description = `native (${addon.probe().backend ?? 'no backend'})${boot.added ? `; pvm-native kernel, so the command line gets: ${boot.added}` : ''}`;
    this.handle = new addon.Machine({ kernel: config.kernel.path, initrd: config.initrd, cmdline: boot.cmdline, cpus: config.cpus, memoryMiB: config.memoryMiB, ...nativeDevices(config, vmDir) });
    let markReady: (m: ReadyMarker | undefined) => void = () => {};
    this.ready = new Promise((resolve) => (markReady = resolve));
    this.output = new ConsoleTap((m) => markReady(m));
    const handle = this.handle;
    this.input = new Writable({
      write(chunk: Buffer, _enc, done) {
        handle.input(chunk);
        done();
      },
    });
    const timer = config.timeoutMs === undefined ? undefined : setTimeout(() => {
      this.timedOut = true;
      handle.kill();
    }, config.timeoutMs);
    this.exit = handle.start((chunk) => this.output.write(chunk)).then(async (result) => {
      if (timer) clearTimeout(timer);
      this.lastResult = result;
      this.output.end();
      markReady(undefined);
      await dir.release();
      return this.judge(result);
    });
  }

  private judge(r: NativeResult): MachineExit {
    if (this.timedOut) return { kind: 'timeout', seconds: this.config.timeoutMs! / 1000 };
    const panic = findPanic(this.output.tail());
    switch (r.kind) {
      case 'exited':
        return { kind: 'exited', status: r.status };
      case 'killed':
        return { kind: 'killed' };
      case 'reset':
      case 'shutdown':
        return panic !== undefined ? { kind: 'panic', message: panic } : { kind: 'ended', detail: r.kind === 'reset' ? 'it reset the machine' : `it shut down (${r.detail})` };
      case 'error':
        return { kind: 'failed', message: `native engine: ${r.detail}` };
    }
  }

  wait(): Promise<MachineExit> {
    return this.exit;
  }

  kill(): void {
    this.handle.kill();
  }
}
