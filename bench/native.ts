// The native VMM's floor, inside one Node process through the library: Machine create → first
// guest instruction → exit, on the smallest guest (the test-guest kit's exit=0), 20 VMs one after
// another; then 20 at once. Reports the addon's own split (setup: config → first KVM_RUN; run:
// first KVM_RUN → exit), the whole Promise round trip, and RSS growth.
// Then whole processes, interleaved: `skiff boot --engine native` on the same guest, QEMU microvm
// with KVM on the same guest, and `node -e 0` as Node's own floor.
// Usage: node dist/bench/native.js [--runs N] [--process-runs N]
import path from 'node:path';
import { parseArgs } from 'node:util';
import { packageRoot } from '../src/paths.js';
import { loadAddon, type NativeResult } from '../src/vm/addon.js';
import { median, timeProcess } from './measure.js';

const row = (name: string, xs: number[]) => `| ${name} | ${median(xs).toFixed(2)} | ${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)} |`;
const rssMiB = () => process.memoryUsage().rss / 2 ** 20;

async function once(addon: ReturnType<typeof loadAddon>, kernel: string): Promise<{ result: NativeResult; totalMs: number }> {
  const start = performance.now();
  const machine = new addon.Machine({ kernel, cmdline: 'skiff.test=exit=0', cpus: 1, memoryMiB: 32 });
  const result = await machine.start(() => {});
  if (result.kind !== 'exited' || result.status !== 0) throw new Error(`guest failed: ${JSON.stringify({ ...result, rip: String(result.rip) })}`);
  return { result, totalMs: performance.now() - start };
}

async function main() {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '20' }, 'process-runs': { type: 'string', default: '15' } } });
  const runs = Number(values.runs);
  const kernel = path.join(packageRoot(), 'test', 'guests', 'out', 'skiff-test-guest.elf');
  const addon = loadAddon();
  await once(addon, kernel); // warm: addon and file cache
  const rss0 = rssMiB();
  const serial: Awaited<ReturnType<typeof once>>[] = [];
  for (let i = 0; i < runs; i++) serial.push(await once(addon, kernel));
  const rss1 = rssMiB();
  const parallelStart = performance.now();
  await Promise.all(Array.from({ length: runs }, () => once(addon, kernel)));
  const parallelMs = performance.now() - parallelStart;
  const rss2 = rssMiB();
  console.log(`# Native VMM floor (${process.versions.node}, backend ${addon.probe().backend}; ${runs} VMs, 32 MiB each, test guest exit=0)\n`);
  console.log('| phase | median ms | min–max ms |');
  console.log('|---|---:|---:|');
  console.log(row('setup: config → first KVM_RUN (VM, memory, load, vCPU)', serial.map((s) => s.result.setupMs)));
  console.log(row('run: first KVM_RUN → exit device', serial.map((s) => s.result.runMs)));
  console.log(row('whole: new Machine → Promise resolved', serial.map((s) => s.totalMs)));
  console.log(`\n${runs} VMs at once: ${parallelMs.toFixed(1)} ms in all.`);
  console.log(`RSS: ${rss0.toFixed(1)} MiB before, ${rss1.toFixed(1)} MiB after ${runs} sequential VMs (${(rss1 - rss0).toFixed(1)} MiB growth), ${rss2.toFixed(1)} MiB after ${runs} at once.`);
  await wholeProcesses(kernel, Number(values['process-runs']));
}

async function wholeProcesses(kernel: string, runs: number): Promise<void> {
  const cli = path.join(packageRoot(), 'dist', 'bundle', 'skiff.js');
  // QEMU's exit code for isa-debug-exit status 0 is 1. Default CPU model: `-cpu host` fails to set
  // an MSR under KVM on PVM.
  const qemu = ['-M', 'microvm,acpi=off', '-accel', 'kvm', '-nodefaults', '-no-user-config', '-nographic', '-serial', 'stdio', '-no-reboot', '-m', '32M', '-kernel', kernel, '-append', 'skiff.test=exit=0', '-device', 'isa-debug-exit,iobase=0xf4,iosize=4'];
  const subjects: [string, string, string[], number][] = [
    ['node -e 0', process.execPath, ['-e', '0'], 0],
    ['skiff boot --engine native (whole CLI process)', process.execPath, [cli, 'boot', '--engine', 'native', '--memory', '32', '--kernel', kernel, '--cmdline', 'skiff.test=exit=0'], 0],
    ['qemu-system-x86_64 -M microvm -accel kvm (whole process)', 'qemu-system-x86_64', qemu, 1],
  ];
  const times = subjects.map(() => [] as number[]);
  for (let i = 0; i < runs; i++) {
    for (const [j, [, cmd, args, okCode]] of subjects.entries()) times[j].push(await timeProcess(cmd, args, okCode));
  }
  console.log(`\n# Whole processes, same guest (${runs} interleaved runs)\n`);
  console.log('| what | median ms | min–max ms |');
  console.log('|---|---:|---:|');
  subjects.forEach(([name], j) => console.log(row(name, times[j])));
}

main().catch((err) => {
  console.error(`bench: ${err.message}`);
  process.exit(1);
});
