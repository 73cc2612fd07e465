// The pvm-native kernel flavor (kernel-config/6.1/pvm-native/) on skiff's own hypervisor: a real
// Linux boots to skiff-init, runs a command and its exit status comes back through the exit port.
// On this machine /dev/kvm is KVM on PVM, where guest kernel code is run by KVM's instruction
// emulator: a boot to init takes ~90 s, hence the long timeouts and one VM at a time.
import test from 'ava';
import { existsSync } from 'node:fs';
import { cachedKernel, defaultFragment } from '../src/kernel/build.js';
import { PVM_NATIVE_CMDLINE } from '../src/kernel/flavors.js';
import { inspectKernel } from '../src/kernel/inspect.js';
import { engineCmdline, kernelRelease } from '../src/vm/native.js';
import { skiff } from './helpers.js';

/** Seconds allowed for one boot to init and back: measured ~90-100 s here, more when the cores are busy. */
const BOOT_TIMEOUT_SEC = 300;
const TEST_TIMEOUT_MS = 600_000;
/** Building the flavor when it is missing: ~9.5 minutes on 2 cores (a near-full build, see its config). */
const BUILD_TIMEOUT_MS = 1_200_000;

let vmlinux = '';

test.before(async (t) => {
  t.timeout(BUILD_TIMEOUT_MS);
  if (!existsSync('/dev/kvm')) throw new Error('/dev/kvm is missing: the native engine tests need it');
  const cached = await cachedKernel(defaultFragment(), 'pvm-native');
  if (cached) {
    vmlinux = cached.vmlinux;
    return;
  }
  // Built from a copy of the default kernel's build tree; building both here would take too long.
  if (!(await cachedKernel())) {
    throw new Error('the default kernel is not built, and the pvm-native flavor is built from it: run "node dist/cli/main.js kernel build --flavor pvm-native" first (about 18 minutes on 2 cores for both)');
  }
  const r = await skiff(['kernel', 'build', '--flavor', 'pvm-native', '--jobs', '2', '--quiet', '--json']);
  if (r.code !== 0) throw new Error(`building the pvm-native kernel flavor failed (exit ${r.code}): ${r.stderr.trim()}`);
  vmlinux = JSON.parse(r.stdout).vmlinux;
});

// No --cmdline: the native engine recognises the flavor by its release and adds PVM_NATIVE_CMDLINE
// itself (src/vm/native.ts); without it the kernel stops at its first ring-0 xrstor.
function boot(extra: string[], command: string[]) {
  return skiff(['boot', '--engine', 'native', '--kernel', vmlinux, '--timeout', String(BOOT_TIMEOUT_SEC), ...extra, '--', ...command]);
}

test.serial('pvm-native: the release is read without reading the whole vmlinux, and names the flavor', async (t) => {
  const kernel = await inspectKernel(vmlinux, { version: false });
  const release = await kernelRelease(kernel);
  t.regex(release ?? '', /^6\.1\.\d+-skiff-pvm-native$/);
  t.is(engineCmdline('console=ttyS0', release).added, PVM_NATIVE_CMDLINE);
  // Words the user already passed are not repeated.
  t.is(engineCmdline(`console=ttyS0 ${PVM_NATIVE_CMDLINE}`, release).added, '');
  const plain = await cachedKernel();
  if (plain) t.is(engineCmdline('console=ttyS0', await kernelRelease(await inspectKernel(plain.vmlinux, { version: false }))).added, '');
});

test.serial('pvm-native: Linux boots to skiff-init on the native engine, runs a command, its exit status comes back', async (t) => {
  t.timeout(TEST_TIMEOUT_MS);
  const r = await boot([], ['sh', '-c', 'echo hi; uname -r; cat /proc/cmdline; exit 7']);
  t.is(r.code, 7, `stdout: ${r.stdout}\nstderr: ${r.stderr}`);
  const lines = r.stdout.split(/\r?\n/);
  t.true(lines.includes('hi'), r.stdout);
  t.true(lines.some((l) => /^6\.1\.\d+-skiff-pvm-native$/.test(l)), r.stdout);
  // The kernel got the flavor's command line from the engine, once.
  const cmdline = lines.find((l) => l.includes('noxsave')) ?? '';
  t.true(cmdline.includes(PVM_NATIVE_CMDLINE), r.stdout);
  t.is(cmdline.split(' ').filter((w) => w === 'noxsave').length, 1, cmdline);
});

test.serial('pvm-native: --cpus 2 brings up both CPUs (MP table, INIT/SIPI), and the command sees them', async (t) => {
  t.timeout(TEST_TIMEOUT_MS);
  const r = await boot(['--cpus', '2', '--verbose'], ['sh', '-c', 'nproc; grep -c ^processor /proc/cpuinfo; exit 3']);
  t.is(r.code, 3, `stdout: ${r.stdout}\nstderr: ${r.stderr}`);
  t.regex(r.stdout, /smp: Brought up 1 node, 2 CPUs/);
  t.regex(r.stderr, /pvm-native kernel, so the command line gets: noxsave /);
  const lines = r.stdout.split(/\r?\n/);
  t.is(lines.filter((l) => l === '2').length, 2, r.stdout);
});
