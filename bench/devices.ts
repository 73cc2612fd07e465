// skiff's virtio devices served over vhost-user to a QEMU guest (TCG here), through the library:
// 1. boot: what the devices add to boot, guest instructions to skiff-init's ready marker (icount)
//    with skiff's rng + vsock + one disk against none, and the host cost of serving them
//    (DeviceServer create → sockets bound → close);
// 2. cpu: host CPU of the device thread per GiB moved (an idle boot's device CPU subtracted):
//    guest reads and writes through virtio-blk (buffered and O_DIRECT), streams through
//    virtio-vsock both ways, and, with --network, through virtio-net + libslirp both ways. Each
//    workload is one boot; the workloads are interleaved `--runs` times and medians reported;
// 3. dd: sequential throughput the guest sees on the disk (busybox dd, timed by the guest's
//    clock, from the same boots) against host dd on the same file, buffered and O_DIRECT.
// Under TCG the guest's figures are bounded by emulation of the guest's own code; the device
// thread's CPU per GiB is what the devices cost.
// 4. micro: the device models alone, over fake guest memory (see --only below).
// Usage: node dist/bench/devices.js [--runs N] [--mib N] [--vsock-mib N] [--net-mib N] [--micro-gib N]
//          [--only boot,cpu,net,micro] [--workload TEXT] [--image DIR]
//   --image: an image directory to boot instead of the default image (e.g. while the kernel rebuilds)
//   --only:  the parts to run (default boot,cpu,micro; net: virtio-net + slirp, slow under TCG)
//   micro: the device models alone (hypervisor/devices/virtio/test/device-bench.cc, built -O2): a
//          fake driver in the device's thread keeps the queues full, --micro-gib GiB each way; no
//          VM, no transport, no wake-ups, no first touch of guest pages
//   --workload TEXT: only the cpu/net workloads whose label contains TEXT (e.g. "host → guest")
import { execFile, spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { defaultImage } from '../src/image/default.js';
import { openImage } from '../src/image/open.js';
import { CpioWriter } from '../src/initrd/cpio.js';
import { loadAddon } from '../src/vm/addon.js';
import { makeVmConfig, type VmConfig } from '../src/vm/config.js';
import { qemuArgs, QEMU_BINARY, startQemu, type QemuMachine } from '../src/vm/qemu.js';
import { packageRoot } from '../src/paths.js';
import { median } from './measure.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const GiB = 2 ** 30;

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    mib: { type: 'string', default: '256' },
    'vsock-mib': { type: 'string', default: '128' },
    'net-mib': { type: 'string', default: '128' },
    'micro-gib': { type: 'string', default: '1' },
    only: { type: 'string', default: 'boot,cpu,micro' },
    workload: { type: 'string', default: '' },
    image: { type: 'string' },
  },
});
const runs = Number(values.runs);
const mib = Number(values.mib);
const vsockMiB = Number(values['vsock-mib']);
const netMiB = Number(values['net-mib']);
const parts = new Set(values.only.split(','));

const TOOL = String.raw`
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
/* sink PORT: count one connection's bytes.  source CID PORT BYTES: send BYTES, then close. */
int main(int argc, char **argv) {
  static char buf[65536];
  struct sockaddr_vm a = {.svm_family = AF_VSOCK};
  int s = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (s < 0 || argc < 3) return 2;
  if (!strcmp(argv[1], "sink")) {
    a.svm_cid = VMADDR_CID_ANY;
    a.svm_port = (unsigned)atoi(argv[2]);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) return 3;
    printf("sink-listening\n");
    fflush(stdout);
    int c = accept(s, NULL, NULL);
    unsigned long long total = 0;
    ssize_t n;
    while ((n = read(c, buf, sizeof buf)) > 0) total += (unsigned long long)n;
    printf("received %llu\n", total);
    return 0;
  }
  a.svm_cid = (unsigned)atoi(argv[2]);
  a.svm_port = (unsigned)atoi(argv[3]);
  for (int i = 0; connect(s, (struct sockaddr *)&a, sizeof a) != 0; i++) {
    if (i == 100) return 4;
    close(s);
    usleep(100000);
    s = socket(AF_VSOCK, SOCK_STREAM, 0);
  }
  unsigned long long left = strtoull(argv[4], NULL, 10);
  memset(buf, 'x', sizeof buf);
  while (left > 0) {
    size_t n = left < sizeof buf ? left : sizeof buf;
    ssize_t w = write(s, buf, n);
    if (w <= 0) return 5;
    left -= (unsigned long long)w;
  }
  close(s);
  printf("sent\n");
  return 0;
}
`;

