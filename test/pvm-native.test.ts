// The pvm-native kernel flavor (kernel-config/6.1/pvm-native/) on skiff's own hypervisor: a real
// Linux boots to skiff-init, runs a command and its exit status comes back through the exit port.
// On this machine /dev/kvm is KVM on PVM, where guest kernel code is run by KVM's instruction
// emulator: a boot to init takes ~90 s, hence the long timeouts and one VM at a time. The last
// test drives the native engine's virtio devices with Linux's own drivers.
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { defaultImage } from '../src/image/default.js';
import { cachedKernel, defaultFragment } from '../src/kernel/build.js';
import { PVM_NATIVE_CMDLINE } from '../src/kernel/flavors.js';
import { inspectKernel } from '../src/kernel/inspect.js';
import { makeVmConfig } from '../src/vm/config.js';
import { engineCmdline, kernelRelease, NativeMachine, startNative } from '../src/vm/native.js';
import { freePort, guestPattern, hostHttpServer, hostEcho, initrdWithVsockTool, pattern, publishedExchange, sha256, skiff, upperCaseListener } from './helpers.js';

/**
 * Seconds allowed for one boot to init and back: measured ~90-120 s here, but a CI run with other
 * pvm-native boots and compilers on the two cores passed 300 s (RCU stall warnings, still booting).
 */
const BOOT_TIMEOUT_SEC = 540;
const TEST_TIMEOUT_MS = 660_000;
/**
 * The boot with devices: 147-185 s measured here without the network, 354 s with it while another
 * pvm-native boot and compilers shared the two cores (init at 165 s uptime, the network steps
 * ~90 s of it); one try with the cores very busy passed 300 s before the network was added.
 */
const DEVICES_BOOT_TIMEOUT_SEC = 720;
const DEVICES_TEST_TIMEOUT_MS = 900_000;
/** What the guest fetches from the host (10.0.2.2), and sends back through --publish: small, the guest's TCP/IP runs emulated. */
const BLOB_BYTES = 256 << 10;
const PUBLISH_BYTES = 64 << 10;
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

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));


