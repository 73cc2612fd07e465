// The native VMM's C++ core built with AddressSanitizer and UndefinedBehaviorSanitizer, driven
// without Node (hypervisor/tools/vmm-run.cc) by the test guests and by seeded mutations of their
// headers: any memory error, undefined behaviour or crash fails the test. Built with libslirp
// (SKIFF_SLIRP), so virtio-net and its NAT backend are in it too.
import test from 'ava';
import { execFile, spawn } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { packageRoot } from '../src/paths.js';
import { freePort } from './helpers.js';

const execFileP = promisify(execFile);
const root = packageRoot();
const guests = path.join(root, 'test', 'guests', 'out');
let dir: string;
let driver: string;

test.before(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-asan-'));
  driver = path.join(dir, 'vmm-run');
  const hv = path.join(root, 'hypervisor');
  const sources: string[] = [path.join(hv, 'tools', 'vmm-run.cc')];
  for (const sub of ['vmm', 'devices', 'devices/virtio', 'backend', 'backend/kvm', 'loop']) {
    for (const f of await fs.readdir(path.join(hv, sub))) if (f.endsWith('.cc')) sources.push(path.join(hv, sub, f));
  }
  // virtio-net's backend needs libslirp, as the addon's (CMakeLists.txt finds it the same way).
  if (!existsSync('/usr/include/slirp/libslirp.h')) throw new Error('libslirp-dev is not installed: the sanitizer build needs it for virtio-net (apt-get install libslirp-dev)');
  await execFileP('g++', ['-std=c++17', '-g', '-O1', '-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fno-omit-frame-pointer', '-DSKIFF_SLIRP', `-I${hv}`, ...sources, '-o', driver, '-lslirp', '-lpthread'], { maxBuffer: 1 << 24 });
});

// A failing mutation's input is kept in `dir` for a developer; otherwise the directory goes.
let keepDir = false;
test.after.always(async () => {
  if (dir && !keepDir) await fs.rm(dir, { recursive: true, force: true });
});

/**
 * Runs the sanitized vmm-run. `limitMs` is a guard against a guest that never ends, not a
 * timing check: it is short only for mutated kernels (which may spin forever by design); a real
 * test guest gets minutes, since the sanitized VMM is slow and the machine may be loaded.
 */
function run(kernel: string, cmdline: string, cpus = 1, flags: string[] = [], input?: string, limitMs = 180_000): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(driver, [...flags, kernel, cmdline, String(cpus)], { stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    if (input !== undefined) child.stdin!.end(input);
    let out = '';
    child.stdout!.on('data', (d) => (out += d));
    child.stderr!.on('data', (d) => (out += d));
    let killed = false;
    const timer = setTimeout(() => {
      killed = true;
      child.kill('SIGKILL');
    }, limitMs);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, out: killed ? `${out}\n[killed by the test after ${limitMs / 1000} s]` : out });
    });
  });
}

const clean = (r: { code: number | null; out: string }) => !/AddressSanitizer|runtime error|LeakSanitizer/.test(r.out) && (r.code === 0 || r.code === null);

test('the test guests run clean under ASan/UBSan (PVH, bzImage, 4 vCPUs)', async (t) => {
  for (const [file, cmdline, cpus, expect] of [
    ['skiff-test-guest.elf', 'skiff.test=facts', 1, 'kind=exited status=0'],
    ['skiff-test-guest.elf', 'skiff.test=triplefault', 1, 'kind=shutdown'],
    ['skiff-test-guest.bzImage', 'skiff.test=smp', 4, 'kind=exited status=0'],
  ] as const) {
    const r = await run(path.join(guests, file), cmdline, cpus);
    t.true(clean(r), r.out.slice(-2000));
    t.true(r.out.includes(`[result ${expect}`), r.out.slice(-500));
  }
});

