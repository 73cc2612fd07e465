// Starting a Machine: the one place that turns an engine selection into a running guest.
import type { VmConfig } from './config.js';
import type { EngineSelection } from './host.js';
import type { Machine } from './machine.js';
import { startQemu } from './qemu.js';

export async function startMachine(config: VmConfig, selection: EngineSelection): Promise<Machine> {
  switch (selection.engine) {
    case 'qemu':
      return startQemu(config, { accel: selection.accel });
    case 'native':
      return (await import('./native.js')).startNative(config);
  }
}
