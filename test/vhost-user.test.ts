// skiff's devices served over vhost-user (hypervisor/transport/): the transport's C++ tests and its
// fuzz target under ASan/UBSan, then real Linux guests on the QEMU engine (TCG here) using skiff's
// virtio-blk, virtio-rng and virtio-vsock: bytes both ways through two disks (one read-only),
// data that survives FLUSH and a SIGKILL of skiff, /dev/hwrng, vsock echo in both directions, and
// the device server itself built with ASan (and libslirp) serving a guest all four devices, the
// NIC moving bytes both ways through 10.0.2.2 and a --publish port. Three boots in all.
import test from 'ava';
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { defaultImage } from '../src/image/default.js';
import { cachedKernel } from '../src/kernel/build.js';
import { packageRoot } from '../src/paths.js';
import { makeVmConfig } from '../src/vm/config.js';
import { qemuArgs, startQemu } from '../src/vm/qemu.js';
import { freePort, guestPattern, hostHttpServer, hostEcho, initrdWithVsockTool, pattern, publishedExchange, sha256, skiff, upperCaseListener } from './helpers.js';

const execFileP = promisify(execFile);
const root = packageRoot();
const hv = path.join(root, 'hypervisor');
const SANITIZE = ['-std=c++17', '-g', '-O1', '-Wall', '-Wextra', '-Werror', '-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fno-omit-frame-pointer', `-I${hv}`];

let scratch = '';
test.before(async () => {
  scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-vhost-user-'));
});
test.after.always(async () => {
  if (scratch) await fs.rm(scratch, { recursive: true, force: true });
});

/** The guest tests need the default kernel; npm test builds it first, so a missing one is a failure. */
async function requireKernel(): Promise<void> {
  if (!(await cachedKernel())) throw new Error('the default kernel is not built: run "node dist/bundle/skiff.js kernel build"');
}

async function coreSources(): Promise<string[]> {
  const virtio = path.join(hv, 'devices', 'virtio');
  return [...(await fs.readdir(virtio)).filter((f) => f.endsWith('.cc')).map((f) => path.join(virtio, f)), path.join(hv, 'loop', 'epoll.cc')];
}

test.serial('transport: the fake front-end tests pass under ASan/UBSan', async (t) => {
  const bin = path.join(scratch, 'vhost-user-test');
  await execFileP('g++', [...SANITIZE, ...(await coreSources()), path.join(hv, 'transport', 'vhost_user.cc'), path.join(hv, 'transport', 'test', 'vhost-user-test.cc'), '-o', bin, '-lpthread'], {
    maxBuffer: 1 << 24,
  });
  const { stdout, stderr } = await execFileP(bin, [scratch], { maxBuffer: 1 << 24 }).catch((e) => e);
  t.notRegex(stderr, /AddressSanitizer|runtime error|LeakSanitizer/, stderr);
  t.regex(stdout, /^\d+ passed, 0 failed$/m, stdout + stderr);
  t.log(stdout.trim());
});

test.serial('transport: a bounded fuzz run of the message parser finds nothing', async (t) => {
  const seconds = process.env.SKIFF_FUZZ_SECONDS ?? '10';
  t.timeout((Number(seconds) + 240) * 1000);  // plus building the target with clang
  const r = await execFileP('bash', [path.join(hv, 'transport', 'fuzz', 'run.sh')], { cwd: root, env: { ...process.env, SKIFF_FUZZ_SECONDS: seconds }, maxBuffer: 1 << 24 }).then(
    (ok) => ({ code: 0, out: ok.stdout + ok.stderr }),
    (e) => ({ code: e.code as number, out: String(e.stdout) + String(e.stderr) }),
  );
  t.is(r.code, 0, r.out);
  t.regex(r.out, /fuzz: vhost-user: Done \d+ runs/, r.out);
  t.log(r.out.split('\n').filter((l) => /Done|exec_per_sec/.test(l)).join('\n'));
});

// ---- real guests ----

const PATTERN_BYTES = 64 * 1024;

async function disk(name: string, mib: number, at?: { offset: number; data: Buffer }): Promise<string> {
  const file = path.join(scratch, name);
  const fh = await fs.open(file, 'w');
  await fh.truncate(mib << 20);
  if (at) await fh.write(at.data, 0, at.data.length, at.offset);
  await fh.close();
  return file;
}

async function readAt(file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await fs.open(file, 'r');
  const buf = Buffer.alloc(length);
  await fh.read(buf, 0, length, offset);
  await fh.close();
  return buf;
}

