// Progress on long work: a bar on a terminal, a line every 10% in a log, nothing with --quiet.
import type { Writable } from 'node:stream';

export interface Progress {
  /** A step with no measurable amount ("extracting the kernel source"). */
  step(text: string): void;
  /** A step with an amount: done of total. */
  update(label: string, done: number, total: number, detail?: string): void;
  done(text?: string): void;
}

export async function makeProgress(stream: Writable & { isTTY?: boolean }, quiet: boolean): Promise<Progress> {
  if (quiet) return { step() {}, update() {}, done() {} };
  if (!stream.isTTY) return logProgress(stream);
  const { default: cliProgress } = await import('cli-progress');
  let bar: InstanceType<typeof cliProgress.SingleBar> | undefined;
  let barLabel = '';
  const stop = () => {
    bar?.stop();
    bar = undefined;
  };
  return {
    step(text) {
      stop();
      stream.write(`${text}\n`);
    },
    update(label, done, total, detail = '') {
      if (!bar || barLabel !== label) {
        stop();
        barLabel = label;
        bar = new cliProgress.SingleBar(
          { format: `${label} [{bar}] {percentage}% {value}/{total} {detail}`, stream, hideCursor: true, clearOnComplete: true },
          cliProgress.Presets.shades_classic,
        );
        bar.start(total, done, { detail });
      }
      bar.setTotal(total);
      bar.update(done, { detail: detail.slice(-40) });
    },
    done(text) {
      stop();
      if (text) stream.write(`${text}\n`);
    },
  };
}

function logProgress(stream: Writable): Progress {
  let lastLabel = '';
  let lastTenth = -1;
  return {
    step(text) {
      stream.write(`${text}\n`);
    },
    update(label, done, total) {
      const tenth = Math.floor((10 * done) / total);
      if (label === lastLabel && tenth === lastTenth) return;
      lastLabel = label;
      lastTenth = tenth;
      stream.write(`${label}: ${tenth * 10}% (${done}/${total})\n`);
    },
    done(text) {
      if (text) stream.write(`${text}\n`);
    },
  };
}
