// Real boots: skiff's kernel and initrd on the QEMU engine (TCG on this machine), through the CLI.
import test from 'ava';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { cachedKernel } from '../src/kernel/build.js';
import { CpioWriter } from '../src/initrd/cpio.js';
import { skiff } from './helpers.js';

const execFileP = promisify(execFile);

test.before(async () => {
  // npm test builds the kernel before ava runs; a missing kernel is a failure, not a skip.
  if (!(await cachedKernel())) throw new Error('the default kernel is not built: run "node dist/bundle/skiff.js kernel build"');
});

test('uname -r prints the 6.1 guest kernel version', async (t) => {
  const r = await skiff(['boot', '--', 'uname', '-r']);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^6\.1\.\d+-skiff\r?$/m);
  t.notRegex(r.stdout, /skiff-init: ready/, 'the ready marker is not shown');
});

test('the guest command exit status comes back: 7', async (t) => {
  const r = await skiff(['boot', '--', 'sh', '-c', 'exit 7']);
  t.is(r.code, 7, r.stderr);
});

test('a status above 127 comes back whole: 200', async (t) => {
  const r = await skiff(['boot', '--', 'sh', '-c', 'exit 200']);
  t.is(r.code, 200, r.stderr);
});

test('a command killed by a signal gives 128+signal', async (t) => {
  const r = await skiff(['boot', '--', 'sh', '-c', 'kill -9 $$']);
  t.is(r.code, 137, r.stderr);
});

test('a command that does not exist gives 127 and says so', async (t) => {
  const r = await skiff(['boot', '--', 'no-such-command']);
  t.is(r.code, 127);
  t.regex(r.stdout + r.stderr, /skiff-init: cannot run 'no-such-command': No such file or directory/);
});

test('--cpus 2 shows 2 CPUs in the guest', async (t) => {
  const r = await skiff(['boot', '--cpus', '2', '--', 'sh', '-c', 'nproc; grep -c ^processor /proc/cpuinfo']);
  t.is(r.code, 0, r.stderr);
  t.deepEqual(r.stdout.trim().split(/\r?\n/).map((l) => l.trim()), ['2', '2']);
});

test('--memory shows in /proc/meminfo', async (t) => {
  for (const mib of [128, 512]) {
    const r = await skiff(['boot', '--memory', String(mib), '--', 'cat', '/proc/meminfo']);
    t.is(r.code, 0, r.stderr);
    const kib = Number(/MemTotal:\s+(\d+) kB/.exec(r.stdout)?.[1]);
    // MemTotal is what is left after the kernel's own reservations: a little below what was given.
    t.true(kib <= mib * 1024 && kib > mib * 1024 * 0.8, `MemTotal ${kib} kB for --memory ${mib}`);
  }
});

test('the bzImage boots too', async (t) => {
  const kernel = (await cachedKernel())!;
  const r = await skiff(['boot', '--kernel', kernel.bzImage, '--', 'uname', '-r']);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^6\.1\.\d+-skiff\r?$/m);
});

test('a guest kernel panic gives a one-line error and exit 125', async (t) => {
  // An initrd whose /init exits at once: the kernel panics ("Attempted to kill init").
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-panic-'));
  await fs.writeFile(path.join(dir, 'init.c'), 'int main(void) { return 3; }\n');
  await execFileP('cc', ['-static', '-Os', '-o', path.join(dir, 'init'), path.join(dir, 'init.c')]);
  const cpio = new CpioWriter();
  cpio.dir('dev');
  cpio.charDevice('dev/console', 5, 1, { mode: 0o600 });
  cpio.hostFile('init', path.join(dir, 'init'), { mode: 0o755 });
  await cpio.writeTo(path.join(dir, 'initrd.cpio'));
  const r = await skiff(['boot', '--initrd', path.join(dir, 'initrd.cpio'), '--timeout', '120']);
  t.is(r.code, 125);
  t.is(r.stderr.trim(), 'skiff: guest kernel panic: Attempted to kill init! exitcode=0x00000300');
});

test('a guest still running at --timeout is stopped: exit 124', async (t) => {
  const r = await skiff(['boot', '--timeout', '4', '--', 'sleep', '600']);
  t.is(r.code, 124);
  t.regex(r.stderr, /^skiff: guest still running after 4 s \(--timeout\): stopped it$/m);
});

test('a file that is not a kernel: one-line error, exit 125', async (t) => {
  const r = await skiff(['boot', '--kernel', '/etc/hostname', '--', 'true']);
  t.is(r.code, 125);
  t.is(r.stderr, 'skiff: /etc/hostname is not a Linux kernel (neither an ELF vmlinux nor a bzImage)\n');
});

test('bad flags: one-line errors, never a crash', async (t) => {
  const cpus = await skiff(['boot', '--cpus', '0', '--', 'true']);
  t.is(cpus.code, 125);
  t.is(cpus.stderr, 'skiff: --cpus must be a whole number from 1 to 64, got 0\n');
  const engine = await skiff(['boot', '--engine', 'warp', '--', 'true']);
  t.not(engine.code, 0);
  t.regex(engine.stdout + engine.stderr, /--engine/);
});
