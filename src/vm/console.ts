// The guest console as the host sees it: bytes pass straight through, except skiff-init's ready
// marker line, which is taken out of the stream and reported; and the last bytes are remembered so
// that an ending (a panic, say) can be explained.
import { Transform, type TransformCallback } from 'node:stream';

const MARKER = Buffer.from('skiff-init: ready ');
const TAIL_BYTES = 16 * 1024;

/** What skiff-init says when it is ready: "skiff-init: ready <uptime seconds> [<tsc>]". */
export interface ReadyMarker {
  /** Guest CLOCK_BOOTTIME, seconds. */
  uptimeSec: number;
  /** Guest time-stamp counter (x86); under TCG with -icount shift=0 it counts guest instructions plus warped idle time. */
  tsc?: bigint;
}

export class ConsoleTap extends Transform {
  private atLineStart = true;
  /** Bytes of a line that may still turn out to be the marker; held back until we know. */
  private held: Buffer[] = [];
  private heldLength = 0;
  private tailChunks: Buffer[] = [];
  private tailLength = 0;

  constructor(private readonly onReady: (marker: ReadyMarker) => void) {
    super();
  }

  /** The last console bytes (up to 16 KiB), as text. */
  tail(): string {
    return Buffer.concat(this.tailChunks).toString('utf8');
  }

  private remember(chunk: Buffer): void {
    this.tailChunks.push(chunk.length > TAIL_BYTES ? chunk.subarray(chunk.length - TAIL_BYTES) : chunk);
    this.tailLength += this.tailChunks[this.tailChunks.length - 1].length;
    while (this.tailLength - this.tailChunks[0].length >= TAIL_BYTES) this.tailLength -= this.tailChunks.shift()!.length;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.remember(chunk);
    let passStart = 0;
    for (let i = 0; i < chunk.length; i++) {
      const byte = chunk[i];
      if (this.heldLength > 0 || (this.atLineStart && byte === MARKER[0])) {
        if (this.heldLength === 0 && i > passStart) this.push(chunk.subarray(passStart, i));
        this.hold(byte);
        passStart = i + 1;
        continue;
      }
      this.atLineStart = byte === 0x0a;
    }
    if (passStart < chunk.length) this.push(chunk.subarray(passStart));
    done();
  }

  private hold(byte: number): void {
    const b = Buffer.of(byte);
    this.held.push(b);
    this.heldLength++;
    const line = Buffer.concat(this.held);
    const prefixLength = Math.min(line.length, MARKER.length);
    if (!line.subarray(0, prefixLength).equals(MARKER.subarray(0, prefixLength)) || line.length > 256) {
      this.release(line);
      return;
    }
    if (byte !== 0x0a) return;
    const [uptime, tsc] = line.subarray(MARKER.length).toString('latin1').trim().split(' ');
    this.held = [];
    this.heldLength = 0;
    this.atLineStart = true;
    const marker: ReadyMarker = { uptimeSec: Number.parseFloat(uptime) };
    if (tsc && /^\d+$/.test(tsc)) marker.tsc = BigInt(tsc);
    if (Number.isFinite(marker.uptimeSec)) this.onReady(marker);
  }

  private release(line: Buffer): void {
    this.held = [];
    this.heldLength = 0;
    this.atLineStart = line[line.length - 1] === 0x0a;
    this.push(line);
  }

  override _flush(done: TransformCallback): void {
    if (this.heldLength > 0) this.push(Buffer.concat(this.held));
    done();
  }
}

/** The kernel's own words on a panic, if the console shows one. */
export function findPanic(consoleTail: string): string | undefined {
  const m = /Kernel panic - not syncing: ([^\r\n]*)/.exec(consoleTail);
  return m ? m[1].trim() : undefined;
}
