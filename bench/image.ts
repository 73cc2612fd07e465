// Image builder cost:
//  1. A warm `skiff build` of the default spec (everything cached): whole process, against Node's own
//     start, interleaved runs, medians.
//  2. Initrd assembly throughput: a file set of large host programs with their libraries written as
//     a cpio archive (the builder's own code, in process), MB/s.
// Usage: node dist/bench/image.js [--runs N]
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { assembleFiles } from '../src/image/build.js';
import { defaultSpecFile } from '../src/image/default.js';
import { CpioWriter } from '../src/initrd/cpio.js';
import { defaultFragment } from '../src/kernel/build.js';
import { packageRoot } from '../src/paths.js';
import { parseSpec } from '../src/spec/spec.js';
import { median, timeProcess } from './measure.js';

const fmt = (n: number, digits = 1) => n.toFixed(digits);

async function main() {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '10' } } });
  const runs = Number(values.runs);
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-bench-image-'));
  const cli = path.join(packageRoot(), 'dist', 'bundle', 'skiff.js');

  const formats = ['uki', 'dir'] as const;
  const build = (format: string) => [cli, 'build', defaultSpecFile(), '-o', path.join(scratch, `default-${format}`), '--format', format, '--quiet'];
  for (const format of formats) await timeProcess(process.execPath, build(format)); // warm the caches
  const times: Record<string, number[]> = { node: [], uki: [], dir: [] };
  for (let i = 0; i < runs; i++) {
    times.node.push(await timeProcess(process.execPath, ['-e', '0']));
    for (const format of formats) times[format].push(await timeProcess(process.execPath, build(format)));
  }
  console.log(`# Warm \`skiff build images/default.yml\` (${runs} interleaved runs, whole process)\n`);
  console.log('| what | median ms | min–max ms |');
  console.log('|---|---:|---:|');
  for (const [name, xs] of [['node -e 0', times.node], ['skiff build --format uki', times.uki], ['skiff build --format dir', times.dir]] as const) {
    console.log(`| ${name} | ${fmt(median(xs), 0)} | ${fmt(Math.min(...xs), 0)}–${fmt(Math.max(...xs), 0)} |`);
  }

  const programs = ['/usr/bin/qemu-system-x86_64', '/usr/bin/crun', '/bin/busybox'];
  const spec = await parseSpec(`binaries: [${programs.join(', ')}]\n`, path.join(scratch, 'big.yml'), { fragment: defaultFragment() });
  const files = await assembleFiles(spec, 'NAME=bench\n');
  const mbps: number[] = [];
  let bytes = 0;
  for (let i = 0; i < Math.max(3, Math.floor(runs / 2)); i++) {
    const start = performance.now();
    const cpio = new CpioWriter();
    files.writeInto(cpio);
    bytes = (await cpio.writeTo(path.join(scratch, 'big.cpio'))).bytes;
    mbps.push(bytes / 1e6 / ((performance.now() - start) / 1000));
  }
  console.log(`\n# Initrd assembly: ${files.size} entries (${programs.join(', ')} with their libraries), ${fmt(bytes / 1e6)} MB\n`);
  console.log(`cpio written at **${fmt(median(mbps), 0)} MB/s** (median; min–max ${fmt(Math.min(...mbps), 0)}–${fmt(Math.max(...mbps), 0)})`);
  await fs.rm(scratch, { recursive: true, force: true });
}

main().catch((err) => {
  console.error(`bench: ${err.message}`);
  process.exit(1);
});
