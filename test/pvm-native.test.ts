// The pvm-native kernel flavor (kernel-config/6.1/pvm-native/) on skiff's own hypervisor: a real
// Linux boots to skiff-init, runs a command and its exit status comes back through the exit port.
// On this machine /dev/kvm is KVM on PVM, where guest kernel code is run by KVM's instruction
// emulator: a boot to init takes ~90 s, hence the long timeouts and one VM at a time. The last
// test drives the native engine's virtio devices with Linux's own drivers.
import test from 'ava';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { defaultImage } from '../src/image/default.js';
import { cachedKernel, defaultFragment } from '../src/kernel/build.js';
import { PVM_NATIVE_CMDLINE } from '../src/kernel/flavors.js';
import { inspectKernel } from '../src/kernel/inspect.js';
import { makeVmConfig } from '../src/vm/config.js';
import { engineCmdline, kernelRelease, NativeMachine, startNative } from '../src/vm/native.js';
import { guestPattern, hostEcho, initrdWithVsockTool, pattern, sha256, skiff, upperCaseListener } from './helpers.js';


/** Seconds allowed for one boot to init and back: measured ~90-100 s here, more when the cores are busy. */
const BOOT_TIMEOUT_SEC = 300;
const TEST_TIMEOUT_MS = 600_000;
/** The boot with devices: 147-185 s measured here; one try with the cores very busy passed 300 s. */
const DEVICES_BOOT_TIMEOUT_SEC = 720;
const DEVICES_TEST_TIMEOUT_MS = 900_000;
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

// ---- Linux's virtio drivers against the native engine's devices ----


// What this proves: Linux's own drivers - virtio_mmio (probing the slots the engine declares with
// virtio_mmio.device=), virtio_blk, virtio_rng and vmw_vsock_virtio_transport - work against
// skiff's native VMM device code (hypervisor/devices/virtio/ on virtio::Mmio), with kicks arriving
// through KVM ioeventfds and interrupts going out through irqfds, on KVM on PVM. One boot (147 s and
// 185 s wall in two runs here) carries every check: bytes the host put on the disk read by the guest, bytes the
// guest wrote and flushed read back by the host from the file, /dev/hwrng bytes from the virtio
// rng (rng_current names it), and vsock streams in both directions (guest → host listener at
// <vm-dir>/vsock_6000, host → guest listener through <vm-dir>/vsock). Linux waits for the
// devices' interrupts here (it does not poll), so a lost interrupt shows as a stall: the guest
// never finishes and the boot times out.
test.serial('pvm-native: Linux virtio_blk, virtio_rng and vsock drivers on the native engine devices (irqfd/ioeventfd)', async (t) => {
  t.timeout(DEVICES_TEST_TIMEOUT_MS);
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-pvm-virtio-'));
  try {
    const BYTES = 8192;
    const fromHost = pattern('host-to-guest', BYTES);
    const diskFile = path.join(scratch, 'disk.img');
    const fh = await fs.open(diskFile, 'w');
    await fh.truncate(8 << 20);
    await fh.write(fromHost, 0, BYTES, 1 << 20);
    await fh.close();
    const script = [
      // Where a stall happened shows in the output: init was reached, then each step's line.
      `echo "init-reached uptime=$(cut -d' ' -f1 /proc/uptime)"`,
      `dd if=/dev/vda bs=${BYTES} skip=${(1 << 20) / BYTES} count=1 2>/dev/null | sha256sum | sed 's/^/vda-read /'`,
      `${guestPattern('guest-to-host', BYTES)} | dd of=/dev/vda bs=${BYTES} seek=${(2 << 20) / BYTES} conv=fsync 2>/dev/null && echo vda-written`,
      `echo "rng $(cat /sys/devices/virtual/misc/hw_random/rng_current)"`,
      `head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n' | sed 's/^/hwrng /'; echo`,
      `dmesg | grep -q "crng init done" && echo crng-ready`,
      `vsock-tool listen 5000 & vsock-tool connect 2 6000 hello-from-guest; wait`,
      `grep virtio /proc/interrupts`,
      // Interrupts Linux's handlers did not claim (IRQ_NONE), per virtio line; and no line disabled.
      `for f in /proc/irq/1[6-9]/spurious; do echo "spurious $f $(tr '\\n' ' ' < $f)"; done`,
      `echo "nobody-cared $(dmesg | grep -c 'nobody cared')"`,
      `echo "done uptime=$(cut -d' ' -f1 /proc/uptime)"`,
    ].join('\n');
    const image = await defaultImage();
    const initrd = await initrdWithVsockTool(scratch, image.initrd!, script);

    const config = await makeVmConfig({ kernel: vmlinux, initrd, cmdline: image.cmdline, timeoutSec: DEVICES_BOOT_TIMEOUT_SEC, disks: [{ path: diskFile }], command: ['sh', '/bin/check'] });
    const started = Date.now();
    const machine = (await startNative(config)) as NativeMachine;
    let out = '';
    machine.output.on('data', (d: Buffer) => (out += d.toString()));
    const { got, close: closeListener } = await upperCaseListener(path.join(machine.vmDir, 'vsock_6000'));
    let ended = false;
    const exit = machine.wait().finally(() => (ended = true));
    const echoed = await hostEcho(machine.vsockPath, 5000, 'ping-from-host', () => ended, 500);
    const result = await exit;
    closeListener();
    t.log(`boot with devices: ${((Date.now() - started) / 1000).toFixed(0)} s wall; ${out.split('\n').filter((l) => /virtio\d|uptime=|^spurious /.test(l)).map((l) => l.trim().replace(/\s+/g, ' ')).join('; ')}`);

    t.deepEqual(result, { kind: 'exited', status: 0 }, out);
    // virtio-blk, both ways: the guest read what the host wrote; the host reads what the guest wrote.
    t.regex(out, new RegExp(`vda-read ${sha256(fromHost)}`), out);
    t.regex(out, /vda-written/, out);
    const back = Buffer.alloc(BYTES);
    const rfh = await fs.open(diskFile, 'r');
    await rfh.read(back, 0, BYTES, 2 << 20);
    await rfh.close();
    t.deepEqual(back, pattern('guest-to-host', BYTES));
    // virtio-rng: the kernel's current hwrng is virtio's, and it gave bytes.
    t.regex(out, /^rng virtio_rng\.\d+\r?$/m, out);
    const hw = /hwrng ([0-9a-f]+)/.exec(out)?.[1] ?? '';
    t.is(hw.length, 128, out);
    t.not(hw, '0'.repeat(128));
    t.regex(out, /crng-ready/, out);
    // virtio-vsock, both directions.
    t.deepEqual(got, ['hello-from-guest']);
    t.regex(out, /reply: HELLO-FROM-GUEST/, out);
    t.is(echoed, 'ping-from-host', 'host → guest echo');
    // The transport signals every cause (mmio.cc): Linux must never have disabled a line for it.
    t.regex(out, /^nobody-cared 0\r?$/m, out);
  } finally {
    await fs.rm(scratch, { recursive: true, force: true });
  }
});