const FLOOR = String.raw`
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
/* The host's own floor for what skiff's devices do per byte, each in one thread whose CPU clock is
 * read: "unix BYTES": a Unix stream socket between two threads, the sender writing 64 KiB
 * (vsock guest -> host sends one packet per sendmsg), the receiver reading into 64 buffers of 3732
 * bytes (vsock host -> guest, Linux's rx buffers); "file PATH": pread then pwrite of the whole file
 * in 1 MiB blocks into one reused buffer (virtio-blk's preadv/pwritev on the image). */
static double cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}
static int sv[2];
static unsigned long long total;
static double sendCpu;
static void *sender(void *arg) {
  (void)arg;
  static char buf[65536];
  memset(buf, 'x', sizeof buf);
  double t0 = cpu();
  for (unsigned long long left = total; left > 0;) {
    size_t n = left < sizeof buf ? left : sizeof buf;
    ssize_t w = write(sv[0], buf, n);
    if (w <= 0) exit(5);
    left -= (unsigned long long)w;
  }
  sendCpu = cpu() - t0;
  close(sv[0]);
  return NULL;
}
int main(int argc, char **argv) {
  if (argc < 3) return 2;
  const double gib = 1024.0 * 1024 * 1024;
  if (!strcmp(argv[1], "unix")) {
    total = strtoull(argv[2], NULL, 10);
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return 3;
    pthread_t t;
    pthread_create(&t, NULL, sender, NULL);
    static char bufs[64][3732];
    struct iovec iov[64];
    for (int i = 0; i < 64; i++) iov[i] = (struct iovec){bufs[i], sizeof bufs[i]};
    double t0 = cpu();
    unsigned long long got = 0;
    ssize_t n;
    while ((n = readv(sv[1], iov, 64)) > 0) got += (unsigned long long)n;
    double recvCpu = cpu() - t0;
    pthread_join(t, NULL);
    if (got != total) return 4;
    printf("unix-send %.0f unix-recv %.0f\n", sendCpu / (total / gib) * 1000, recvCpu / (total / gib) * 1000);
    return 0;
  }
  int fd = open(argv[2], O_RDWR);
  if (fd < 0) return 3;
  off_t size = lseek(fd, 0, SEEK_END);
  static char buf[1 << 20];
  double t0 = cpu();
  for (off_t at = 0; at < size; at += sizeof buf)
    if (pread(fd, buf, sizeof buf, at) <= 0) return 4;
  double readCpu = cpu() - t0;
  t0 = cpu();
  for (off_t at = 0; at < size; at += sizeof buf)
    if (pwrite(fd, buf, sizeof buf, at) <= 0) return 5;
  double writeCpu = cpu() - t0;
  printf("file-read %.0f file-write %.0f\n", readCpu / (size / gib) * 1000, writeCpu / (size / gib) * 1000);
  return 0;
}
`;

async function initrdWithTool(scratch: string, base: string): Promise<string> {
  const src = path.join(scratch, 'vsock-bench.c');
  const bin = path.join(scratch, 'vsock-bench');
  await fs.writeFile(src, TOOL);
  await execFileP('gcc', ['-static', '-O2', src, '-o', bin]);
  // The tests' guest tool: its tcp-send/tcp-recv modes are the net workloads' guest side.
  const tool = path.join(scratch, 'vsock-tool');
  await execFileP('gcc', ['-static', '-O2', '-Wall', '-Werror', path.join(packageRoot(), 'test', 'guests', 'vsock-tool.c'), '-o', tool]);
  const cpio = new CpioWriter();
  cpio.file('bin/vsock-bench', await fs.readFile(bin), { mode: 0o755 });
  cpio.file('bin/vsock-tool', await fs.readFile(tool), { mode: 0o755 });
  await cpio.writeTo(path.join(scratch, 'extra.cpio'));
  const out = path.join(scratch, 'initrd.cpio');
  await fs.writeFile(out, Buffer.concat([await fs.readFile(base), await fs.readFile(path.join(scratch, 'extra.cpio'))]));
  return out;
}

