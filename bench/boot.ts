// Boot cost, two ways:
//  1. Guest instructions to init, a number that does not depend on the machine: QEMU TCG with
//     -icount shift=0,sleep=off makes the guest's TSC count executed instructions (plus warped idle
//     time), and skiff-init prints the TSC in its ready marker. Compared: skiff's kernel (vmlinux via
//     PVH, and bzImage) against Debian's stock cloud kernel, all with the same initrd.
//  2. Host time of a whole `skiff boot -- true` against QEMU's own run of the same guest, and Node's
//     own start as the floor: interleaved runs, medians. Also a UKI booted directly against the same
//     kernel (bzImage) and initrd given as files.
// Usage: node dist/bench/boot.js [--runs N] [--host-runs N] [--no-debian] [--json FILE]
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { buildImage } from '../src/image/build.js';
import { defaultImage, defaultSpecFile } from '../src/image/default.js';
import { readSpec } from '../src/spec/spec.js';
import { cachedKernel, defaultFragment } from '../src/kernel/build.js';
import { packageRoot } from '../src/paths.js';
import { cacheDir, exists } from '../src/store/store.js';
import { makeVmConfig, type VmConfig } from '../src/vm/config.js';
import { qemuArgs, QEMU_BINARY, startQemu } from '../src/vm/qemu.js';
import { median, timeProcess } from './measure.js';

const execFileP = promisify(execFile);

interface GuestRun {
  instructions: number;
  readyWallMs: number;
  peakRssMiB: number;
}

const fmt = (n: number, digits = 1) => n.toFixed(digits);

/** Debian's stock cloud kernel, fetched with apt-get download and unpacked (never installed). */
async function debianCloudKernel(): Promise<{ path: string; pkg: string }> {
  const { stdout } = await execFileP('apt-cache', ['depends', 'linux-image-cloud-amd64']);
  const pkg = /Depends: (linux-image-[^\s]+-cloud-amd64)/.exec(stdout)?.[1];
  if (!pkg) throw new Error('cannot resolve linux-image-cloud-amd64 (run apt-get update)');
  const dir = path.join(cacheDir(), 'bench', pkg);
  if (!(await exists(path.join(dir, '.complete')))) {
    await fs.mkdir(dir, { recursive: true });
    await execFileP('apt-get', ['download', pkg], { cwd: dir });
    const deb = (await fs.readdir(dir)).find((f) => f.endsWith('.deb'))!;
    await execFileP('dpkg-deb', ['-x', deb, 'root'], { cwd: dir });
    await fs.writeFile(path.join(dir, '.complete'), '');
  }
  const boot = path.join(dir, 'root', 'boot');
  const vmlinuz = (await fs.readdir(boot)).find((f) => f.startsWith('vmlinuz-'))!;
  return { path: path.join(boot, vmlinuz), pkg };
}

async function peakRssKiB(pid: number): Promise<number> {
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0);
}

async function guestRun(config: VmConfig): Promise<GuestRun> {
  const start = performance.now();
  const machine = await startQemu(config, { accel: 'tcg', icount: true });
  machine.output.resume();
  let peak = 0;
  const sampler = setInterval(async () => (peak = Math.max(peak, await peakRssKiB(machine.hostPid!))), 20);
  const ready = await machine.ready;
  const readyWallMs = performance.now() - start;
  const exit = await machine.wait();
  clearInterval(sampler);
  if (!ready?.tsc || exit.kind !== 'exited' || exit.status !== 0) throw new Error(`boot failed: ${JSON.stringify(exit)}\n${machine.output.tail()}`);
  return { instructions: Number(ready.tsc), readyWallMs, peakRssMiB: peak / 1024 };
}