test.serial('a real guest: two disks (one ro), patterns both ways, serials, /dev/hwrng, vsock echo both ways', async (t) => {
  await requireKernel();
  const image = await defaultImage();
  const fromHost = pattern('host-to-guest', PATTERN_BYTES);
  const rw = await disk('rw.img', 8, { offset: 1 << 20, data: fromHost });
  const roData = pattern('read-only-disk', 4096);
  const ro = await disk('ro.img', 4, { offset: 0, data: roData });
  const script = [
    // host → guest through vda
    `dd if=/dev/vda bs=65536 skip=16 count=1 2>/dev/null | sha256sum | sed 's/^/vda-read /'`,
    // guest → host through vda, then FLUSH
    `${guestPattern('guest-to-host', PATTERN_BYTES)} | dd of=/dev/vda bs=65536 seek=32 conv=fsync 2>/dev/null && echo vda-written`,
    `echo "serials $(cat /sys/block/vda/serial) $(cat /sys/block/vdb/serial)"`,
    `echo "ro $(cat /sys/block/vda/ro) $(cat /sys/block/vdb/ro)"`,
    `head -c 4096 /dev/vdb | sha256sum | sed 's/^/vdb-read /'`,
    `if echo x | dd of=/dev/vdb conv=fsync 2>/dev/null; then echo vdb-write-accepted; else echo vdb-write-refused; fi`,
    `echo "rng $(cat /sys/devices/virtual/misc/hw_random/rng_current)"`,
    `head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n' | sed 's/^/hwrng /'; echo`,
    `dmesg | grep -q "crng init done" && echo crng-ready`,
    // vsock: guest listener for the host, and guest → host listener at vsock_6000
    `vsock-tool listen 5000 & vsock-tool connect 2 6000 hello-from-guest; wait`,
  ].join('\n');
  const initrd = await initrdWithVsockTool(scratch, image.initrd!, script);
  const config = await makeVmConfig({ kernel: image.kernel, initrd, cmdline: image.cmdline, timeoutSec: 120, disks: [{ path: rw }, { path: ro, readOnly: true }], command: ['sh', '/bin/check'] });
  const machine = await startQemu(config, { accel: 'tcg' });
  // guest → host: a listener that answers in upper case.
  const { got, close: closeListener } = await upperCaseListener(path.join(machine.vmDir, 'vsock_6000'));
  // skiff's sockets: 0600 in a 0700 directory.
  const modes: Record<string, number> = {};
  for (const name of ['.', 'vsock', 'vsock.sock', 'rng.sock', 'blk0.sock', 'blk1.sock']) modes[name] = (await fs.stat(path.join(machine.vmDir, name))).mode & 0o777;
  let out = '';
  machine.output.on('data', (d: Buffer) => (out += d.toString()));
  let ended = false;
  void machine.wait().then(() => (ended = true));
  const echoed = await hostEcho(machine.vsockPath, 5000, 'ping-from-host', () => ended);
  const exit = await machine.wait();
  closeListener();
  t.deepEqual(exit, { kind: 'exited', status: 0 }, out);
  t.regex(out, new RegExp(`vda-read ${sha256(fromHost)}`), out);
  t.regex(out, /vda-written/, out);
  t.deepEqual(await readAt(rw, 2 << 20, PATTERN_BYTES), pattern('guest-to-host', PATTERN_BYTES));
  t.regex(out, /serials skiff-disk-0 skiff-disk-1/, out);
  t.regex(out, /ro 0 1/, out);
  t.regex(out, new RegExp(`vdb-read ${sha256(roData)}`), out);
  t.regex(out, /vdb-write-refused/, out);
  t.deepEqual(await readAt(ro, 0, 4096), roData, 'the read-only disk is unchanged');
  t.regex(out, /rng virtio_rng\.\d+/, out);
  const hw = /hwrng ([0-9a-f]+)/.exec(out)?.[1] ?? '';
  t.is(hw.length, 128, out);
  t.not(hw, '0'.repeat(128));
  t.regex(out, /crng-ready/, out);
  t.is(echoed, 'ping-from-host', 'host → guest echo');
  t.deepEqual(got, ['hello-from-guest']);
  t.regex(out, /reply: HELLO-FROM-GUEST/, out);
  t.deepEqual(modes, { '.': 0o700, vsock: 0o600, 'vsock.sock': 0o600, 'rng.sock': 0o600, 'blk0.sock': 0o600, 'blk1.sock': 0o600 });
  // The VM directory (sockets, 0700) is gone after the end.
  await t.throwsAsync(fs.stat(machine.vmDir));
});

