// skiff's virtio-net behind libslirp NAT, end to end. On the QEMU engine (TCG here), real Linux
// guests with skiff's NIC served over vhost-user: a page (and 1 MiB both ways) from an HTTP
// server on the host's loopback through 10.0.2.2, a --publish port reaching a server in the guest
// (TCP, and UDP datagrams up to 32 KiB), DNS through 10.0.2.3, a taken --publish port, and
// --network none. On the native engine, the ring-3 test guest (test/guests/virtio.c) finds the
// NIC on the slot after vsock and throws register garbage and bad rings at it, as at every other
// device.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import dgram from 'node:dgram';
import { existsSync, promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { defaultImage } from '../src/image/default.js';
import { cachedKernel } from '../src/kernel/build.js';
import { packageRoot } from '../src/paths.js';
import { makeVmConfig } from '../src/vm/config.js';
import { startNative } from '../src/vm/native.js';
import { freePort, hostHttpServer, initrdWithVsockTool, publishedExchange, sha256, skiff, startSkiff } from './helpers.js';

const root = packageRoot();
const GUEST = path.join(root, 'test', 'guests', 'out', 'skiff-test-guest.elf');
const MIB = 1 << 20;

/** The guest tests need the default kernel; npm test builds it first, so a missing one is a failure. */
async function requireKernel(): Promise<void> {
  if (!(await cachedKernel())) throw new Error('the default kernel is not built: run "node dist/bundle/skiff.js kernel build"');
}


const boot = (args: string[]) => skiff(['boot', '--engine', 'qemu', '--timeout', '120', ...args]);

test.serial('the guest reaches an HTTP server on host loopback through 10.0.2.2: a token only the host knows, 1 MiB each way', async (t) => {
  await requireKernel();
  const token = `host-token-${randomBytes(8).toString('hex')}`;
  const blob = randomBytes(MIB);
  const { port, uploads, close } = await hostHttpServer(token, blob);
  const script = [
    `echo "token $(wget -qO- http://10.0.2.2:${port}/token)"`,
    `wget -qO- http://10.0.2.2:${port}/blob | sha256sum | sed 's/^/blob /'`,
    // Text: busybox wget sends --post-file as a C string, so a NUL byte would end it.
    `head -c ${(MIB / 4) * 3} /dev/urandom | base64 -w0 > /tmp/up && sha256sum /tmp/up | sed 's/^/up /'`,
    `echo "reply $(wget -qO- --post-file=/tmp/up http://10.0.2.2:${port}/upload)"`,
    `echo "mac $(cat /sys/class/net/eth0/address)"`,
    `echo "addr $(ip -4 -o addr show eth0 | awk '{print $4}')"`,
  ].join('; ');
  const r = await boot(['--network', 'nat', '--', 'sh', '-c', script]);
  close();
  t.is(r.code, 0, r.stdout + r.stderr);
  t.regex(r.stdout, new RegExp(`^token ${token}\\r?$`, 'm'), r.stdout);
  t.regex(r.stdout, new RegExp(`^blob ${sha256(blob)} `, 'm'), r.stdout);
  const up = /^up ([0-9a-f]{64}) /m.exec(r.stdout)?.[1];
  t.truthy(up, r.stdout);
  t.deepEqual(uploads, [up], 'the host received exactly what the guest sent');
  t.regex(r.stdout, new RegExp(`^reply uploaded ${MIB} ${up}\\r?$`, 'm'), r.stdout);
  // A locally administered unicast address (Net::stableMac), and slirp's guest address.
  t.regex(r.stdout, /^mac 02(:[0-9a-f]{2}){5}\r?$/m, r.stdout);
  t.regex(r.stdout, /^addr 10\.0\.2\.15\/24\r?$/m, r.stdout);
});

test.serial('--publish HOSTPORT:GUESTPORT reaches a server in the guest: a guest-only token and 1 MiB back', async (t) => {
  await requireKernel();
  const hostPort = await freePort();
  const token = `guest-token-${randomBytes(8).toString('hex')}`;
  // The guest's server: reads one line from the host, answers with the token and that line, then
  // sends 1 MiB it made and hashed itself, and waits for the host to say it has it all: without
  // that wait the VM powers off while the guest kernel still holds unsent bytes of a socket it
  // closed (as a real machine would lose them). nc serves one connection and exits, and so does
  // the VM.
  const script = [
    `head -c ${MIB} /dev/urandom > /tmp/blob`,
    `sha256sum /tmp/blob | sed 's/^/blob /'`,
    `printf '#!/bin/sh\\nread line\\necho "${token} $line"\\ncat /tmp/blob\\nread ack\\n' > /tmp/serve && chmod +x /tmp/serve`,
    'nc -l -p 7000 -e /tmp/serve',
    'echo served',
  ].join('; ');
  const vm = startSkiff(['boot', '--engine', 'qemu', '--timeout', '120', '--publish', `${hostPort}:7000`, '--', 'sh', '-c', script]);
  // publishedExchange connects again until the guest listens, and acks the whole reply.
  const got = await publishedExchange(hostPort, 'hello-from-host\n', MIB, vm.ended);
  const { code, stdout, stderr } = await vm.result;
  t.is(code, 0, stdout + stderr);
  const nl = got.indexOf('\n');
  t.is(got.subarray(0, nl).toString(), `${token} hello-from-host`, stdout + stderr);
  const fromGuest = got.subarray(nl + 1);
  t.is(fromGuest.length, MIB);
  t.regex(stdout, new RegExp(`^blob ${sha256(fromGuest)} `, 'm'), stdout);
  t.regex(stdout, /^served\r?$/m, stdout);
});

/** A loopback UDP port nobody has bound right now. */
async function freeUdpPort(): Promise<number> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => s.bind(0, '127.0.0.1', resolve));
  const port = s.address().port;
  await new Promise<void>((resolve) => s.close(resolve));
  return port;
}