async function main() {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '3' }, 'host-runs': { type: 'string', default: '10' }, 'no-debian': { type: 'boolean', default: false }, json: { type: 'string' } } });
  const runs = Number(values.runs);
  const hostRuns = Number(values['host-runs']);
  const kernel = await cachedKernel();
  if (!kernel) throw new Error('build the kernel first: node dist/bundle/skiff.js kernel build');
  const image = await defaultImage();
  const initrd = image.initrd!;
  const command = ['true'];

  const subjects: { name: string; kernel: string }[] = [
    { name: `skiff ${kernel.version} vmlinux (PVH)`, kernel: kernel.vmlinux },
    { name: `skiff ${kernel.version} bzImage`, kernel: kernel.bzImage },
  ];
  if (!values['no-debian']) {
    const debian = await debianCloudKernel();
    subjects.push({ name: `Debian ${debian.pkg}`, kernel: debian.path });
  }

  console.log(`# Guest instructions to init (QEMU TCG -icount shift=0,sleep=off; ${runs} runs each; same initrd ${path.basename(initrd)})\n`);
  console.log('| kernel | instructions to init (median) | min–max | wall to init, ms (median) | QEMU peak RSS, MiB |');
  console.log('|---|---:|---:|---:|---:|');
  const guest: Record<string, GuestRun[]> = {};
  for (const s of subjects) {
    const config = await makeVmConfig({ kernel: s.kernel, initrd, command, memoryMiB: 256 });
    guest[s.name] = [];
    for (let i = 0; i < runs; i++) guest[s.name].push(await guestRun(config));
    const ins = guest[s.name].map((r) => r.instructions);
    console.log(`| ${s.name} | ${fmt(median(ins) / 1e6)} M | ${fmt(Math.min(...ins) / 1e6)}–${fmt(Math.max(...ins) / 1e6)} M | ${fmt(median(guest[s.name].map((r) => r.readyWallMs)), 0)} | ${fmt(median(guest[s.name].map((r) => r.peakRssMiB)))} |`);
  }
  if (subjects.length > 2) {
    const ratio = median(guest[subjects[2].name].map((r) => r.instructions)) / median(guest[subjects[0].name].map((r) => r.instructions));
    console.log(`\nDebian cloud kernel / skiff vmlinux: **${fmt(ratio, 2)}×** the instructions to init.`);
  }

  // Host time: QEMU alone vs the whole skiff CLI on the same guest (TCG, no icount), and Node's floor.
  const config = await makeVmConfig({ kernel: kernel.vmlinux, initrd, command });
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-bench-'));
  const direct = qemuArgs(config, path.join(scratch, 'status'), { accel: 'tcg' });
  const cli = path.join(packageRoot(), 'dist', 'bundle', 'skiff.js');
  const uki = path.join(scratch, 'default.efi');
  await buildImage(await readSpec(defaultSpecFile(), { fragment: defaultFragment() }), { format: 'uki', output: uki });
  const host = { node: [] as number[], qemu: [] as number[], skiff: [] as number[], uki: [] as number[], files: [] as number[] };
  for (let i = 0; i < hostRuns; i++) {
    host.node.push(await timeProcess(process.execPath, ['-e', '0']));
    host.qemu.push(await timeProcess(QEMU_BINARY, direct, 1)); // isa-debug-exit status 0 → exit 1
    host.skiff.push(await timeProcess(process.execPath, [cli, 'boot', '--engine', 'qemu', '--', ...command]));
    host.uki.push(await timeProcess(process.execPath, [cli, 'boot', uki, '--engine', 'qemu', '--', ...command]));
    host.files.push(await timeProcess(process.execPath, [cli, 'boot', '--engine', 'qemu', '--kernel', kernel.bzImage, '--initrd', initrd, '--', ...command]));
  }
  await fs.rm(scratch, { recursive: true, force: true });
  console.log(`\n# Host wall time, whole process (${hostRuns} interleaved runs, TCG, guest runs \`true\`)\n`);
  console.log('| what | median ms | min–max ms |');
  console.log('|---|---:|---:|');
  for (const [name, xs] of [
    ['node -e 0', host.node],
    ['qemu-system-x86_64 (same guest, direct)', host.qemu],
    ['skiff boot -- true (default image: vmlinux, PVH)', host.skiff],
    ['skiff boot default.efi -- true (UKI: bzImage + initrd from its sections)', host.uki],
    ['skiff boot --kernel bzImage --initrd initrd -- true (the same as files)', host.files],
  ] as const) {
    console.log(`| ${name} | ${fmt(median(xs), 0)} | ${fmt(Math.min(...xs), 0)}–${fmt(Math.max(...xs), 0)} |`);
  }
  const overhead = median(host.skiff.map((s, i) => s - host.qemu[i]));
  console.log(`\nskiff's host overhead over QEMU alone (median of paired differences): **${fmt(overhead, 0)} ms**`);
  console.log(`UKI booted directly vs the same bzImage + initrd as files (median of paired differences): **${fmt(median(host.uki.map((u, i) => u - host.files[i])), 0)} ms**`);
  if (values.json) await fs.writeFile(values.json, JSON.stringify({ guest, host, overheadMs: overhead, date: new Date().toISOString() }, null, 2));
}

main().catch((err) => {
  console.error(`bench: ${err.message}`);
  process.exit(1);
});