test.serial('data written and flushed by the guest survives a SIGKILL of skiff', async (t) => {
  await requireKernel();
  const file = await disk('kill.img', 8);
  const tag = `survivor-${process.pid}`;
  const child = spawn(process.execPath, [path.join(root, 'dist', 'bundle', 'skiff.js'), 'boot', '--engine', 'qemu', '--disk', file, '--timeout', '120', '--', 'sh', '-c',
    `${guestPattern(tag, PATTERN_BYTES)} | dd of=/dev/vda bs=65536 seek=8 2>/dev/null && sync && echo SYNCED && sleep 100`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const synced = new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('SYNCED')) resolve();
    });
    child.on('close', () => reject(new Error(`skiff ended before the guest synced: ${out}`)));
  });
  await synced;
  // QEMU is skiff's child; it outlives a SIGKILLed parent, so it is found first and killed after.
  const { stdout: qemuPids } = await execFileP('pgrep', ['-P', String(child.pid), 'qemu-system']).catch(() => ({ stdout: '' }));
  child.kill('SIGKILL');
  await new Promise((r) => child.once('close', r));
  for (const pid of qemuPids.split('\n').filter(Boolean)) process.kill(Number(pid), 'SIGKILL');
  t.true(qemuPids.trim().length > 0, 'found the QEMU child');
  t.deepEqual(await readAt(file, 8 * 65536, PATTERN_BYTES), pattern(tag, PATTERN_BYTES));
});


