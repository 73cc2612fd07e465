// What this host offers for running guests, and which engine runs them: chosen here and nowhere else.
import { constants, accessSync, existsSync } from 'node:fs';
import { loadAddon } from './addon.js';

export type EngineName = 'qemu' | 'native';
export type EngineChoice = EngineName | 'auto';
export type Accel = 'kvm' | 'tcg';

export class EngineUnavailableError extends Error {}

export interface HostVirtualization {
  /** Whether /dev/kvm is there and usable by this user (real or PVM). */
  kvm: boolean;
  /** Whether /dev/kvm gives real hardware virtualization (VT-x/AMD-V behind KVM). */
  hardware: boolean;
  /** One plain sentence on what /dev/kvm is here. */
  detail: string;
  /** KVM on PVM: present, but guest kernel code would be emulated instruction by instruction. */
  pvm: boolean;
  /** Why skiff's own VMM cannot run here although the hardware could (its addon is not built or does not load); asked only where hardware is real. */
  nativeUnavailable?: string;
}

export function probeHost(): HostVirtualization {
  if (process.platform !== 'linux') {
    return { kvm: false, hardware: false, pvm: false, detail: `no KVM on ${process.platform}` };
  }
  if (!existsSync('/dev/kvm')) return { kvm: false, hardware: false, pvm: false, detail: '/dev/kvm does not exist (no hardware virtualization, or the kvm module is not loaded)' };
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return { kvm: false, hardware: false, pvm: false, detail: '/dev/kvm is not accessible to you (add yourself to the kvm group)' };
  }
  if (existsSync('/sys/module/kvm_pvm')) {
    return {
      kvm: true,
      hardware: false,
      pvm: true,
      detail: '/dev/kvm is KVM on PVM (kvm_pvm), not VT-x/AMD-V: guest kernel code would be emulated, so Linux guests run on QEMU with TCG here',
    };
  }
  let nativeUnavailable: string | undefined;
  try {
    loadAddon();
  } catch (err) {
    nativeUnavailable = (err as Error).message;
  }
  return { kvm: true, hardware: true, pvm: false, detail: '/dev/kvm offers hardware virtualization', nativeUnavailable };
}

export interface EngineSelection {
  engine: EngineName;
  accel: Accel;
  /** Why this engine, in one line, when it is not the obvious choice. */
  reason?: string;
}

export function selectEngine(requested: EngineChoice, host: HostVirtualization = probeHost()): EngineSelection {
  const accel: Accel = host.hardware ? 'kvm' : 'tcg';
  if (requested === 'native') {
    if (!host.kvm) throw new EngineUnavailableError(`the native engine needs KVM: ${host.detail}`);
    return {
      engine: 'native',
      accel: 'kvm',
      reason: host.pvm ? 'native engine on KVM-on-PVM: guest kernel code is emulated (~1.3 M instructions/s), so a stock Linux kernel cannot boot here' : undefined,
    };
  }
  if (requested === 'qemu') return { engine: 'qemu', accel, reason: host.hardware ? undefined : `qemu with TCG: ${host.detail}` };
  // auto: skiff's own VMM where hardware virtualization is real; otherwise QEMU, saying why not.
  if (host.hardware && !host.nativeUnavailable) return { engine: 'native', accel: 'kvm' };
  if (host.hardware) return { engine: 'qemu', accel, reason: `qemu with KVM, not the native engine: ${host.nativeUnavailable}` };
  if (host.pvm) return { engine: 'qemu', accel, reason: `qemu with TCG, not the native engine: ${host.detail} (--engine native runs it anyway: about 90 s to boot the pvm-native kernel flavor)` };
  return { engine: 'qemu', accel, reason: `qemu with TCG, not the native engine: ${host.detail}` };
}
