// Loads skiff's native addon (hypervisor/) once.
import { createRequire } from 'node:module';
import path from 'node:path';
import { packageRoot } from '../paths.js';

export interface NativeResult {
  kind: 'exited' | 'reset' | 'shutdown' | 'killed' | 'error';
  status: number;
  detail: string;
  rip: bigint;
  /** Host milliseconds from the config to the first KVM_RUN, and from there to the end. */
  setupMs: number;
  runMs: number;
  /** How device doorbells and interrupt lines were carried out (backend or emulated), '' if none. */
  events: string;
}

export interface NativeMachineHandle {
  start(onConsole: (chunk: Buffer) => void): Promise<NativeResult>;
  input(chunk: Buffer): void;
  kill(): void;
  /** Host bytes backing guest RAM right now (pages touched); 0 before boot and after the end. For benchmarks. */
  guestResidentBytes(): number;
}

export interface NativeMachineConfig {
  kernel: string;
  initrd?: string;
  cmdline: string;
  cpus: number;
  memoryMiB: number;
  /** Tests: attach the doorbell test device (hypervisor/devices/doorbell_test.h). */
  doorbellTest?: boolean;
  /** Tests and benchmarks: the VMM does doorbells / interrupt lines even where the backend could. */
  emulateDoorbells?: boolean;
  emulateInterruptLines?: boolean;
  /** skiff's virtio devices on virtio-mmio (hypervisor/vmm/virtio_devices.h). */
  rng?: boolean;
  disks?: { path: string; readOnly: boolean; serial: string }[];
  /**
   * vsock (guest CID 3): a private directory (0700) where the machine listens on `vsock` for host
   * connections ("CONNECT <port>\n", answered "OK <port>\n") and where a guest connection to CID 2
   * port P reaches the Unix socket `vsock_P`.
   */
  vsockDir?: string;
  /** virtio-net behind libslirp NAT (hypervisor/vmm/virtio_devices.h), on the slot after vsock. */
  net?: NativeNetConfig;
}

/**
 * A NIC behind libslirp: guest 10.0.2.15/24, gateway and host 10.0.2.2, DNS 10.0.2.3; each forward
 * listens on host 127.0.0.1:hostPort. The MAC is the addon's Net::stableMac(seed), computed there
 * only (DeviceServer reports it as netMac for QEMU's command line).
 */
export interface NativeNetConfig {
  seed: string;
  forwards: { hostPort: number; guestPort: number; udp: boolean }[];
}

/** What DeviceServer serves over vhost-user (hypervisor/transport/device_server.h). */
export interface DeviceServerConfig {
  /** An existing private directory (0700): the sockets are made here, mode 0600. */
  socketDir: string;
  disks?: { path: string; readOnly: boolean; serial: string }[];
  rng?: boolean;
  /** vsock, guest CID 3: host side at `<socketDir>/vsock` (CONNECT <port>) and `<socketDir>/vsock_<port>`. */
  vsock?: boolean;
  /** virtio-net behind libslirp NAT, served as vhost-user-net (socket kind 'net'). */
  net?: NativeNetConfig;
}

/** skiff's devices served to a QEMU guest, on their own native thread, until close(). */
export interface DeviceServerHandle {
  /** vhost-user sockets in config order: disks (kind 'blk'), then 'rng', then 'vsock'. */
  readonly sockets: readonly { kind: 'blk' | 'rng' | 'vsock' | 'net'; path: string }[];
  /** `<socketDir>/vsock`, or '' without vsock. */
  readonly vsockPath: string;
  /** The NIC's MAC ("02:..."), for QEMU's virtio-net-device (which keeps the config space); null without net. */
  readonly netMac: string | null;
  /** CPU seconds used by the device thread so far (benchmarks). */
  cpuSeconds(): number;
  /** Stops serving, releases the disks and removes the sockets (waits milliseconds for the device thread). Idempotent. */
  close(): void;
}

export interface Addon {
  probe(): { backend: string | null; apiVersion: number; error: string | null };
  Machine: new (config: NativeMachineConfig) => NativeMachineHandle;
  DeviceServer: new (config: DeviceServerConfig) => DeviceServerHandle;
  /** null, or the one-line reason this build has no networking (it was built without libslirp). */
  netUnavailable: string | null;
}

export class AddonError extends Error {}

let loaded: Addon | undefined;

export function loadAddon(): Addon {
  if (loaded) return loaded;
  const file = path.join(packageRoot(), 'build', 'Release', 'skiff_hypervisor.node');
  try {
    loaded = createRequire(import.meta.url)(file) as Addon;
  } catch (err) {
    throw new AddonError(`cannot load the native addon ${file} (build it with "npm run build:addon"): ${(err as Error).message.split('\n')[0]}`);
  }
  return loaded;
}
