// The native engine: skiff's own VMM (hypervisor/) runs the guest on a native thread of this
// process. The guest reports its status through the exit device at the same port as on QEMU.
import { Writable } from 'node:stream';
import { loadAddon, type NativeResult } from './addon.js';
import { ConsoleTap, findPanic, type ReadyMarker } from './console.js';
import type { VmConfig } from './config.js';
import type { Machine, MachineExit } from './machine.js';

export async function startNative(config: VmConfig): Promise<Machine> {
  return new NativeMachine(config);
}

class NativeMachine implements Machine {
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

  constructor(private readonly config: VmConfig) {
    const addon = loadAddon();
    this.description = `native (${addon.probe().backend ?? 'no backend'})`;
    this.handle = new addon.Machine({ kernel: config.kernel.path, initrd: config.initrd, cmdline: config.cmdline, cpus: config.cpus, memoryMiB: config.memoryMiB });
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
    this.exit = handle.start((chunk) => this.output.write(chunk)).then((result) => {
      if (timer) clearTimeout(timer);
      this.lastResult = result;
      this.output.end();
      markReady(undefined);
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
