// What the benchmarks share: timing a whole process and summarising samples.
import { spawn } from 'node:child_process';

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** Wall milliseconds of one run of `cmd`; rejects unless it exits with `okCode`. */
export function timeProcess(cmd: string, args: string[], okCode = 0): Promise<number> {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    child.on('error', reject);
    child.on('close', (code) => (code === okCode ? resolve(performance.now() - start) : reject(new Error(`${cmd} exited ${code}: ${err.slice(-300)}`))));
  });
}
