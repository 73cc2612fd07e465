// The QEMU engine: qemu-system-x86_64 -M microvm runs the guest (KVM where hardware virtualization
// is real, TCG otherwise); skiff reads the guest's exit status from a virtio serial port and
// QEMU's isa-debug-exit device. The guest's disks, rng, vsock and NIC are skiff's own device models,
// served from this process over vhost-user (hypervisor/transport/): QEMU shares guest memory with
// us as a memfd and connects to one Unix socket per device in the VM's private directory.
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { makeVmDir, type VmDir } from '../store/store.js';
import { loadAddon, type DeviceServerHandle } from './addon.js';
import { ConsoleTap, findPanic, type ReadyMarker } from './console.js';
import { EXIT_PORT, netDevice, type VmConfig } from './config.js';
import type { Accel } from './host.js';
import type { Machine, MachineExit } from './machine.js';

export const QEMU_BINARY = 'qemu-system-x86_64';

export interface QemuOptions {
  accel: Accel;
  /** Count guest instructions: TCG with -icount shift=0,sleep=off (1 instruction = 1 ns of guest time). */
  icount?: boolean;
  binary?: string;
}

/**
 * TCG emulates no TSC-deadline timer, so the kernel would calibrate the local APIC timer against
 * the PIT: ~100 ms of guest busy-waiting, two thirds of skiff's boot (measured: 308 M guest
 * instructions to init with it, 92 M without). The PIT drives the tick instead.
 */
const TCG_CMDLINE = 'noapictimer';
// The NAT's MTU: SlirpBackend::kMtu in hypervisor/devices/virtio/slirp_backend.h (libslirp's
// largest). Keep the two equal: the guest must not send frames larger than the back-end takes.
const NAT_MTU = 65521;

/** QEMU's option parser treats ',' as a separator; a literal comma is written twice. */
function optionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

/** skiff's vhost-user sockets, as DeviceServer reports them. */
export interface DeviceSockets {
  sockets: readonly { kind: string; path: string }[];
  /** The MAC of the 'net' socket's NIC (QEMU's virtio-net-device holds the config space). */
  netMac?: string | null;
}

/** QEMU's vhost-user device for each kind skiff serves (all on microvm's virtio-mmio bus). */
const VHOST_USER_DEVICE: Record<string, string> = {
  blk: 'vhost-user-blk,num-queues=1',
  rng: 'vhost-user-rng',
  vsock: 'vhost-user-vsock-device',
};

export function qemuArgs(config: VmConfig, statusFile: string, options: QemuOptions, devices?: DeviceSockets): string[] {
  const accel = options.icount ? 'tcg' : options.accel;
  const args = [
    '-nodefaults',
    '-no-user-config',
    '-nographic',
    // Under TCG microvm needs the PIT and the RTC: without the RTC the kernel spins about a second.
    // acpi=off: skiff's kernel has no ACPI, and QEMU then puts virtio_mmio.device= on the command line.
    // Guest RAM is a memfd QEMU shares with skiff's vhost-user devices (share=on; sealed against
    // shrinking by default, which the devices require before they map it).
    '-M', `microvm,pit=on,rtc=on,pic=on,acpi=off,isa-serial=on${devices ? ',memory-backend=mem' : ''}`,
    '-accel', accel,
    '-cpu', accel === 'kvm' ? 'host' : 'max',
    '-smp', String(config.cpus),
    '-m', `${config.memoryMiB}M`,
    ...(devices ? ['-object', `memory-backend-memfd,id=mem,size=${config.memoryMiB}M,share=on`] : []),
    '-no-reboot',
    '-serial', 'stdio',
    '-kernel', config.kernel.path,
    '-append', accel === 'tcg' ? `${config.cmdline} ${TCG_CMDLINE}` : config.cmdline,
    '-global', 'virtio-mmio.force-legacy=false',
    '-device', `isa-debug-exit,iobase=0x${EXIT_PORT.toString(16)},iosize=4`,
    '-chardev', `file,id=skiffstatus,path=${optionValue(statusFile)}`,
    '-device', 'virtio-serial-device',
    '-device', 'virtserialport,chardev=skiffstatus,name=skiff.status',
  ];
  // Disks first: the kernel probes virtio_mmio.device= words in order, so disk i becomes vd(a+i).
  for (const [i, s] of (devices?.sockets ?? []).entries()) {
    if (s.kind === 'net') {
      // A netdev, not a device with a chardev: QEMU's virtio-net-device keeps the config space
      // (MAC, link status) and the control queue, and hands skiff's back-end the rx/tx queues.
      // host_mtu: QEMU offers VIRTIO_NET_F_MTU so Linux sets eth0 to the back-end's MTU (skiff's
      // back-end offers no NET_MTU protocol feature, so QEMU sends no VHOST_USER_NET_SET_MTU).
      if (!devices?.netMac) throw new Error('a vhost-user net socket without its MAC');
      args.push('-chardev', `socket,id=vu${i},path=${optionValue(s.path)}`, '-netdev', `vhost-user,id=net${i},chardev=vu${i}`, '-device', `virtio-net-device,netdev=net${i},mac=${devices.netMac},host_mtu=${NAT_MTU}`);
      continue;
    }
    const device = VHOST_USER_DEVICE[s.kind];
    if (!device) throw new Error(`unknown vhost-user device kind ${s.kind}`);
    args.push('-chardev', `socket,id=vu${i},path=${optionValue(s.path)}`, '-device', `${device},chardev=vu${i}`);
  }
  if (config.initrd) args.push('-initrd', config.initrd);
  if (options.icount) args.push('-icount', 'shift=0,sleep=off');
  return args;
}