/** What vsock-tool udp-echo answers to `msg`: "echo: " and `msg` with its ASCII letters upper-cased. */
function udpEchoOf(msg: Buffer): Buffer {
  return Buffer.concat([Buffer.from('echo: '), Buffer.from(msg.map((b) => (b >= 0x61 && b <= 0x7a ? b - 0x20 : b)))]);
}

test.serial('--publish HOSTPORT:GUESTPORT/udp reaches a UDP server in the guest: datagrams up to 32 KiB come back changed by the guest', async (t) => {
  await requireKernel();
  const hostPort = await freeUdpPort();
  // Each datagram ends with " #i", which upper-casing leaves alone, so the host can tell which one
  // an answer is for even when the answer is wrong. One carries random bytes (every byte value).
  const tail = (i: number) => Buffer.from(` #${i}`);
  const messages = [
    Buffer.from('hello-from-host #0'),
    Buffer.concat([Buffer.from(`mixed-Case ${randomBytes(600).toString('hex')}`), tail(1)]),
    Buffer.concat([randomBytes(4093), tail(2)]),
    Buffer.concat([Buffer.from(randomBytes(16384).toString('hex')), tail(3)]),
  ];
  // udp-echo exits after messages.length + 1 different datagrams: the last is "bye", which the
  // host sends only once it has every answer, so the guest never powers off before its last
  // answer that counts is out.
  const script = `vsock-tool udp-echo 7001 ${messages.length + 1} && echo served`;
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-net-udp-'));
  const sock = dgram.createSocket('udp4');
  sock.on('error', () => {});
  let vm: ReturnType<typeof startSkiff> | undefined;
  const answers = new Map<number, Buffer>();
  const strays: Buffer[] = [];
  let result: Awaited<ReturnType<typeof startSkiff>['result']>;
  try {
    const image = await defaultImage();
    const initrd = await initrdWithVsockTool(scratch, image.initrd!, script);
    const running = startSkiff(['boot', '--engine', 'qemu', '--timeout', '120', '--initrd', initrd, '--publish', `${hostPort}:7001/udp`, '--', 'sh', '/bin/check']);
    vm = running;
    await new Promise<void>((resolve) => sock.bind(0, '127.0.0.1', resolve));
    const bye = Buffer.from('bye');
    sock.on('message', (d: Buffer, from: dgram.RemoteInfo) => {
      if (d.equals(udpEchoOf(bye))) return;
      const i = messages.findIndex((m, k) => d.subarray(d.length - tail(k).length).equals(tail(k)));
      if (i < 0 || from.port !== hostPort) strays.push(d);
      else if (!answers.has(i)) answers.set(i, d);
    });
    const send = (b: Buffer) => new Promise<void>((resolve) => sock.send(b, hostPort, '127.0.0.1', () => resolve()));
    // Until the guest's server is up, slirp hands the datagrams to a guest that drops them: send
    // whatever has no answer yet again every 200 ms.
    while (!running.ended() && answers.size < messages.length) {
      for (const [i, m] of messages.entries()) if (!answers.has(i)) await send(m);
      await new Promise((r) => setTimeout(r, 200));
    }
    while (!running.ended()) {
      await send(bye);
      await new Promise((r) => setTimeout(r, 200));
    }
    result = await running.result;
  } finally {
    if (vm && !vm.ended()) vm.child.kill('SIGKILL');
    sock.close();
    await fs.rm(scratch, { recursive: true, force: true });
  }
  const { code, stdout, stderr } = result;
  t.is(code, 0, stdout + stderr);
  for (const [i, m] of messages.entries()) t.deepEqual(answers.get(i), udpEchoOf(m), `answer to datagram ${i} (${m.length} bytes)`);
  t.deepEqual(strays, [], 'no answer that matches no datagram');
  t.regex(stdout, new RegExp(`^udp-echo answered ${messages.length + 1}\\r?$`, 'm'), stdout);
  t.regex(stdout, /^served\r?$/m, stdout);
});

