// The native VMM's floor and footprint, inside one Node process through the library, on the
// test-guest kit's guests (32 MiB each):
// 1. one VM after another: Machine create → first guest instruction → exit (exit=0); the addon's
//    own split (setup: config → first KVM_RUN; run: first KVM_RUN → exit), the whole Promise round
//    trip, and RSS growth across them (a leak would show here);
// 2. 20 VMs at once, alive together (each waits for a console line, echo): peak RSS, RSS growth
//    per VM, and per-VM host memory beyond the guest's own touched pages (mincore of guest RAM);
//    QEMU's RSS on the same guest, for comparison;
// 3. a device doorbell round trip (doorbell test device): ring from guest ring 3 → event loop
//    writes guest memory and raises the interrupt → guest sees both; backend (KVM ioeventfd and
//    irqfd) against the VMM's own emulation, interleaved;
// 4. whole processes, interleaved: `skiff boot --engine native`, QEMU microvm with KVM, `node -e 0`;
// 5. what skiff's virtio devices (rng + one 64 MiB disk + vsock + virtio-net behind libslirp NAT, no
//    forwards) add to a VM's host setup and to the whole round trip: the same exit=0 guest with and
//    without them, interleaved.
// Usage: node dist/bench/native.js [--runs N] [--rounds N] [--process-runs N] [--only virtio]
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { packageRoot } from '../src/paths.js';
import { loadAddon, type NativeMachineConfig, type NativeMachineHandle, type NativeResult } from '../src/vm/addon.js';
import { median, timeProcess } from './measure.js';

type Addon = ReturnType<typeof loadAddon>;
const MiB = 2 ** 20;
const fmt = (x: number, digits = 2) => x.toFixed(digits);
const row = (name: string, xs: number[], digits = 2) => `| ${name} | ${fmt(median(xs), digits)} | ${fmt(Math.min(...xs), digits)}–${fmt(Math.max(...xs), digits)} |`;

/** VmRSS and VmHWM of this process, in bytes. */
function status(): { rss: number; hwm: number } {
  const text = readFileSync('/proc/self/status', 'utf8');
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN) * 1024;
  return { rss: kib('VmRSS'), hwm: kib('VmHWM') };
}

/**
 * Kernel memory that is nobody's RSS: KVM's per-VM and per-vCPU structures and its page tables for
 * the guest live here (unreclaimable slab, page tables, secondary page tables, kernel stacks).
 * System-wide, so anything else running moves it too.
 */
function kernelSide(): number {
  const text = readFileSync('/proc/meminfo', 'utf8');
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0) * 1024;
  return kib('SUnreclaim') + kib('PageTables') + kib('SecPageTables') + kib('KernelStack');
}

/** Resets VmHWM to the current RSS (proc(5), clear_refs: 5). */
function resetPeak(): void {
  writeFileSync('/proc/self/clear_refs', '5');
}

function check(result: NativeResult, what: string): NativeResult {
  if (result.kind !== 'exited' || result.status !== 0) throw new Error(`${what}: guest failed: ${JSON.stringify({ ...result, rip: String(result.rip) })}`);
  return result;
}

async function once(addon: Addon, config: NativeMachineConfig): Promise<{ result: NativeResult; totalMs: number }> {
  const start = performance.now();
  const machine = new addon.Machine(config);
  const result = check(await machine.start(() => {}), config.cmdline);
  return { result, totalMs: performance.now() - start };
}

/** n echo guests alive at once: resolves when every one has said it is ready for input. */
async function crowd(addon: Addon, kernel: string, n: number) {
  const machines: { handle: NativeMachineHandle; done: Promise<NativeResult> }[] = [];
  const ready: Promise<void>[] = [];
  for (let i = 0; i < n; i++) {
    const handle = new addon.Machine({ kernel, cmdline: 'skiff.test=echo', cpus: 1, memoryMiB: 32 });
    let out = '';
    let markReady: () => void = () => {};
    ready.push(new Promise((r) => (markReady = r)));
    const done = handle.start((chunk) => {
      out += chunk.toString('latin1');
      if (out.includes('guest: ready for input')) markReady();
    });
    machines.push({ handle, done });
  }
  await Promise.all(ready);
  return machines;
}

