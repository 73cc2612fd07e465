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
}

export interface Addon {
  probe(): { backend: string | null; apiVersion: number; error: string | null };
  Machine: new (config: NativeMachineConfig) => NativeMachineHandle;
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
