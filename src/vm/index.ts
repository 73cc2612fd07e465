// Starting a Machine: the one place that turns an engine selection into a running guest.
import type { VmConfig } from './config.js';
import { EngineUnavailableError, type EngineSelection } from './host.js';
import type { Machine } from './machine.js';
import { startQemu } from './qemu.js';

export async function startMachine(config: VmConfig, selection: EngineSelection): Promise<Machine> {
  // Until skiff's virtio-blk is wired into an engine, a disk must not be silently dropped (native has it).
  if (config.disks.length > 0 && selection.engine !== 'native') throw new EngineUnavailableError(`--disk is not supported by the ${selection.engine} engine yet`);
  switch (selection.engine) {
    case 'qemu':
      return startQemu(config, { accel: selection.accel });
    case 'native':
      return (await import('./native.js')).startNative(config);
  }
}