test.serial('bytes the guest handed to the NAT just before it powered off still reach a slow host reader', async (t) => {
  await requireKernel();
  // The host reads in bursts every 300 ms, so the buffers between the guest and the reader fill
  // up; the guest powers off the moment its kernel holds nothing unacknowledged. Every byte must
  // still arrive: what slirp and the host kernel hold outlives the VM. (Whether slirp itself
  // still holds bytes at that moment is up to timing: this passed with SlirpBackend's drain
  // turned off too, so it is an end-to-end check, not a test of the drain alone.)
  const SIZE = 8 * MIB;
  const received: Buffer[] = [];
  let closed!: () => void;
  const done = new Promise<void>((resolve) => (closed = resolve));
  const server = net.createServer((sock) => {
    sock.pause();
    const burst = setInterval(() => {
      sock.resume();
      setImmediate(() => sock.pause());
    }, 300);
    sock.on('data', (d: Buffer) => received.push(d));
    sock.on('close', () => {
      clearInterval(burst);
      closed();
    });
    sock.on('error', () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  // The guest powers off as soon as nc has read the whole file and the guest kernel has nothing
  // unacknowledged left (tx_queue 0 in /proc/net/tcp): the rest is slirp's to deliver.
  const script = [
    `head -c ${SIZE} /dev/urandom > /tmp/b`,
    `sha256sum /tmp/b | sed 's/^/sent /'`,
    `nc 10.0.2.2 ${port} < /tmp/b & pid=$!`,
    `until [ "$(sed -n 's/^pos:[[:space:]]*//p' /proc/$pid/fdinfo/0 2>/dev/null)" = ${SIZE} ]; do sleep 0.05; done`,
    `while awk 'NR > 1 { split($5, q, ":"); if (q[1] != "00000000") busy = 1 } END { exit !busy }' /proc/net/tcp; do sleep 0.05; done`,
    'echo handed-over',
  ].join('; ');
  const r = await boot(['--network', 'nat', '--', 'sh', '-c', script]);
  await Promise.race([done, new Promise((resolve) => setTimeout(resolve, 30_000))]);
  server.close();
  t.is(r.code, 0, r.stdout + r.stderr);
  t.regex(r.stdout, /^handed-over\r?$/m, r.stdout);
  const got = Buffer.concat(received);
  t.is(got.length, SIZE);
  t.regex(r.stdout, new RegExp(`^sent ${sha256(got)} `, 'm'), r.stdout);
});

// slirp answers 10.0.2.3 by asking the host's own resolver: that needs a name the host can resolve
// through DNS. This machine has no internet, only the package mirrors' names, so the test uses
// the first of these the host resolves, and is skipped (saying so) where it resolves none.
const DNS_CANDIDATES = ['deb.debian.org', 'registry.npmjs.org', 'example.com'];
// ava wants every test declared synchronously: ask the host's resolver (DNS, as slirp will) in a
// child process.
const resolved = JSON.parse(
  execFileSync(process.execPath, ['-e', `
    const dns = require('node:dns');
    (async () => {
      for (const name of ${JSON.stringify(DNS_CANDIDATES)}) {
        const addrs = await dns.promises.resolve4(name).catch(() => []);
        if (addrs.length > 0) return console.log(JSON.stringify({ name, addrs }));
      }
      console.log('{}');
    })();`], { encoding: 'utf8', timeout: 20000 }),
) as { name?: string; addrs?: string[] };
const dnsName = resolved.name;
const dnsAddresses = resolved.addrs ?? [];
(dnsName ? test.serial : test.serial.skip)(`DNS through 10.0.2.3 (${dnsName ?? `skipped: the host resolves none of ${DNS_CANDIDATES.join(', ')}`})`, async (t) => {
  await requireKernel();
  const r = await boot(['--network', 'nat', '--', 'sh', '-c', `cat /etc/resolv.conf; nslookup ${dnsName}`]);
  t.is(r.code, 0, r.stdout + r.stderr);
  t.regex(r.stdout, /^nameserver 10\.0\.2\.3\r?$/m, r.stdout);
  t.regex(r.stdout, /^Server:\s+10\.0\.2\.3\r?$/m, r.stdout);
  const answered = [...r.stdout.matchAll(/^Address: (\d+\.\d+\.\d+\.\d+)\r?$/gm)].map((m) => m[1]);
  t.true(answered.length > 0 && answered.every((a) => dnsAddresses.includes(a)), `guest: ${answered.join(' ')}; host: ${dnsAddresses.join(' ')}\n${r.stdout}`);
});

test.serial('a --publish host port that is taken: one-line error, exit 125, on both engines', async (t) => {
  const holder = net.createServer();
  await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
  const port = (holder.address() as net.AddressInfo).port;
  try {
    for (const engine of ['qemu', 'native']) {
      const r = await skiff(['boot', '--engine', engine, '--publish', `${port}:80`, '--', 'true']);
      t.is(r.code, 125, `${engine}: ${r.stdout}${r.stderr}`);
      t.is(r.stderr.trim().split('\n').length, 1, `${engine}: ${r.stderr}`);
      t.regex(r.stderr.trim(), new RegExp(`^skiff: .*--publish ${port}:80: cannot listen on 127\\.0\\.0\\.1:${port} \\(Address already in use\\)$`), `${engine}: ${r.stderr}`);
    }
  } finally {
    holder.close();
  }
});

test.serial('--network none: the guest has no eth0; nat: it has one', async (t) => {
  await requireKernel();
  const none = await boot(['--network', 'none', '--', 'ls', '/sys/class/net']);
  t.is(none.code, 0, none.stdout + none.stderr);
  t.regex(none.stdout, /\blo\b/, none.stdout);
  t.notRegex(none.stdout, /\beth0\b/, none.stdout);
  const nat = await boot(['--network', 'nat', '--', 'ls', '/sys/class/net']);
  t.is(nat.code, 0, nat.stdout + nat.stderr);
  t.regex(nat.stdout, /\beth0\b/, nat.stdout);
});

// ---- the native engine, with the ring-3 test guest ----

const guestSays = (stdout: string) => stdout.split(/\r?\n/).filter((l) => l.startsWith('guest: ')).map((l) => l.slice(7));
const nativeBoot = (testName: string, extra: string[]) => skiff(['boot', '--engine', 'native', '--kernel', GUEST, '--memory', '32', '--timeout', '60', '--cmdline', `skiff.test=${testName}`, ...extra]);

test.serial('native: with --network nat the NIC is on the slot after rng and vsock, and the others still work', async (t) => {
  if (!existsSync('/dev/kvm') || !existsSync(GUEST)) return t.fail('needs /dev/kvm and test/guests/out (npm run build:guests)');
  const r = await nativeBoot('virtio-rng', ['--network', 'nat']);
  t.is(r.code, 0, r.stdout + r.stderr);
  const lines = guestSays(r.stdout);
  t.true(lines.includes('virtio devices=3'), r.stdout);
  // rng at slot 0, vsock at 1, net at 2 (0xd0000400, IO-APIC pin 18).
  t.true(lines.some((l) => l.startsWith('virtio-rng read=64+64 nonzero=1 differ=1')), r.stdout);
  t.true(lines.includes('virtio ok'), r.stdout);
  t.true(lines.some((l) => l.startsWith('virtio irqs slot=0xd0000400 ')), r.stdout);
  const without = await nativeBoot('virtio-rng', []);
  t.true(guestSays(without.stdout).includes('virtio devices=2'), without.stdout);
});

test.serial('native: a hostile guest fails the NIC like any other device; the VMM stays up', async (t) => {
  if (!existsSync('/dev/kvm') || !existsSync(GUEST)) return t.fail('needs /dev/kvm and test/guests/out (npm run build:guests)');
  const r = await nativeBoot('virtio-hostile', ['--publish', `${await freePort()}:80`]);
  t.is(r.code, 0, r.stdout + r.stderr);
  const lines = guestSays(r.stdout);
  t.true(lines.some((l) => /^virtio-hostile devices=3 failed=[1-3]$/.test(l)), r.stdout);
  t.true(lines.includes('virtio-hostile rng-after-reset=ok'), r.stdout);
  // At most one line per device; any line about the NIC names its slot.
  const failed = r.stderr.split('\n').filter((l) => /^skiff: virtio-mmio at 0x[0-9a-f]+: .*device failed/.test(l));
  const slots = failed.map((l) => l.split(':')[1]);
  t.is(new Set(slots).size, slots.length, r.stderr);
});

test.serial('native: a NIC takes a virtio-mmio slot, so 6 disks fit without a network and not with one', async (t) => {
  if (!existsSync(GUEST)) return t.fail('needs test/guests/out (npm run build:guests)');
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-net-disks-'));
  try {
    const disks = [];
    for (let i = 0; i < 6; i++) {
      const file = path.join(dir, `d${i}.img`);
      await fs.writeFile(file, Buffer.alloc(4096));
      disks.push({ path: file });
    }
    const config = await makeVmConfig({ kernel: GUEST, disks, network: 'nat', publish: [{ hostPort: await freePort(), guestPort: 80, protocol: 'tcp' }] });
    await t.throwsAsync(startNative(config), {
      message: 'the native engine takes at most 5 disks with --network nat (8 virtio-mmio slots, one each for rng, vsock and net), got 6',
    });
    // Without a network the same six fit: the guest finds rng, six disks and vsock.
    const r = await skiff(['boot', '--engine', 'native', '--kernel', GUEST, '--memory', '32', '--timeout', '60', '--cmdline', 'skiff.test=virtio-rng', ...disks.flatMap((d) => ['--disk', d.path])]);
    t.is(r.code, 0, r.stdout + r.stderr);
    t.true(guestSays(r.stdout).includes('virtio devices=8'), r.stdout);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