test('the event loop and device plumbing run clean under ASan/UBSan: console input, doorbells and interrupt lines on both paths', async (t) => {
  const elf = path.join(guests, 'skiff-test-guest.elf');
  // Console input read from a pipe on the event loop, into the UART.
  const echo = await run(elf, 'skiff.test=echo', 1, ['--stdin'], 'from the loop\n');
  t.true(clean(echo), echo.out.slice(-2000));
  t.true(echo.out.includes('guest: echo from the loop') && echo.out.includes('[result kind=exited status=0'), echo.out.slice(-500));
  for (const [flags, events] of [
    [[], 'doorbells backend=1 emulated=0; interrupt lines backend=1 emulated=0'],
    [['--emulate-doorbells', '--emulate-irqs'], 'doorbells backend=0 emulated=1; interrupt lines backend=0 emulated=1'],
  ] as const) {
    for (const test of ['doorbell=200', 'doorbell-lost']) {
      const r = await run(elf, `skiff.test=${test}`, 1, ['--doorbell-test', ...flags]);
      t.true(clean(r), r.out.slice(-2000));
      t.true(r.out.includes(`[result kind=exited status=0 detail= events=${events}`), r.out.slice(-500));
    }
  }
  // A machine killed by a guest that ends while the loop still has work: exit device during rings.
  const early = await run(elf, 'skiff.test=exit=3', 1, ['--doorbell-test', '--stdin'], 'x'.repeat(100_000));
  t.true(clean(early), early.out.slice(-2000));
  t.true(early.out.includes('[result kind=exited status=3'), early.out.slice(-500));
});

test('the event loop keeps its contract (hypervisor/tools/event-loop-test.cc) under ASan/UBSan and under ThreadSanitizer', async (t) => {
  const hv = path.join(root, 'hypervisor');
  const sources = [path.join(hv, 'tools', 'event-loop-test.cc'), path.join(hv, 'loop', 'epoll.cc')];
  for (const sanitizer of ['address,undefined', 'thread']) {
    const exe = path.join(dir, `event-loop-test-${sanitizer.split(',')[0]}`);
    await execFileP('g++', ['-std=c++17', '-g', '-O1', `-fsanitize=${sanitizer}`, '-fno-sanitize-recover=all', `-I${hv}`, ...sources, '-o', exe, '-lpthread'], { maxBuffer: 1 << 24 });
    const r = await new Promise<{ code: number | null; out: string }>((resolve) => {
      const child = spawn(exe, [], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TSAN_OPTIONS: 'halt_on_error=1' } });
      let out = '';
      child.stdout.on('data', (d) => (out += d));
      child.stderr.on('data', (d) => (out += d));
      const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve({ code, out });
      });
    });
    t.is(r.code, 0, `${sanitizer}: ${r.out.slice(-3000)}`);
    t.regex(r.out, /^event loop: \d+ checks ok$/m, sanitizer);
    t.false(/Sanitizer|runtime error/.test(r.out), r.out.slice(-3000));
  }
});

test('virtio devices on virtio-mmio run clean under ASan/UBSan: rng (both event paths), blk (rw + ro), vsock both ways, a hostile guest', async (t) => {
  const elf = path.join(guests, 'skiff-test-guest.elf');
  const vmDir = await fs.mkdtemp(path.join(dir, 'vm-'));
  const rw = path.join(vmDir, 'rw.img');
  const ro = path.join(vmDir, 'ro.img');
  const image = Buffer.alloc(1 << 20, 0xa5);
  for (let i = 0; i < 512; i++) image[512 + i] = (i * 31 + 7) & 0xff;
  await fs.writeFile(rw, image);
  await fs.writeFile(ro, image);
  for (const flags of [[], ['--emulate-doorbells', '--emulate-irqs']]) {
    const r = await run(elf, 'skiff.test=virtio-rng', 1, ['--rng', ...flags]);
    t.true(clean(r) && r.out.includes('guest: virtio ok') && r.out.includes('[result kind=exited status=0'), r.out.slice(-2000));
  }
  const blk = await run(elf, 'skiff.test=virtio-blk', 1, [`--disk=${rw}`, `--disk=${ro},ro`]);
  t.true(clean(blk) && blk.out.includes('guest: virtio ok') && blk.out.includes('[result kind=exited status=0'), blk.out.slice(-2000));
  const hostile = await run(elf, 'skiff.test=virtio-hostile', 1, ['--rng', `--disk=${rw}`, `--vsock=${vmDir}`]);
  t.true(clean(hostile) && hostile.out.includes('guest: virtio-hostile rng-after-reset=ok') && hostile.out.includes('[result kind=exited status=0'), hostile.out.slice(-2000));

  // vsock: an echoing listener for the guest's connection, and the host's connection to the guest.
  const server = net.createServer((s) => s.on('data', (d) => s.write(d)).on('end', () => s.end()).on('error', () => {}));
  await new Promise<void>((resolve) => server.listen(path.join(vmDir, 'vsock_5000'), resolve));
  const guest = run(elf, 'skiff.test=virtio-vsock', 1, [`--vsock=${vmDir}`]);
  let done = false;
  void guest.then(() => (done = true));
  while (!done) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(path.join(vmDir, 'vsock'));
      let buf = '';
      s.on('error', () => resolve(false)).on('close', () => resolve(false));
      s.on('connect', () => s.write('CONNECT 6000\n'));
      s.on('data', (d) => {
        buf += d;
        if (buf === 'OK 6000\n') s.write('asan ping');
        if (buf === 'OK 6000\nasan ping') {
          s.end();
          resolve(true);
        }
      });
    });
    if (ok) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  const vsock = await guest;
  server.close();
  t.true(clean(vsock) && vsock.out.includes('guest: virtio ok') && vsock.out.includes('[result kind=exited status=0'), vsock.out.slice(-2000));
});

