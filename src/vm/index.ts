// Starting a Machine: the one place that turns an engine selection into a running guest.
import type { VmConfig } from './config.js';
import { loadAddon } from './addon.js';
import { EngineUnavailableError, type EngineSelection } from './host.js';
import type { Machine } from './machine.js';
import { startQemu } from './qemu.js';

export async function startMachine(config: VmConfig, selection: EngineSelection): Promise<Machine> {
  // Both engines get the NIC from the addon (libslirp inside it): a build without libslirp says
  // so before anything starts, rather than booting a guest without the network it was asked for.
  if (config.network !== 'none') {
    const why = loadAddon().netUnavailable;
    if (why) throw new EngineUnavailableError(`--network ${config.network}${config.publish.length ? ' / --publish' : ''}: ${why}`);
  }
  switch (selection.engine) {
    case 'qemu':
      return startQemu(config, { accel: selection.accel });
    case 'native':
      return (await import('./native.js')).startNative(config);
  }
}