interface Run {
  out: string;
  /** Device-thread CPU seconds of the whole boot, and between the guest's GO and DONE markers. */
  deviceCpu: number;
  windowCpu: number;
  wallMs: number;
}

const GO = 'bench-go';
const DONE = 'bench-done';

/** The guest command between two console markers, so the host can read the device thread's CPU
 *  clock around the transfer alone (boot, and the teardown of guest memory, fall outside). */
function marked(command: string): string {
  return `echo ${GO}; ${command}; echo ${DONE}`;
}

async function boot(config: VmConfig, during?: (m: QemuMachine) => Promise<void>): Promise<Run> {
  const start = performance.now();
  const machine = await startQemu(config, { accel: 'tcg' });
  let out = '';
  let atGo: number | undefined;
  let atDone: number | undefined;
  machine.output.on('data', (d: Buffer) => {
    out += d.toString();
    if (atGo === undefined && /bench-go\r?\n/.test(out)) atGo = machine.deviceCpuSeconds();
    if (atDone === undefined && /bench-done\r?\n/.test(out)) atDone = machine.deviceCpuSeconds();
  });
  const side = during ? during(machine) : Promise.resolve();
  const exit = await machine.wait();
  await side;
  if (exit.kind !== 'exited' || exit.status !== 0) throw new Error(`guest: ${JSON.stringify(exit)}\n${out.slice(-2000)}`);
  const deviceCpu = machine.deviceCpuSeconds();
  return { out, deviceCpu, windowCpu: atGo !== undefined && atDone !== undefined ? atDone - atGo : NaN, wallMs: performance.now() - start };
}

/** A guest command timed by the guest's own clock (busybox dd prints no rate): "<tag> <start> <end>". */
function timed(tag: string, command: string): string {
  return `s=$(cut -d' ' -f1 /proc/uptime); ${command}; echo "${tag} $s $(cut -d' ' -f1 /proc/uptime)"`;
}

/** MB/s (10^6 bytes, as dd reports) for `mib` MiB over the guest-timed interval. */
function ddRate(out: string, tag: string): number {
  const m = new RegExp(`${tag} ([0-9.]+) ([0-9.]+)`).exec(out);
  if (!m) throw new Error(`no timing for ${tag}:\n${out.slice(-1500)}`);
  return (mib * MiB) / 1e6 / (Number(m[2]) - Number(m[1]));
}

/** GNU dd on the host: MB/s (10^6 bytes) from its own report. */
async function hostDd(args: string[]): Promise<number> {
  const { stderr } = await execFileP('dd', [...args, 'bs=1M']);
  const m = /(\d+) bytes .* copied, ([0-9.]+) s/.exec(stderr);
  if (!m) throw new Error(`host dd: ${stderr}`);
  return Number(m[1]) / 1e6 / Number(m[2]);
}

/** "median (min–max)" of samples, with `digits` decimals. */
function spread(xs: number[], digits = 0): string {
  return `${median(xs).toFixed(digits)} (${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})`;
}