async function together(addon: Addon, kernel: string, n: number, rounds: number) {
  const peak: number[] = [];
  const growth: number[] = [];
  const overhead: number[] = [];
  const guest: number[] = [];
  const startMs: number[] = [];
  const kernel_: number[] = [];
  for (let r = 0; r < rounds; r++) {
    await new Promise((res) => setTimeout(res, 50));
    const before = status().rss;
    const kernelBefore = kernelSide();
    resetPeak();
    const t0 = performance.now();
    const machines = await crowd(addon, kernel, n);
    startMs.push(performance.now() - t0);
    const { rss } = status();
    kernel_.push((kernelSide() - kernelBefore) / n / MiB);
    const guestBytes = machines.reduce((sum, m) => sum + m.handle.guestResidentBytes(), 0);
    for (const m of machines) m.handle.input(Buffer.from('bye\n'));
    for (const m of machines) check(await m.done, 'echo');
    const { hwm } = status();
    peak.push(hwm / MiB);
    growth.push((rss - before) / n / MiB);
    guest.push(guestBytes / n / MiB);
    overhead.push((rss - before - guestBytes) / n / MiB);
  }
  return { peak, growth, overhead, guest, startMs, kernel: kernel_ };
}

/** QEMU microvm with KVM on the same echo guest: its RSS once the guest says it is ready. */
function qemuRss(kernel: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const args = ['-M', 'microvm,acpi=off', '-accel', 'kvm', '-nodefaults', '-no-user-config', '-nographic', '-serial', 'stdio', '-no-reboot', '-m', '32M', '-kernel', kernel, '-append', 'skiff.test=echo', '-device', 'isa-debug-exit,iobase=0xf4,iosize=4'];
    const child = spawn('qemu-system-x86_64', args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let rss = NaN;
    child.stdout.on('data', (d) => {
      out += d;
      if (Number.isNaN(rss) && out.includes('guest: ready for input')) {
        const text = readFileSync(`/proc/${child.pid}/status`, 'utf8');
        rss = Number(/^VmRSS:\s+(\d+) kB/m.exec(text)?.[1]) * 1024;
        child.stdin.end('bye\n');
      }
    });
    child.on('error', reject);
    child.on('close', () => (Number.isNaN(rss) ? reject(new Error(`qemu: ${out.slice(-300)}`)) : resolve(rss / MiB)));
  });
}

async function doorbells(addon: Addon, kernel: string, rounds: number, rings: number) {
  const paths: [string, Partial<NativeMachineConfig>][] = [
    ['backend: KVM ioeventfd + irqfd', {}],
    ['emulated: MMIO exit + KVM_IRQ_LINE from the loop', { emulateDoorbells: true, emulateInterruptLines: true }],
    ['doorbell emulated, interrupt backend (irqfd)', { emulateDoorbells: true }],
    ['doorbell backend (ioeventfd), interrupt emulated', { emulateInterruptLines: true }],
  ];
  const perRing = paths.map(() => [] as number[]);
  for (let r = 0; r < rounds; r++) {
    for (const [j, [, opts]] of paths.entries()) {
      const base = { kernel, cpus: 1, memoryMiB: 32, doorbellTest: true, ...opts };
      const one = await once(addon, { ...base, cmdline: 'skiff.test=doorbell=1' });
      const many = await once(addon, { ...base, cmdline: `skiff.test=doorbell=${rings + 1}` });
      if (!many.result.events.includes(opts.emulateDoorbells ? 'doorbells backend=0' : 'doorbells backend=1')) throw new Error(`unexpected path: ${many.result.events}`);
      perRing[j].push(((many.result.runMs - one.result.runMs) / rings) * 1000);
    }
  }
  return paths.map(([name], j) => [name, perRing[j]] as const);
}

