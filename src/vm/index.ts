// Starting a Machine: the one place that turns an engine selection into a running guest.
import type { VmConfig } from './config.js';
import { EngineUnavailableError, type EngineSelection } from './host.js';
import type { Machine } from './machine.js';
import { startQemu } from './qemu.js';

export async function startMachine(config: VmConfig, selection: EngineSelection): Promise<Machine> {
  // Until skiff's virtio-net is wired into the engines, a network must not be silently missing.
  if (config.network !== 'none') throw new EngineUnavailableError(`--network ${config.network} / --publish are not supported by the ${selection.engine} engine yet`);
  switch (selection.engine) {
    case 'qemu':
      return startQemu(config, { accel: selection.accel });
    case 'native':
      return (await import('./native.js')).startNative(config);
  }
}