// What this proves: Linux's own drivers - virtio_mmio (probing the slots the engine declares with
// virtio_mmio.device=), virtio_blk, virtio_rng, vmw_vsock_virtio_transport and virtio_net - work
// against skiff's native VMM device code (hypervisor/devices/virtio/ on virtio::Mmio), with kicks
// arriving through KVM ioeventfds and interrupts going out through irqfds, on KVM on PVM. One boot
// (DEVICES_BOOT_TIMEOUT_SEC says how long) carries every check: bytes the host
// put on the disk read by the guest, bytes the guest wrote and flushed read back by the host from
// the file, /dev/hwrng bytes from the virtio rng (rng_current names it), vsock streams in both
// directions (guest → host listener at <vm-dir>/vsock_6000, host → guest listener through
// <vm-dir>/vsock), and the NIC behind libslirp NAT (--network nat): eth0 is virtio_net on the
// fourth slot with skiff-init's address, the guest fetches a token and 256 KiB from an HTTP server
// on the host's loopback through 10.0.2.2, and a --publish'ed host port reaches a server in the
// guest (its token and 64 KiB it made come back). Linux waits for the devices' interrupts here
// (it does not poll), so a lost interrupt shows as a stall: the guest never finishes and the boot
// times out. Payloads are small: guest kernel code (the TCP/IP stack) runs at ~1.3 M
// instructions/s here.
test.serial('pvm-native: Linux virtio_blk, virtio_rng, vsock and virtio_net (NAT, --publish) drivers on the native engine devices (irqfd/ioeventfd)', async (t) => {
  t.timeout(DEVICES_TEST_TIMEOUT_MS);
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-pvm-virtio-'));
  const hostToken = `host-token-${randomBytes(8).toString('hex')}`;
  const blob = randomBytes(BLOB_BYTES);
  const server = await hostHttpServer(hostToken, blob);
  const { port: httpPort, requests } = server;
  try {
    const publishPort = await freePort();
    const BYTES = 8192;
    const fromHost = pattern('host-to-guest', BYTES);
    const diskFile = path.join(scratch, 'disk.img');
    const fh = await fs.open(diskFile, 'w');
    await fh.truncate(8 << 20);
    await fh.write(fromHost, 0, BYTES, 1 << 20);
    await fh.close();
    // Every process costs here (a fork and exec are many page faults, each run by the emulator):
    // what the shell can do itself (read, cd -P, ${x##*/}), it does.
    const script = [
      `up() { read u _ < /proc/uptime; echo "$1 uptime=$u"; }`,
      // Where a stall happened shows in the output: init was reached, then each step's line.
      `up init-reached`,
      `dd if=/dev/vda bs=${BYTES} skip=${(1 << 20) / BYTES} count=1 2>/dev/null | sha256sum | sed 's/^/vda-read /'`,
      `${guestPattern('guest-to-host', BYTES)} | dd of=/dev/vda bs=${BYTES} seek=${(2 << 20) / BYTES} conv=fsync 2>/dev/null && echo vda-written`,
      `read r < /sys/devices/virtual/misc/hw_random/rng_current; echo "rng $r"`,
      `head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n' | sed 's/^/hwrng /'; echo`,
      `dmesg | grep -q "crng init done" && echo crng-ready`,
      // virtio-net: which device eth0 is, its driver, its transport and slot (the platform
      // device's memory range), and skiff-init's address and route.
      `up net-start`,
      `cd -P /sys/class/net/eth0/device && n=$PWD && cd -P driver && d=\${PWD##*/} && cd -P $n/../driver && echo "eth0-device $n" && echo "eth0-driver $d on \${PWD##*/}"; cd /`,
      `read v < $n/vendor; read i < $n/device; echo "eth0-ids $v $i"`,
      `p=\${n%/*}; p=\${p##*/}; while read r c name; do if [ "$name" = "$p" ]; then echo "eth0-iomem $r"; break; fi; done < /proc/iomem`,
      `read m < /sys/class/net/eth0/address; echo "eth0-mac $m"`,
      `ip -4 -o addr show eth0; ip route`,
      // Guest → host loopback through slirp's 10.0.2.2. timeout, not wget -T: Debian 12's
      // busybox 1.35 wget crashes (SIGSEGV) with -T.
      `up fetch-start`,
      `timeout 120 wget -qO /tmp/token http://10.0.2.2:${httpPort}/token; read tok < /tmp/token; echo "token $tok"; up token-fetched`,
      `timeout 120 wget -qO /tmp/blob http://10.0.2.2:${httpPort}/blob; up fetched`,
      `sha256sum /tmp/blob`,
      // Host → guest through --publish ${publishPort}:7000: a token made here, and 64 KiB. The
      // host connects once it sees "publish-listening" (again until the server answers);
      // timeout: a host that never comes does not hold up the checks after this.
      `read gt < /proc/sys/kernel/random/uuid; echo "guest-token $gt"`,
      `head -c ${PUBLISH_BYTES} /dev/urandom > /tmp/pub; sha256sum /tmp/pub`,
      `printf 'read line\\necho "%s $line"\\ncat /tmp/pub\\nread ack\\n' "$gt" > /tmp/serve`,
      `timeout 240 nc -l -p 7000 -e sh /tmp/serve &`,
      `echo publish-listening`,
      `wait $!; up "publish-served $?"`,
      `while read l; do case $l in eth0:*) echo "netdev $l";; esac; done < /proc/net/dev`,
      `vsock-tool listen 5000 & vsock-tool connect 2 6000 hello-from-guest; wait`,
      `grep virtio /proc/interrupts`,
      // Interrupts Linux's handlers did not claim (IRQ_NONE), per virtio line; and no line disabled.
      `for f in /proc/irq/1[6-9]/spurious; do { read a; read b; read c; } < $f; echo "spurious $f $a $b $c"; done`,
      `echo "nobody-cared $(dmesg | grep -c 'nobody cared')"`,
      `up done`,
    ].join('\n');
    const image = await defaultImage();
    const initrd = await initrdWithVsockTool(scratch, image.initrd!, script);

    const config = await makeVmConfig({
      kernel: vmlinux,
      initrd,
      cmdline: image.cmdline,
      timeoutSec: DEVICES_BOOT_TIMEOUT_SEC,
      disks: [{ path: diskFile }],
      network: 'nat',
      publish: [{ hostPort: publishPort, guestPort: 7000, protocol: 'tcp' }],
      command: ['sh', '/bin/check'],
    });
    const started = Date.now();
    const machine = (await startNative(config)) as NativeMachine;
    let out = '';
    machine.output.on('data', (d: Buffer) => (out += d.toString()));
    const { got, close: closeListener } = await upperCaseListener(path.join(machine.vmDir, 'vsock_6000'));
    let ended = false;
    const exit = machine.wait().finally(() => (ended = true));
    const echoed = hostEcho(machine.vsockPath, 5000, 'ping-from-host', () => ended, 500);
    const published = (async () => {
      while (!ended && !out.includes('publish-listening')) await sleep(500);
      return publishedExchange(publishPort, 'hello-from-host\n', PUBLISH_BYTES, () => ended, 1000);
    })();
    const result = await exit;
    closeListener();
    t.log(`boot with devices: ${((Date.now() - started) / 1000).toFixed(0)} s wall; ${out.split('\n').filter((l) => /virtio\d|uptime=|^spurious |^netdev /.test(l)).map((l) => l.trim().replace(/\s+/g, ' ')).join('; ')}`);

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
    t.is(await echoed, 'ping-from-host', 'host → guest echo');
    // virtio-net: eth0 is Linux's virtio_net on a virtio-mmio device declared on the command line,
    // skiff's (vendor "SKIF", device 1), on the slot after rng, the disk and vsock; skiff-init
    // gave it slirp's guest address and the default route through 10.0.2.2.
    t.regex(out, /^eth0-device \/sys\/devices\/virtio-mmio-cmdline\/virtio-mmio\.\d+\/virtio\d+\r?$/m, out);
    t.regex(out, /^eth0-driver virtio_net on virtio-mmio\r?$/m, out);
    t.regex(out, /^eth0-ids 0x46494b53 0x0001\r?$/m, out);
    t.regex(out, /^eth0-iomem d0000600-d00007ff\r?$/m, out);
    t.regex(out, /^eth0-mac 02(:[0-9a-f]{2}){5}\r?$/m, out);
    t.regex(out, /^\d+: eth0\s+inet 10\.0\.2\.15\/24 /m, out);
    t.regex(out, /^default via 10\.0\.2\.2 dev eth0/m, out);
    // NAT to the host's loopback: the token only the host knew, and the payload's hash.
    t.regex(out, new RegExp(`^token ${hostToken}\\r?$`, 'm'), out);
    t.regex(out, new RegExp(`^${sha256(blob)}  /tmp/blob\\r?$`, 'm'), out);
    t.deepEqual(requests, ['GET /token', 'GET /blob']);
    // --publish: the guest's server answered with the token it made and the host's line, then the
    // bytes whose hash it printed.
    const fromGuest = await published;
    const nl = fromGuest.indexOf('\n');
    const guestToken = /^guest-token ([0-9a-f-]{36})\r?$/m.exec(out)?.[1];
    t.truthy(guestToken, out);
    t.is(fromGuest.subarray(0, Math.max(nl, 0)).toString(), `${guestToken} hello-from-host`, out);
    t.is(fromGuest.length - nl - 1, PUBLISH_BYTES, out);
    t.regex(out, new RegExp(`^${sha256(fromGuest.subarray(nl + 1))}  /tmp/pub\\r?$`, 'm'), out);
    t.regex(out, /^publish-served 0 uptime=/m, out);
    // The transport signals every cause (mmio.cc): Linux must never have disabled a line for it.
    t.regex(out, /^nobody-cared 0\r?$/m, out);
  } finally {
    server.close();
    await fs.rm(scratch, { recursive: true, force: true });
  }
});