/** isa-debug-exit makes QEMU exit with (value << 1) | 1, truncated to 8 bits by the OS. */
function debugExitCode(status: number): number {
  return ((status << 1) | 1) & 0xff;
}

/**
 * skiff's devices for this guest: its disks, virtio-rng (so the guest's crng is ready at boot),
 * virtio-vsock (guest CID 3; the host side is `<vmDir>/vsock` and `<vmDir>/vsock_<port>`) and,
 * with a network, virtio-net behind libslirp (its --publish ports are listened on here, before
 * QEMU starts).
 */
export function serveDevices(config: VmConfig, vmDir: string): DeviceServerHandle {
  const addon = loadAddon();
  return new addon.DeviceServer({
    socketDir: vmDir,
    disks: config.disks.map((d) => ({ path: d.path, readOnly: d.readOnly, serial: d.serial })),
    rng: true,
    vsock: true,
    net: netDevice(config, vmDir),
  });
}

export async function startQemu(config: VmConfig, options: QemuOptions): Promise<QemuMachine> {
  const vmDir = await makeVmDir(config.vmDir);
  const statusFile = path.join(vmDir.path, 'skiff-status');
  const binary = options.binary ?? QEMU_BINARY;
  let devices: DeviceServerHandle | undefined;
  let child: ChildProcess;
  try {
    devices = serveDevices(config, vmDir.path);
    child = spawn(binary, qemuArgs(config, statusFile, options, devices), { stdio: ['pipe', 'pipe', 'pipe'] });
  } catch (err) {
    devices?.close();
    await vmDir.release();
    throw err;
  }
  return new QemuMachine(child, config, vmDir, statusFile, options, binary, devices);
}

export class QemuMachine implements Machine {
  readonly engine = 'qemu' as const;
  readonly description: string;
  readonly hostPid?: number;
  readonly output: ConsoleTap;
  readonly input;
  readonly ready: Promise<ReadyMarker | undefined>;
  private readonly exit: Promise<MachineExit>;
  /** The host end of vsock: connect and write "CONNECT <port>\n" to reach guest port <port>. */
  readonly vsockPath: string;
  readonly vmDir: string;
  private stderrTail = '';
  private timedOut = false;
  private killed = false;
  private deviceCpuAtClose?: number;

