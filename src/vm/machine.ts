// The Machine API: one running guest, whichever engine runs it.
import type { Readable, Writable } from 'node:stream';
import type { ReadyMarker } from './console.js';
import type { EngineName } from './host.js';

/** How a machine ended. */
export type MachineExit =
  /** skiff-init reported the guest command's exit status. */
  | { kind: 'exited'; status: number }
  /** The guest kernel panicked; message is the kernel's own. */
  | { kind: 'panic'; message: string }
  /** It ran past its timeout and was killed. */
  | { kind: 'timeout'; seconds: number }
  /** kill() was called. */
  | { kind: 'killed' }
  /** The guest reset or powered off without reporting a status. */
  | { kind: 'ended'; detail: string }
  /** The engine itself failed (it could not start the guest, or died). */
  | { kind: 'failed'; message: string };

export interface Machine {
  readonly engine: EngineName;
  /** e.g. "qemu 7.2 (tcg)" */
  readonly description: string;
  /** The host process running the guest, where the engine uses one (qemu); for measuring it. */
  readonly hostPid?: number;
  /** Console output of the guest (its serial port), with skiff-init's ready marker taken out. */
  readonly output: Readable & { tail(): string };
  /** Console input to the guest. */
  readonly input: Writable;
  /** The VM's directory (0700) for its sockets: `vsockPath`, and `vsock_PORT` for host listeners. */
  readonly vmDir: string;
  /**
   * Host → guest vsock (guest CID 3): connect, write "CONNECT <port>\n", read "OK <port>\n", then the
   * stream is the guest's. A guest connection to CID 2 port P reaches a listener at `vmDir/vsock_P`.
   */
  readonly vsockPath: string;
  /** skiff-init's ready marker; undefined if the machine ended before it said it was ready. */
  readonly ready: Promise<ReadyMarker | undefined>;
  /** Resolves once, when the machine has ended and its resources are released. */
  wait(): Promise<MachineExit>;
  /** Ends the machine at once. */
  kill(): void;
}

/** One-line text for an ending that is not a guest exit status. */
export function describeExit(exit: MachineExit): string {
  switch (exit.kind) {
    case 'exited':
      return `guest command exited with status ${exit.status}`;
    case 'panic':
      return `guest kernel panic: ${exit.message}`;
    case 'timeout':
      return `guest still running after ${exit.seconds} s (--timeout): stopped it`;
    case 'killed':
      return 'guest was killed';
    case 'ended':
      return `guest ended without reporting an exit status (${exit.detail})`;
    case 'failed':
      return exit.message;
  }
}