/** Host → guest: connect to guest port `port` through vsock's host socket and send `bytes`. */
async function vsockSend(m: QemuMachine, port: number, bytes: number): Promise<void> {
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(m.vsockPath);
      let said = '';
      s.on('connect', () => s.write(`CONNECT ${port}\n`));
      s.on('data', (d: Buffer) => {
        said += d.toString();
        if (said === `OK ${port}\n`) {
          const block = Buffer.alloc(MiB, 0x78);
          let left = bytes / MiB;
          const pump = () => {
            while (left > 0) {
              left--;
              if (!s.write(block)) return void s.once('drain', pump);
            }
            s.end(() => resolve(true));
          };
          pump();
        }
      });
      s.on('error', () => resolve(false));
      s.on('close', () => resolve(said.startsWith('OK')));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Guest → host: accept one connection on vsock's host socket for `port` and count its bytes. */
function vsockReceive(m: QemuMachine, port: number, got: (n: number) => void): Promise<void> {
  return new Promise<void>((resolve) => {
    const server = net.createServer((c) => {
      c.on('data', (d: Buffer) => got(d.length));
      c.on('end', () => {
        c.end();
        server.close();
        resolve();
      });
    });
    server.listen(path.join(m.vmDir, `vsock_${port}`));
  });
}

// virtio-net through libslirp: skiff-init gives eth0 10.0.2.15/24; the guest reaches the host's
// loopback at 10.0.2.2 (slirp's gateway). The guest side is vsock-tool's tcp-send/tcp-recv, which
// write and read 256 KiB at a time (busybox nc writes 1 KiB, wget reads 4 KiB: they measured the
// guest's small calls more than the NIC).

/** A loopback TCP server for one connection: it sends `bytes` (1 MiB writes) and closes, or, with
 *  bytes 0, counts what the peer sends until EOF. */
async function tcpPeer(bytes: number): Promise<{ port: number; received: Promise<number>; close: () => void }> {
  let got = 0;
  let done!: (n: number) => void;
  const received = new Promise<number>((r) => (done = r));
  const block = Buffer.alloc(MiB, 0x6e);
  const server = net.createServer((c) => {
    c.on('error', () => done(-1));
    if (bytes > 0) {
      let left = bytes / MiB;
      const pump = () => {
        while (left > 0) {
          left--;
          if (!c.write(block)) return void c.once('drain', pump);
        }
        c.end(() => done(0));
      };
      pump();
      return;
    }
    c.on('data', (d: Buffer) => (got += d.length));
    c.on('end', () => {
      c.end();
      done(got);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, received, close: () => server.close() };
}

async function main(): Promise<void> {
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-bench-devices-'));
  try {
    const image = values.image ? await openImage(values.image) : await defaultImage();
    const initrd = await initrdWithTool(scratch, image.initrd!);
    const disk = path.join(scratch, 'disk.img');
    // Real bytes (not holes) so both sides read data.
    const chunk = Buffer.alloc(MiB, 0x5a);
    const fh = await fs.open(disk, 'w');
    for (let i = 0; i < mib; i++) await fh.write(chunk, 0, MiB, i * MiB);
    await fh.close();
    const cfg = (command: string, opts: { disks?: boolean; memoryMiB?: number; network?: boolean } = {}) =>
      makeVmConfig({
        kernel: image.kernel,
        initrd,
        cmdline: image.cmdline,
        memoryMiB: opts.memoryMiB ?? 512,
        timeoutSec: 600,
        disks: opts.disks === false ? [] : [{ path: disk }],
        network: opts.network ? 'nat' : 'none',
        command: ['sh', '-c', command],
      });

    if (parts.has('boot')) {
      const withDev: number[] = [];
      const without: number[] = [];
      const setupMs: number[] = [];
      const closeMs: number[] = [];
      const plain = await cfg('true', { memoryMiB: 256 });
      const addon = loadAddon();
      for (let i = 0; i < runs; i++) {
        const m = await startQemu(plain, { accel: 'tcg', icount: true });
        withDev.push((await readyTsc(m)) / 1e6);
        const dir = await fs.mkdtemp(path.join(scratch, 'vm-'));
        const t0 = performance.now();
        const server = new addon.DeviceServer({ socketDir: dir, disks: [{ path: disk, readOnly: false, serial: 'x' }], rng: true, vsock: true });
        const t1 = performance.now();
        server.close();
        setupMs.push(t1 - t0);
        closeMs.push(performance.now() - t1);
        without.push((await readyTscWithout(plain, dir)) / 1e6);
      }
      console.log('## what the devices add to boot (rng + vsock + one disk over vhost-user), median of', runs);
      console.log(`| guest instructions to ready, with skiff's devices | ${median(withDev).toFixed(1)} M |`);
      console.log(`| the same guest without them | ${median(without).toFixed(1)} M |`);
      console.log(`| added | ${(median(withDev) - median(without)).toFixed(1)} M instructions (${(((median(withDev) - median(without)) / median(without)) * 100).toFixed(1)}%) |`);
      console.log(`| host: DeviceServer create (open disk, bind 4 sockets, start thread) | ${median(setupMs).toFixed(2)} ms |`);
      console.log(`| host: close (tear down on the device thread, join it) | ${median(closeMs).toFixed(2)} ms |`);
    }

    if (parts.has('micro')) {
      const hv = path.join(packageRoot(), 'hypervisor');
      const virtio = path.join(hv, 'devices', 'virtio');
      const bin = path.join(scratch, 'device-bench');
      await execFileP('g++', ['-std=c++17', '-O2', `-I${hv}`, ...['blk.cc', 'queue.cc', 'vsock.cc', 'test/device-bench.cc'].map((f) => path.join(virtio, f)), '-o', bin, '-lpthread']);
      const micro: Record<string, number[]> = {};
      for (let i = 0; i < runs; i++) {
        const { stdout } = await execFileP(bin, [values['micro-gib']]);
        for (const [, k, v] of stdout.matchAll(/(\S+) (\d+)/g)) (micro[k] ??= []).push(Number(v));
      }
      console.log(`\n## the device models alone (device-bench.cc: fake driver, same thread, ${values['micro-gib']} GiB each), ms/GiB, median (min–max) of ${runs}`);
      console.log('| virtio-blk reads, 1 MiB requests of 256 separate 4 KiB pages, 8 in flight, image in a memfd | ' + spread(micro['blk-read']) + ' |');
      console.log('| virtio-blk writes, the same | ' + spread(micro['blk-write']) + ' |');
      console.log('| virtio-vsock host → guest, 3776-byte rx buffers (Linux 6.1), a thread feeding the host socket | ' + spread(micro['vsock-to-guest']) + ' |');
      console.log('| virtio-vsock guest → host, 64 KiB packets within the credit, a thread draining the host socket | ' + spread(micro['vsock-from-guest']) + ' |');
    }

    if (!parts.has('cpu') && !parts.has('net')) return;
    // Each workload: a label, the bytes it moves, a guest command and what the host does meanwhile.
    interface Workload {
      label: string;
      bytes: number;
      run: () => Promise<Run>;
      samples: Run[];
    }
    const vsockBytes = vsockMiB * MiB;
    const netBytes = netMiB * MiB;
    const workloads: Workload[] = [];
    const add = (label: string, bytes: number, run: () => Promise<Run>) => {
      if (label.includes(values.workload)) workloads.push({ label, bytes, run, samples: [] });
    };
    if (parts.has('cpu')) {
      add(`virtio-blk, guest reads ${mib} MiB (dd bs=1M, page cache: first touch of guest pages)`, mib * MiB, async () =>
        boot(await cfg(marked(timed('rd', `dd if=/dev/vda of=/dev/null bs=1M count=${mib}`)))));
      add(`virtio-blk, guest reads ${mib} MiB again after drop_caches (dd bs=1M, guest pages already mapped by the first pass; whole boot: both passes)`, mib * MiB, async () =>
        boot(await cfg(`dd if=/dev/vda of=/dev/null bs=1M count=${mib} 2>/dev/null; echo 3 > /proc/sys/vm/drop_caches; ${marked(`dd if=/dev/vda of=/dev/null bs=1M count=${mib}`)}`)));
      add(`virtio-blk, guest reads ${mib} MiB (dd bs=1M iflag=direct)`, mib * MiB, async () =>
        boot(await cfg(marked(timed('rdd', `dd if=/dev/vda of=/dev/null bs=1M count=${mib} iflag=direct`)))));
      add(`virtio-blk, guest writes ${mib} MiB + fsync (dd bs=1M)`, mib * MiB, async () =>
        boot(await cfg(marked(timed('wr', `dd if=/dev/zero of=/dev/vda bs=1M count=${mib} conv=fsync`)))));
      add(`virtio-blk, guest writes ${mib} MiB (dd bs=1M oflag=direct)`, mib * MiB, async () =>
        boot(await cfg(marked(timed('wrd', `dd if=/dev/zero of=/dev/vda bs=1M count=${mib} oflag=direct`)))));
      add(`virtio-vsock, guest → host ${vsockMiB} MiB`, vsockBytes, async () => {
        let got = 0;
        const r = await boot(await cfg(marked(`vsock-bench source 2 7000 ${vsockBytes}`), { disks: false }), (m) => vsockReceive(m, 7000, (n) => (got += n)));
        if (got !== vsockBytes) throw new Error(`vsock guest → host moved ${got} bytes, expected ${vsockBytes}`);
        return r;
      });
      add(`virtio-vsock, host → guest ${vsockMiB} MiB`, vsockBytes, async () => {
        const r = await boot(await cfg(marked('vsock-bench sink 7001'), { disks: false }), (m) => vsockSend(m, 7001, vsockBytes));
        const received = Number(/received (\d+)/.exec(r.out)?.[1] ?? -1);
        if (received !== vsockBytes) throw new Error(`vsock host → guest moved ${received} bytes, expected ${vsockBytes}`);
        return r;
      });
    }
    if (parts.has('net')) {
      add(`virtio-net + slirp, guest downloads ${netMiB} MiB (vsock-tool tcp-recv, 256 KiB reads, from a host loopback socket)`, netBytes, async () => {
        const peer = await tcpPeer(netBytes);
        try {
          const r = await boot(await cfg(marked(`vsock-tool tcp-recv 10.0.2.2 ${peer.port}`), { disks: false, network: true }));
          const received = Number(/received (\d+)/.exec(r.out)?.[1] ?? -1);
          if (received !== netBytes) throw new Error(`net download moved ${received} bytes, expected ${netBytes}:\n${r.out.slice(-1500)}`);
          return r;
        } finally {
          peer.close();
        }
      });
      add(`virtio-net + slirp, guest uploads ${netMiB} MiB (vsock-tool tcp-send, 256 KiB writes, to a host loopback socket)`, netBytes, async () => {
        const peer = await tcpPeer(0);
        try {
          const r = await boot(await cfg(marked(`vsock-tool tcp-send 10.0.2.2 ${peer.port} ${netBytes}`), { disks: false, network: true }));
          const got = await peer.received;
          if (got !== netBytes) throw new Error(`net upload moved ${got} bytes, expected ${netBytes}`);
          return r;
        } finally {
          peer.close();
        }
      });
    }
    const idle: number[] = [];
    const rates = new Map<string, number[]>();
    for (let i = 0; i < runs; i++) {
      idle.push((await boot(await cfg('true'))).deviceCpu);
      for (const w of workloads) {
        const r = await w.run();
        w.samples.push(r);
        for (const tag of ['rd', 'rdd', 'wr', 'wrd']) {
          if (new RegExp(`^${tag} [0-9.]+ [0-9.]+`, 'm').test(r.out)) rates.set(tag, [...(rates.get(tag) ?? []), ddRate(r.out, tag)]);
        }
      }
    }
    const idleCpu = median(idle);
    const perGiB = (cpu: number, bytes: number) => (cpu / (bytes / GiB)) * 1000;
    console.log(`\n## host CPU of the device thread per GiB: ms/GiB, median (min–max) of ${runs} interleaved runs`);
    console.log('(transfer: the device thread\'s CPU clock read when the guest printed its start and end markers;');
    console.log(` whole boot: the whole boot's device CPU less an idle boot's, ${(idleCpu * 1000).toFixed(1)} ms median, which also counts freeing guest memory the device thread unmapped last)`);
    if (parts.has('net')) console.log('(virtio-net: the device thread also runs libslirp, so these include slirp\'s TCP/IP stack and its host sockets)');
    console.log('| | transfer | whole boot |');
    for (const w of workloads) {
      console.log(`| ${w.label} | ${spread(w.samples.map((r) => perGiB(r.windowCpu, w.bytes)))} | ${spread(w.samples.map((r) => perGiB(r.deviceCpu - idleCpu, w.bytes)))} |`);
    }

    if (!parts.has('cpu') || values.workload) return;
    // The host's own floor for the same bytes: one kernel copy each, no guest, no device.
    const floorBin = path.join(scratch, 'floor');
    await fs.writeFile(`${floorBin}.c`, FLOOR);
    await execFileP('gcc', ['-O2', '-pthread', `${floorBin}.c`, '-o', floorBin]);
    const floors: Record<string, number[]> = {};
    for (let i = 0; i < runs; i++) {
      for (const mode of [['unix', String(vsockBytes)], ['file', disk]]) {
        const { stdout } = await execFileP(floorBin, mode);
        for (const [, k, v] of stdout.matchAll(/(\S+) (\d+)/g)) (floors[k] ??= []).push(Number(v));
      }
    }
    console.log(`\n## the host's floor: one thread's CPU per GiB for one kernel copy of the same bytes (no guest, no device), ms/GiB, median (min–max) of ${runs}`);
    console.log(`| pread of the disk image (in the page cache), 1 MiB blocks, one reused buffer | ${spread(floors['file-read'])} |`);
    console.log(`| pwrite over the disk image, 1 MiB blocks | ${spread(floors['file-write'])} |`);
    console.log(`| write to a Unix stream socket, 64 KiB at a time (vsock guest → host sends per packet) | ${spread(floors['unix-send'])} |`);
    console.log(`| readv from a Unix stream socket into 64 buffers of 3732 bytes (vsock host → guest) | ${spread(floors['unix-recv'])} |`);
    // Host side: the same file, the same block size; O_DIRECT bypasses the host page cache, which
    // skiff's disk does not (it opens the image without O_DIRECT), so both are shown.
    const host: Record<string, number[]> = { rd: [], rdd: [], wr: [], wrd: [] };
    for (let i = 0; i < runs; i++) {
      await hostDd([`if=${disk}`, 'of=/dev/null']);  // into the page cache (an O_DIRECT write dropped it)
      host.rd.push(await hostDd([`if=${disk}`, 'of=/dev/null']));
      host.rdd.push(await hostDd([`if=${disk}`, 'of=/dev/null', 'iflag=direct']));
      host.wr.push(await hostDd(['if=/dev/zero', `of=${disk}`, `count=${mib}`, 'conv=notrunc,fsync']));
      host.wrd.push(await hostDd(['if=/dev/zero', `of=${disk}`, `count=${mib}`, 'conv=notrunc', 'oflag=direct']));
    }
    const names: Record<string, string> = { rd: 'read, buffered', rdd: 'read, O_DIRECT', wr: 'write + fsync, buffered', wrd: 'write, O_DIRECT' };
    console.log(`\n## sequential throughput of the disk, ${mib} MiB in 1 MiB blocks: MB/s, median (min–max) of ${runs}`);
    console.log('| | guest dd on /dev/vda (TCG) | host dd on the same file | guest / host |');
    for (const tag of ['rd', 'rdd', 'wr', 'wrd']) {
      const g = rates.get(tag) ?? [];
      console.log(`| ${names[tag]} | ${spread(g)} | ${spread(host[tag])} | ${(median(g) / median(host[tag])).toFixed(3)} |`);
    }
  } finally {
    await fs.rm(scratch, { recursive: true, force: true });
  }
}

async function readyTsc(machine: QemuMachine): Promise<number> {
  const ready = await machine.ready;
  await machine.wait();
  if (ready?.tsc === undefined) throw new Error('no ready marker');
  return Number(ready.tsc);
}

/** The same guest under QEMU alone (no vhost-user devices, no memfd backend). */
async function readyTscWithout(config: VmConfig, dir: string): Promise<number> {
  const child = spawn(QEMU_BINARY, qemuArgs(config, path.join(dir, 'status'), { accel: 'tcg', icount: true }), { stdio: ['ignore', 'pipe', 'ignore'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise((r) => child.once('close', r));
  const m = /skiff-init: ready [0-9.]+ (\d+)/.exec(out);
  const tsc = m ? Number(m[1]) : undefined;
  if (tsc === undefined) throw new Error(`no ready marker:\n${out.slice(-500)}`);
  return tsc;
}

await main();
