// skiff's virtio devices served over vhost-user to a QEMU guest (TCG here), through the library:
// 1. what the devices add to boot: guest instructions to skiff-init's ready marker (icount) with
//    skiff's rng + vsock + one disk against none, and the host cost of serving them
//    (DeviceServer create → sockets bound → close);
// 2. host CPU of the device thread per GiB moved: guest reads and writes through virtio-blk, and
//    streams through virtio-vsock both ways; an idle boot's device CPU is subtracted;
// 3. sequential throughput the guest sees on the disk (busybox dd) against host dd on the same
//    file (both from the host page cache).
// Usage: node dist/bench/devices.js [--runs N] [--mib N] [--vsock-mib N] [--image DIR]
//   --image: an image directory to boot instead of the default image (e.g. while the kernel rebuilds)
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
import { median } from './measure.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const GiB = 2 ** 30;

const { values } = parseArgs({ options: { runs: { type: 'string', default: '3' }, mib: { type: 'string', default: '256' }, 'vsock-mib': { type: 'string', default: '128' }, image: { type: 'string' } } });
const runs = Number(values.runs);
const mib = Number(values.mib);
const vsockMiB = Number(values['vsock-mib']);

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

async function initrdWithTool(scratch: string, base: string): Promise<string> {
  const src = path.join(scratch, 'vsock-bench.c');
  const bin = path.join(scratch, 'vsock-bench');
  await fs.writeFile(src, TOOL);
  await execFileP('gcc', ['-static', '-O2', src, '-o', bin]);
  const cpio = new CpioWriter();
  cpio.file('bin/vsock-bench', await fs.readFile(bin), { mode: 0o755 });
  await cpio.writeTo(path.join(scratch, 'extra.cpio'));
  const out = path.join(scratch, 'initrd.cpio');
  await fs.writeFile(out, Buffer.concat([await fs.readFile(base), await fs.readFile(path.join(scratch, 'extra.cpio'))]));
  return out;
}

interface Run {
  out: string;
  deviceCpu: number;
  wallMs: number;
}

async function boot(config: VmConfig, during?: (m: QemuMachine) => Promise<void>): Promise<Run> {
  const start = performance.now();
  const machine = await startQemu(config, { accel: 'tcg' });
  let out = '';
  machine.output.on('data', (d: Buffer) => (out += d.toString()));
  const side = during ? during(machine) : Promise.resolve();
  const exit = await machine.wait();
  await side;
  if (exit.kind !== 'exited' || exit.status !== 0) throw new Error(`guest: ${JSON.stringify(exit)}\n${out.slice(-2000)}`);
  return { out, deviceCpu: machine.deviceCpuSeconds(), wallMs: performance.now() - start };
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

async function main(): Promise<void> {
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-bench-devices-'));
  try {
    const image = values.image ? await openImage(values.image) : await defaultImage();
    const initrd = await initrdWithTool(scratch, image.initrd!);
    const disk = path.join(scratch, 'disk.img');
    // Real bytes (not holes) so both sides read data from the host page cache.
    const chunk = Buffer.alloc(MiB, 0x5a);
    const fh = await fs.open(disk, 'w');
    for (let i = 0; i < mib; i++) await fh.write(chunk, 0, MiB, i * MiB);
    await fh.close();
    const cfg = (command: string, disks = true, memoryMiB = 512) =>
      makeVmConfig({ kernel: image.kernel, initrd, cmdline: image.cmdline, memoryMiB, timeoutSec: 600, disks: disks ? [{ path: disk }] : [], command: ['sh', '-c', command] });

    // 1. boot cost
    const withDev: number[] = [];
    const without: number[] = [];
    const setupMs: number[] = [];
    const closeMs: number[] = [];
    const plain = await cfg('true', true, 256);
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

    // 2 + 3. blk and vsock
    const idle = await boot(await cfg('true'));
    const read = await boot(await cfg(timed('rd', `dd if=/dev/vda of=/dev/null bs=1M count=${mib}`)));
    const write = await boot(await cfg(timed('wr', `dd if=/dev/zero of=/dev/vda bs=1M count=${mib} conv=fsync`)));
    const vsockBytes = vsockMiB * MiB;
    let hostGot = 0;
    const g2h = await boot(await cfg(`vsock-bench source 2 7000 ${vsockBytes}`, false), async (m) => {
      await new Promise<void>((resolve) => {
        const server = net.createServer((c) => {
          c.on('data', (d: Buffer) => (hostGot += d.length));
          c.on('end', () => {
            c.end();
            server.close();
            resolve();
          });
        });
        server.listen(path.join(m.vmDir, 'vsock_7000'));
      });
    });
    const h2g = await boot(await cfg('vsock-bench sink 7001', false), async (m) => {
      for (;;) {
        const ok = await new Promise<boolean>((resolve) => {
          const s = net.connect(m.vsockPath);
          let said = '';
          s.on('connect', () => s.write('CONNECT 7001\n'));
          s.on('data', (d: Buffer) => {
            said += d.toString();
            if (said === 'OK 7001\n') {
              const block = Buffer.alloc(MiB, 0x78);
              let left = vsockMiB;
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
    });
    const received = Number(/received (\d+)/.exec(h2g.out)?.[1] ?? -1);
    if (hostGot !== vsockBytes || received !== vsockBytes) throw new Error(`vsock moved ${hostGot} and ${received} bytes, expected ${vsockBytes}`);
    const perGiB = (r: Run, bytes: number) => ((r.deviceCpu - idle.deviceCpu) / (bytes / GiB)) * 1000;
    console.log(`\n## host CPU of the device thread per GiB (idle boot's ${(idle.deviceCpu * 1000).toFixed(1)} ms subtracted)`);
    console.log(`| virtio-blk, guest reads ${mib} MiB | ${perGiB(read, mib * MiB).toFixed(0)} ms/GiB |`);
    console.log(`| virtio-blk, guest writes ${mib} MiB + fsync | ${perGiB(write, mib * MiB).toFixed(0)} ms/GiB |`);
    console.log(`| virtio-vsock, guest → host ${vsockMiB} MiB | ${perGiB(g2h, vsockBytes).toFixed(0)} ms/GiB |`);
    console.log(`| virtio-vsock, host → guest ${vsockMiB} MiB | ${perGiB(h2g, vsockBytes).toFixed(0)} ms/GiB |`);

    const hostRead = await execFileP('dd', [`if=${disk}`, 'of=/dev/null', 'bs=1M']);
    const hostRate = /([0-9.]+) s, ([0-9.]+ [MG]B\/s)/.exec(hostRead.stderr);
    console.log(`\n## sequential throughput, ${mib} MiB, 1 MiB blocks`);
    console.log(`| guest dd read of /dev/vda (TCG) | ${ddRate(read.out, 'rd').toFixed(0)} MB/s |`);
    console.log(`| guest dd write to /dev/vda + fsync (TCG) | ${ddRate(write.out, 'wr').toFixed(0)} MB/s |`);
    console.log(`| host dd read of the same file | ${hostRate?.[2] ?? hostRead.stderr.trim()} |`);
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
