// Malformed kernels handed straight to the native addon, past the TypeScript validation: the C++
// loaders must refuse each with its own one-line error, and never crash or hang the process.
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { packageRoot } from '../src/paths.js';
import { loadAddon, type NativeResult } from '../src/vm/addon.js';

const GUEST = path.join(packageRoot(), 'test', 'guests', 'out', 'skiff-test-guest.elf');
let dir: string;

test.before(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-hostile-'));
});

/** Boots `bytes` as the kernel on the native engine; a guest that keeps running is killed after `killAfterMs`. */
async function boot(bytes: Uint8Array, killAfterMs = 2000): Promise<NativeResult> {
  const file = path.join(dir, `k-${randomBytes(4).toString('hex')}`);
  await fs.writeFile(file, bytes);
  const machine = new (loadAddon().Machine)({ kernel: file, cmdline: 'skiff.test=exit=0', cpus: 1, memoryMiB: 32 });
  const timer = setTimeout(() => machine.kill(), killAfterMs);
  const result = await machine.start(() => {});
  clearTimeout(timer);
  await fs.rm(file);
  return result;
}

function bzImageHeader(patch: (b: Buffer) => void): Buffer {
  const b = Buffer.alloc(4096);
  b[0x1f1] = 1; // setup_sects
  b.writeUInt16LE(0xaa55, 0x1fe);
  b[0x200] = 0xeb;
  b[0x201] = 0x66; // header ends at 0x268
  b.write('HdrS', 0x202, 'latin1');
  b.writeUInt16LE(0x020f, 0x206);
  b[0x236] = 1; // XLF_KERNEL_64
  patch(b);
  return b;
}

const cases: [string, () => Promise<Buffer>, RegExp][] = [
  ['an empty file', async () => Buffer.alloc(0), /^kernel is not a bzImage/],
  ['random bytes', async () => randomBytes(8192), /^kernel is not a bzImage/],
  ['an ELF cut inside its header', async () => (await fs.readFile(GUEST)).subarray(0, 40), /^kernel is not an ELF file|^kernel ELF/],
  ['a 32-bit ELF', async () => {
    const b = Buffer.from(await fs.readFile(GUEST));
    b[4] = 1;
    return b;
  }, /^kernel is not a little-endian ELF64 file$/],
  ['program headers past the end', async () => {
    const b = Buffer.from(await fs.readFile(GUEST));
    b.writeBigUInt64LE(BigInt(b.length - 8), 32);
    return b;
  }, /^kernel ELF program headers lie outside the file$/],
  ['a segment offset past the end', async () => {
    const b = Buffer.from(await fs.readFile(GUEST));
    const phoff = Number(b.readBigUInt64LE(32));
    b.writeBigUInt64LE(0xffff_ffff_ffff_f000n, phoff + 8);
    return b;
  }, /^kernel ELF segment 0 lies outside the file$/],
  ['a segment loaded beyond guest memory', async () => {
    const b = Buffer.from(await fs.readFile(GUEST));
    const phoff = Number(b.readBigUInt64LE(32));
    b.writeBigUInt64LE(0x7fff_0000_0000n, phoff + 24); // p_paddr of the first segment
    return b;
  }, /^kernel segment at 0x7fff00000000 \(\d+ KiB\) does not fit in guest memory; give more memory$/],
  ['an ELF without a PVH note', async () => {
    const b = Buffer.from(await fs.readFile(GUEST));
    const idx = b.indexOf(Buffer.from('Xen\0'));
    b.write('Nex\0', idx, 'latin1');
    return b;
  }, /^kernel ELF has no PVH entry note/],
  ['a bzImage of boot protocol 2.10', async () => bzImageHeader((b) => b.writeUInt16LE(0x020a, 0x206)), /^bzImage boot protocol 2\.10 is older than 2\.12: no 64-bit entry$/],
  ['a bzImage without a 64-bit entry', async () => bzImageHeader((b) => (b[0x236] = 0)), /^bzImage has no 64-bit entry point/],
  ['a bzImage whose setup is the whole file', async () => bzImageHeader((b) => (b[0x1f1] = 255)), /^bzImage setup \(131072 bytes\) is not followed by a kernel$/],
  ['a bzImage asking for more memory than the VM has', async () => bzImageHeader((b) => b.writeUInt32LE(0x7000_0000, 0x260)), /^bzImage needs \d+ KiB at 1 MiB: it does not fit in guest memory; give more memory$/],
];

for (const [name, make, expected] of cases) {
  test(`native loader refuses ${name}`, async (t) => {
    const r = await boot(await make());
    t.is(r.kind, 'error');
    t.regex(r.detail, expected);
    t.false(r.detail.includes('\n'), 'one line');
  });
}

test('200 random mutations of a guest\'s headers never crash the process', async (t) => {
  const original = await fs.readFile(GUEST);
  const phoff = Number(original.readBigUInt64LE(32));
  const headerBytes = phoff + 56 * original.readUInt16LE(56);
  const kinds = new Set<string>();
  for (let i = 0; i < 200; i++) {
    const b = Buffer.from(original);
    for (let j = 0; j < 1 + (i % 4); j++) b[Math.floor(Math.random() * headerBytes)] = Math.floor(Math.random() * 256);
    const r = await boot(b, 1000);
    t.true(['exited', 'error', 'killed', 'shutdown', 'reset'].includes(r.kind), r.kind);
    kinds.add(r.kind);
  }
  t.log(`endings seen: ${[...kinds].join(', ')}`);
});