// One boot with all four devices. The NIC's part (virtio-net and its libslirp backend): the guest
// fetches a token and 512 KiB from an HTTP server on the host's loopback through 10.0.2.2, posts
// 256 KiB back, and serves a token and 256 KiB of its own to the host through a --publish port.
test.serial('the device server built with ASan/UBSan serves a guest cleanly (blk, rng, vsock, net with --publish)', async (t) => {
  // virtio-net's backend needs libslirp, as the addon's (CMakeLists.txt finds it the same way).
  if (!existsSync('/usr/include/slirp/libslirp.h')) throw new Error('libslirp-dev is not installed: the sanitizer build needs it for virtio-net (apt-get install libslirp-dev)');
  const bin = path.join(scratch, 'vhost-user-serve');
  const sources = [...(await coreSources()), path.join(hv, 'transport', 'vhost_user.cc'), path.join(hv, 'transport', 'device_server.cc'), path.join(hv, 'tools', 'vhost-user-serve.cc')];
  await execFileP('g++', [...SANITIZE, '-DSKIFF_SLIRP', ...sources, '-o', bin, '-lslirp', '-lpthread'], { maxBuffer: 1 << 24 });
  await requireKernel();
  const image = await defaultImage();
  const file = await disk('asan.img', 8, { offset: 0, data: pattern('asan', 4096) });
  const dir = await fs.mkdtemp(path.join(scratch, 'vm-'));
  await fs.chmod(dir, 0o700);

  // The host's HTTP server on loopback, which the guest reaches as 10.0.2.2.
  const token = `asan-token-${randomBytes(8).toString('hex')}`;
  const blob = randomBytes(512 * 1024);
  const http = await hostHttpServer(token, blob);
  const { port: httpPort, uploads } = http;
  const hostPort = await freePort();

  const server = spawn(bin, [dir, '--disk', file, '--rng', '--vsock', '--net', '--publish', `${hostPort}:7000`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let serverOut = '';
  let serverErr = '';
  server.stderr.on('data', (d: Buffer) => (serverErr += d.toString()));
  await new Promise<void>((resolve, reject) => {
    server.stdout.on('data', (d: Buffer) => {
      serverOut += d.toString();
      if (serverOut.includes('ready\n')) resolve();
    });
    server.on('close', () => reject(new Error(`vhost-user-serve ended: ${serverErr}`)));
  });
  const sockets = [...serverOut.matchAll(/^(blk|rng|vsock|net) (\S+)$/gm)].map((m) => ({ kind: m[1], path: m[2] }));
  t.deepEqual(sockets.map((s) => s.kind), ['blk', 'rng', 'vsock', 'net']);
  const netMac = /^net-mac ((?:[0-9a-f]{2}:){5}[0-9a-f]{2})$/m.exec(serverOut)?.[1];
  t.truthy(netMac, serverOut);

  const UP = 256 * 1024;
  const SERVED = 256 * 1024;
  const guestToken = `guest-token-${randomBytes(8).toString('hex')}`;
  const script = [
    `head -c 4096 /dev/vda | sha256sum; ${guestPattern('asan-guest', PATTERN_BYTES)} | dd of=/dev/vda bs=65536 seek=4 conv=fsync 2>/dev/null; head -c 4096 /dev/hwrng | wc -c`,
    // The --publish server: answers the host's line with the token, sends SERVED bytes it hashed,
    // and waits for the host's ack (so the guest does not power off holding unsent bytes).
    `head -c ${SERVED} /dev/urandom > /tmp/served; sha256sum /tmp/served | sed 's/^/served /'`,
    `printf '#!/bin/sh\\nread line\\necho "${guestToken} $line"\\ncat /tmp/served\\nread ack\\n' > /tmp/serve && chmod +x /tmp/serve`,
    'nc -l -p 7000 -e /tmp/serve & NC=$!',
    `echo "token $(wget -qO- http://10.0.2.2:${httpPort}/token)"`,
    `wget -qO- http://10.0.2.2:${httpPort}/blob | sha256sum | sed 's/^/blob /'`,
    // Text: busybox wget sends --post-file as a C string.
    `head -c ${(UP / 4) * 3} /dev/urandom | base64 -w0 > /tmp/up && sha256sum /tmp/up | sed 's/^/up /'`,
    `echo "reply $(wget -qO- --post-file=/tmp/up http://10.0.2.2:${httpPort}/upload)"`,
    'wait $NC; echo "nc-done $?"',
  ].join('\n');
  const config = await makeVmConfig({ kernel: image.kernel, initrd: image.initrd, cmdline: image.cmdline, timeoutSec: 120, command: ['sh', '-c', script] });
  const qemu = spawn('qemu-system-x86_64', qemuArgs(config, path.join(dir, 'status'), { accel: 'tcg' }, { sockets, netMac }), { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  qemu.stdout.on('data', (d: Buffer) => (out += d.toString()));
  qemu.stderr.on('data', (d: Buffer) => (out += d.toString()));
  // QEMU started by hand has no timeout of its own: a guest stuck waiting for the host ends here.
  const guard = setTimeout(() => qemu.kill('SIGKILL'), 150_000);
  let ended = false;
  const qemuClosed = new Promise((r) => qemu.once('close', r)).then(() => (ended = true));
  const published = await publishedExchange(hostPort, 'hello-from-host\n', SERVED, () => ended);
  await qemuClosed;
  clearTimeout(guard);
  http.close();
  server.kill('SIGTERM');
  const code = await new Promise((r) => server.once('close', r));
  t.is(code, 0, serverErr);
  t.notRegex(serverErr, /AddressSanitizer|runtime error|LeakSanitizer/, serverErr);
  t.regex(out, new RegExp(sha256(pattern('asan', 4096))), out);
  t.regex(out, /^4096\r?$/m, out);
  t.deepEqual(await readAt(file, 4 * 65536, PATTERN_BYTES), pattern('asan-guest', PATTERN_BYTES));
  t.regex(serverOut, /cpu \d+\.\d+ s/);
  // net: host → guest and guest → host through 10.0.2.2, and host → guest server through --publish.
  t.regex(out, new RegExp(`^token ${token}\\r?$`, 'm'), out);
  t.regex(out, new RegExp(`^blob ${sha256(blob)} `, 'm'), out);
  const up = /^up ([0-9a-f]{64}) /m.exec(out)?.[1];
  t.truthy(up, out);
  t.deepEqual(uploads, [up], 'the host received exactly what the guest sent');
  t.regex(out, new RegExp(`^reply uploaded ${UP} [0-9a-f]{64}\\r?$`, 'm'), out);
  const nl = published.indexOf('\n');
  t.is(published.subarray(0, nl).toString(), `${guestToken} hello-from-host`, out);
  t.is(published.length - nl - 1, SERVED, out);
  t.regex(out, new RegExp(`^served ${sha256(published.subarray(nl + 1))} `, 'm'), out);
  t.regex(out, /^nc-done 0\r?$/m, out);
});

test.serial('bad --disk on the qemu engine: one-line errors, nothing left behind', async (t) => {
  const held = await disk('held.img', 1);
  // A disk another skiff holds (the device server locks it): refused before QEMU starts.
  const dir = await fs.mkdtemp(path.join(scratch, 'lock-'));
  const bin = path.join(scratch, 'vhost-user-serve');
  const holder = spawn(bin, [dir, '--disk', held], { stdio: ['ignore', 'pipe', 'pipe'] });
  await new Promise<void>((resolve) => holder.stdout.on('data', (d: Buffer) => d.toString().includes('ready') && resolve()));
  const r = await skiff(['boot', '--engine', 'qemu', '--disk', held, '--', 'true']);
  holder.kill('SIGTERM');
  await new Promise((res) => holder.once('close', res));
  t.is(r.code, 125, r.stderr);
  t.regex(r.stderr.trim(), /^skiff: .*held\.img.*in use/);
  t.is(r.stderr.trim().split('\n').length, 1, r.stderr);
});