test('virtio-net on virtio-mmio runs clean under ASan/UBSan: the NIC beside rng and vsock, and a hostile guest attacking it with a --publish port open', async (t) => {
  const elf = path.join(guests, 'skiff-test-guest.elf');
  const vmDir = await fs.mkdtemp(path.join(dir, 'net-'));
  // rng at slot 0, vsock at 1, net at 2 (0xd0000400), as skiff boot --network nat places them.
  const probe = await run(elf, 'skiff.test=virtio-rng', 1, ['--rng', `--vsock=${vmDir}`, '--net']);
  t.true(clean(probe), probe.out.slice(-2000));
  t.true(probe.out.includes('guest: virtio devices=3') && probe.out.includes('guest: virtio ok') && probe.out.includes('[result kind=exited status=0'), probe.out.slice(-2000));
  t.true(probe.out.includes('guest: virtio irqs slot=0xd0000400 '), probe.out.slice(-2000));
  // The hostile guest throws garbage at every device's registers and at its queue 0, which is the
  // NIC's receive queue: that ring is only read when a frame comes for the guest. So the host
  // connects to a --publish port every 10 ms while it runs; each connection makes slirp send the
  // guest frames (an ARP request, a SYN), which meet the garbage ring. Without them only the rng
  // reports DEVICE_NEEDS_RESET (failed=1); with them the NIC does too.
  const hostPort = await freePort();
  const hostile = run(elf, 'skiff.test=virtio-hostile', 1, ['--rng', `--vsock=${vmDir}`, `--publish=${hostPort}:80`]);
  let ended = false;
  void hostile.then(() => (ended = true));
  let connects = 0;
  while (!ended) {
    connects++;
    const s = net.connect(hostPort, '127.0.0.1');
    s.on('error', () => {}).on('connect', () => s.write('x'));
    setTimeout(() => s.destroy(), 200);
    await new Promise((r) => setTimeout(r, 10));
  }
  const r = await hostile;
  t.true(clean(r), r.out.slice(-2000));
  t.regex(r.out, /guest: virtio-hostile devices=3 failed=[23]\r?\n/, `${connects} connections: ${r.out.slice(-2000)}`);
  t.true(r.out.includes('guest: virtio-hostile rng-after-reset=ok') && r.out.includes('[result kind=exited status=0'), r.out.slice(-2000));
});


test('120 seeded header mutations: no sanitizer report, no crash', async (t) => {
  let seed = 12345;
  const random = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
  for (const file of ['skiff-test-guest.elf', 'skiff-test-guest.bzImage']) {
    const original = await fs.readFile(path.join(guests, file));
    for (let i = 0; i < 60; i++) {
      let b = Buffer.from(original);
      for (let j = 0; j < 1 + Math.floor(random() * 6); j++) b[Math.floor(random() * Math.min(b.length, 4096))] = Math.floor(random() * 256);
      if (random() < 0.2) b = b.subarray(0, Math.floor(random() * b.length));
      const kernel = path.join(dir, 'mutated');
      await fs.writeFile(kernel, b);
      // A mutated guest may run forever; that is the guest's doing, not a VMM fault.
      const r = await run(kernel, 'skiff.test=exit=0', 1, [], undefined, 5000);
      if (!clean(r)) {
        keepDir = true;
        await fs.copyFile(kernel, path.join(dir, `failing-${file}-${i}`));
        return t.fail(`${file} mutation ${i} (kept in ${dir}): ${r.out.slice(-2000)}`);
      }
    }
  }
  t.pass();
});