/** The exit=0 guest with and without rng + a disk + vsock + net, interleaved: setup and whole ms. */
async function virtioCost(addon: Addon, kernel: string, runs: number) {
  if (addon.netUnavailable) throw new Error(`virtio devices: ${addon.netUnavailable}`);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'skiff-bench-virtio-'));
  try {
    const disk = path.join(dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(64 * MiB)); // written out: no sparse shortcut
    const bare = { kernel, cmdline: 'skiff.test=exit=0', cpus: 1, memoryMiB: 32 };
    // What `--network nat` without --publish attaches (src/vm/native.ts nativeDevices).
    const full = { ...bare, rng: true, disks: [{ path: disk, readOnly: false, serial: 'bench' }], vsockDir: dir, net: { seed: dir, forwards: [] } };
    await once(addon, full); // warm
    const setup = [[], []] as number[][];
    const whole = [[], []] as number[][];
    for (let i = 0; i < runs; i++) {
      for (const [j, config] of [bare, full].entries()) {
        const { result, totalMs } = await once(addon, config);
        // A doorbell per queue (rng 1, blk 1, vsock 3, net 2) and an interrupt line per device.
        if (j === 1 && !result.events.startsWith('doorbells backend=7 emulated=0; interrupt lines backend=4 ')) throw new Error(`virtio devices not attached: ${result.events}`);
        setup[j].push(result.setupMs);
        whole[j].push(totalMs);
      }
    }
    return { setup, whole, added: setup[1].map((x, i) => x - setup[0][i]), addedWhole: whole[1].map((x, i) => x - whole[0][i]) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function printVirtio(runs: number, v: Awaited<ReturnType<typeof virtioCost>>) {
  console.log(`\n## virtio devices: rng + one disk (64 MiB) + vsock + net (libslirp NAT), ${runs} interleaved pairs (exit=0 guest)\n`);
  console.log('| what | median ms | min–max ms |');
  console.log('|---|---:|---:|');
  console.log(row('setup, no devices', v.setup[0]));
  console.log(row('setup, rng + blk + vsock + net', v.setup[1]));
  console.log(row('setup added (pairwise)', v.added));
  console.log(row('whole Promise round trip, no devices', v.whole[0]));
  console.log(row('whole Promise round trip, rng + blk + vsock + net', v.whole[1]));
  console.log(row('whole added (pairwise)', v.addedWhole));
}

async function main() {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '20' }, rounds: { type: 'string', default: '5' }, 'process-runs': { type: 'string', default: '15' }, only: { type: 'string' } } });
  const runs = Number(values.runs);
  const rounds = Number(values.rounds);
  const kernel = path.join(packageRoot(), 'test', 'guests', 'out', 'skiff-test-guest.elf');
  const addon = loadAddon();
  if (values.only === 'virtio') {
    console.log(`# Native VMM (Node ${process.versions.node}, backend ${addon.probe().backend}; test guest, 32 MiB per VM)`);
    return printVirtio(runs, await virtioCost(addon, kernel, runs));
  }
  const exit0 = { kernel, cmdline: 'skiff.test=exit=0', cpus: 1, memoryMiB: 32 };
  await once(addon, exit0); // warm: addon and file cache
  const rss0 = status().rss / MiB;
  const serial: Awaited<ReturnType<typeof once>>[] = [];
  for (let i = 0; i < runs; i++) serial.push(await once(addon, exit0));
  const rss1 = status().rss / MiB;
  console.log(`# Native VMM (Node ${process.versions.node}, backend ${addon.probe().backend}; test guest, 32 MiB per VM)\n`);
  console.log(`## ${runs} VMs one after another (exit=0)\n`);
  console.log('| phase | median ms | min–max ms |');
  console.log('|---|---:|---:|');
  console.log(row('setup: config → first KVM_RUN (VM, memory, load, irqchip, vCPU)', serial.map((s) => s.result.setupMs)));
  console.log(row('run: first KVM_RUN → exit device', serial.map((s) => s.result.runMs)));
  console.log(row('whole: new Machine → Promise resolved', serial.map((s) => s.totalMs)));
  console.log(`\nRSS ${fmt(rss0, 1)} MiB before, ${fmt(rss1, 1)} MiB after ${runs} VMs one after another (${fmt(rss1 - rss0, 1)} MiB growth).`);

  const n = 20;
  const crowdStats = await together(addon, kernel, n, rounds);
  const qemu: number[] = [];
  for (let r = 0; r < rounds; r++) qemu.push(await qemuRss(kernel));
  console.log(`\n## ${n} VMs alive at once in this process (echo guest, waiting for input), ${rounds} rounds\n`);
  console.log('| what | median | min–max |');
  console.log('|---|---:|---:|');
  console.log(row(`time until all ${n} are ready, ms`, crowdStats.startMs, 1));
  console.log(row('peak RSS of the process, MiB', crowdStats.peak, 1));
  console.log(row('RSS growth per VM, MiB', crowdStats.growth));
  console.log(row("guest RAM resident per VM (the guest's touched pages), MiB", crowdStats.guest));
  console.log(row('host memory per VM beyond its guest pages, MiB', crowdStats.overhead));
  console.log(row("kernel memory per VM (KVM's structures and page tables; system-wide delta, noisy), MiB", crowdStats.kernel));
  console.log(row('QEMU microvm -accel kvm, same guest, whole process RSS, MiB', qemu, 1));

  const rings = 1000;
  console.log(`\n## Doorbell round trip (ring 3 → event loop → memory write + interrupt → guest), ${rounds} rounds, interleaved\n`);
  console.log('µs per round trip = (run with 1001 rings − run with 1) / 1000.\n');
  console.log('| path | median µs | min–max µs |');
  console.log('|---|---:|---:|');
  for (const [name, xs] of await doorbells(addon, kernel, rounds, rings)) console.log(row(name, xs, 1));

  printVirtio(runs, await virtioCost(addon, kernel, runs));

  await wholeProcesses(kernel, Number(values['process-runs']));
}

async function wholeProcesses(kernel: string, runs: number): Promise<void> {
  if (runs <= 0) return;
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
  console.log(`\n## Whole processes, same guest (${runs} interleaved runs)\n`);
  console.log('| what | median ms | min–max ms |');
  console.log('|---|---:|---:|');
  subjects.forEach(([name], j) => console.log(row(name, times[j])));
}

main().catch((err) => {
  console.error(`bench: ${err.message}`);
  process.exit(1);
});
