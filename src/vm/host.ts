// What this host offers for running guests, and which engine runs them: chosen here and nowhere else.
import { constants, accessSync, existsSync } from 'node:fs';

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
  return { kvm: true, hardware: true, pvm: false, detail: '/dev/kvm offers hardware virtualization' };
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
  // auto: QEMU, with KVM where it is real. The native engine does not yet have SMP, bzImage boot or
  // virtio devices, so it is only used when asked for.
  return { engine: 'qemu', accel, reason: host.hardware ? undefined : `qemu with TCG: ${host.detail}` };
}