  constructor(
    private readonly child: ChildProcess,
    private readonly config: VmConfig,
    /** The VM's directory (0700): vhost-user sockets, vsock sockets, the status file. */
    private readonly dir: VmDir,
    private readonly statusFile: string,
    options: QemuOptions,
    binary: string,
    private readonly devices: DeviceServerHandle,
  ) {
    this.hostPid = child.pid;
    this.vmDir = dir.path;
    this.vsockPath = devices.vsockPath;
    this.description = `qemu microvm (${options.icount ? 'tcg, icount' : options.accel})`;
    let markReady: (m: ReadyMarker | undefined) => void = () => {};
    this.ready = new Promise((resolve) => (markReady = resolve));
    this.output = new ConsoleTap((m) => markReady(m));
    child.stdout!.pipe(this.output);
    this.input = child.stdin!;
    // A guest that stops reading its console must not make writes to it fail the host process.
    child.stdin!.on('error', () => {});
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (text: string) => {
      this.stderrTail = (this.stderrTail + text).slice(-4096);
    });

    const timer = config.timeoutMs === undefined ? undefined : setTimeout(() => {
      this.timedOut = true;
      child.kill('SIGKILL');
    }, config.timeoutMs);

    this.exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null; spawnError?: Error }>((resolve) => {
      child.on('error', (err) => resolve({ code: null, signal: null, spawnError: err }));
      // 'close' comes after stdout has ended, so the console tail is complete when we judge the ending.
      child.on('close', (code, signal) => resolve({ code, signal }));
    }).then(async (ended) => {
      if (timer) clearTimeout(timer);
      // QEMU is gone: nothing uses the devices any more (a disk's lock is released here).
      this.deviceCpuAtClose = this.devices.cpuSeconds();
      this.devices.close();
      const result = await this.judge(ended, binary);
      markReady(undefined);
      await this.dir.release();
      return result;
    });
  }

  private async judge(ended: { code: number | null; signal: NodeJS.Signals | null; spawnError?: Error }, binary: string): Promise<MachineExit> {
    if (ended.spawnError) {
      const enoent = (ended.spawnError as NodeJS.ErrnoException).code === 'ENOENT';
      return { kind: 'failed', message: enoent ? `${binary} not found: install QEMU (apt-get install qemu-system-x86)` : `cannot start ${binary}: ${ended.spawnError.message}` };
    }
    if (this.timedOut) return { kind: 'timeout', seconds: this.config.timeoutMs! / 1000 };
    if (this.killed) return { kind: 'killed' };
    const reported = await readStatus(this.statusFile);
    if (reported !== undefined && (ended.code === debugExitCode(reported) || ended.code === 0)) return { kind: 'exited', status: reported };
    const panic = findPanic(this.output.tail());
    if (panic !== undefined) return { kind: 'panic', message: panic };
    const qemuSaid = this.stderrTail.trim().split('\n').filter(Boolean).pop();
    // A guest kernel without virtio-console has no status port: isa-debug-exit still carries 7 bits.
    // QEMU's own failures also exit 1, but they say why on stderr.
    if (reported === undefined && ended.code !== null && ended.code % 2 === 1 && (ended.code > 1 || !qemuSaid)) {
      return { kind: 'exited', status: ended.code >> 1 };
    }
    if (ended.code !== 0 && qemuSaid) return { kind: 'failed', message: `qemu failed: ${qemuSaid.replace(/^qemu-system-x86_64: /, '')}` };
    if (ended.signal) return { kind: 'failed', message: `qemu was killed by ${ended.signal}` };
    return { kind: 'ended', detail: ended.code === 0 ? 'it reset or powered off' : `qemu exit code ${ended.code}` };
  }

  wait(): Promise<MachineExit> {
    return this.exit;
  }

  /** CPU seconds skiff's device thread has used for this guest (benchmarks); final once it ended. */
  deviceCpuSeconds(): number {
    return this.deviceCpuAtClose ?? this.devices.cpuSeconds();
  }

  kill(): void {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.killed = true;
    this.child.kill('SIGKILL');
  }
}

async function readStatus(file: string): Promise<number | undefined> {
  const text = await fs.readFile(file, 'utf8').catch(() => '');
  const m = /^exit (\d+)$/m.exec(text);
  if (!m) return undefined;
  const status = Number.parseInt(m[1], 10);
  return status >= 0 && status <= 255 ? status : undefined;
}
