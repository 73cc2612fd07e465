import test from 'ava';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { DT, ElfError, EM, ET, PT, parseElf, pvhEntry, readElfFile, type ElfFile } from '../src/elf/elf.js';

// ---------------------------------------------------------------------------
// Fixtures: compiled once per run into a temp dir, so the tests exercise what
// the real toolchain produces rather than checked-in blobs that go stale.

const LIBC = '/lib/x86_64-linux-gnu/libc.so.6';
const LS = '/bin/ls';
const ENV = '/usr/bin/env';
const BUSYBOX = '/bin/busybox';
const PVH_ADDR = 0x1000000n;
const HIGH_TEXT = 0xffffffff81000000n;

const dir = mkdtempSync(join(tmpdir(), 'skiff-elf-test-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

const run = (cmd: string, args: string[]): string =>
  execFileSync(cmd, args, { cwd: dir, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });

const HELLO_C = 'int main(void) { return 0; }\n';

// The 8-byte desc mirrors what Linux emits (_ASM_PTR); the 4-byte variant is
// what older kernels and other PVH guests use.
const pvhSource = (descDirective: string, descSize: number, addr: bigint): string => `
	.pushsection .note.Xen, "a", @note
	.balign 4
	.long 4
	.long ${descSize}
	.long 18
	.asciz "Xen"
	.balign 4
	${descDirective} ${'0x' + addr.toString(16)}
	.balign 4
	.popsection
	.text
	.globl _start
_start:
	hlt
`;

interface Fixtures {
  runpath: string;
  rpath: string;
  static: string;
  pvh: string;
  pvhObject: string;
  pvh32: string;
  high: string;
}

function buildFixtures(): Fixtures {
  writeFileSync(join(dir, 'hello.c'), HELLO_C);
  writeFileSync(join(dir, 'pvh.S'), pvhSource('.quad', 8, PVH_ADDR));
  writeFileSync(join(dir, 'pvh32.S'), pvhSource('.long', 4, PVH_ADDR));
  const origin = '-Wl,-rpath,$ORIGIN/../lib:/opt/skiff/lib';
  run('gcc', ['-o', 'runpath', 'hello.c', origin, '-Wl,--enable-new-dtags']);
  run('gcc', ['-o', 'rpath', 'hello.c', origin, '-Wl,--disable-new-dtags']);
  run('gcc', ['-static', '-o', 'static', 'hello.c']);
  run('gcc', ['-c', '-o', 'pvh.o', 'pvh.S']);
  run('ld', ['-z', 'noexecstack', '-o', 'pvh', 'pvh.o']);
  run('gcc', ['-c', '-o', 'pvh32.o', 'pvh32.S']);
  run('ld', ['-z', 'noexecstack', '-o', 'pvh32', 'pvh32.o']);
  // A kernel-like link address above 2^53 catches any lossy Number conversion.
  run('ld', ['-z', 'noexecstack', '-Ttext', '0x' + HIGH_TEXT.toString(16), '-o', 'high', 'pvh.o']);
  const f = (name: string) => join(dir, name);
  return {
    runpath: f('runpath'), rpath: f('rpath'), static: f('static'),
    pvh: f('pvh'), pvhObject: f('pvh.o'), pvh32: f('pvh32'), high: f('high'),
  };
}

const fx = buildFixtures();

function expectElfError(t: import('ava').ExecutionContext, bytes: Uint8Array, message: RegExp): void {
  const err = t.throws(() => parseElf(bytes), { instanceOf: ElfError, message });
  t.is(err?.name, 'ElfError');
}

// ---------------------------------------------------------------------------
// readelf as the reference implementation.

interface ReadelfView {
  type: string;
  entry: bigint;
  phdrs: Array<{ type: string; offset: bigint; vaddr: bigint; paddr: bigint; filesz: bigint; memsz: bigint; flags: number; align: bigint }>;
  interp?: string;
  needed: string[];
  soname?: string;
  rpath?: string;
  runpath?: string;
  notes: Array<{ name: string; size: number }>;
}

const flagBits = (f: string): number => (f.includes('R') ? 4 : 0) | (f.includes('W') ? 2 : 0) | (f.includes('E') ? 1 : 0);

function readelf(path: string): ReadelfView {
  const header = run('readelf', ['-hW', path]);
  const segments = run('readelf', ['-lW', path]);
  const dynamic = run('readelf', ['-dW', path]);
  const notes = run('readelf', ['-nW', path]);
  const phdrRe = /^\s+(\S+)\s+0x([0-9a-f]+) 0x([0-9a-f]+) 0x([0-9a-f]+) 0x([0-9a-f]+) 0x([0-9a-f]+) (.{3}) 0x([0-9a-f]+)$/gm;
  const big = (h: string) => BigInt('0x' + h);
  const tagged = (tag: string) => [...dynamic.matchAll(new RegExp(`\\(${tag}\\)\\s+[^\\[]*\\[(.*)\\]`, 'g'))].map((m) => m[1]);
  return {
    type: /Type:\s+(\S+)/.exec(header)![1],
    entry: big(/Entry point address:\s+0x([0-9a-f]+)/.exec(header)![1]),
    phdrs: [...segments.matchAll(phdrRe)].map((m) => ({
      type: m[1], offset: big(m[2]), vaddr: big(m[3]), paddr: big(m[4]),
      filesz: big(m[5]), memsz: big(m[6]), flags: flagBits(m[7]), align: big(m[8]),
    })),
    interp: /\[Requesting program interpreter: (.*)\]/.exec(segments)?.[1],
    needed: tagged('NEEDED'),
    soname: tagged('SONAME')[0],
    rpath: tagged('RPATH')[0],
    runpath: tagged('RUNPATH')[0],
    notes: [...notes.matchAll(/^  (\S+)\s+0x([0-9a-f]{8})\t/gm)].map((m) => ({ name: m[1], size: parseInt(m[2], 16) })),
  };
}

const READELF_TYPES: Record<string, number> = {
  LOAD: PT.LOAD, DYNAMIC: PT.DYNAMIC, INTERP: PT.INTERP, NOTE: PT.NOTE, PHDR: PT.PHDR, TLS: PT.TLS,
  GNU_EH_FRAME: PT.GNU_EH_FRAME, GNU_STACK: PT.GNU_STACK, GNU_RELRO: PT.GNU_RELRO, GNU_PROPERTY: PT.GNU_PROPERTY,
};
const READELF_ET: Record<string, number> = { EXEC: ET.EXEC, DYN: ET.DYN, REL: ET.REL };

const referenceBinaries = (): string[] =>
  [LS, ENV, LIBC, BUSYBOX, fx.runpath, fx.rpath, fx.static, fx.pvh, fx.high].filter((p) => existsSync(p));

for (const path of referenceBinaries()) {
  test(`matches readelf: ${path.startsWith(dir) ? 'compiled ' + path.slice(dir.length + 1) : path}`, async (t) => {
    const elf = await readElfFile(path);
    const ref = readelf(path);
    t.is(elf.type, READELF_ET[ref.type]);
    t.is(elf.entry, ref.entry);
    t.is(elf.programHeaders.length, ref.phdrs.length);
    elf.programHeaders.forEach((ph, i) => {
      const r = ref.phdrs[i];
      t.is(ph.index, i);
      if (r.type in READELF_TYPES) t.is(ph.type, READELF_TYPES[r.type], `phdr ${i} type`);
      t.deepEqual(
        [ph.offset, ph.vaddr, ph.paddr, ph.filesz, ph.memsz, ph.flags, ph.align],
        [r.offset, r.vaddr, r.paddr, r.filesz, r.memsz, r.flags, r.align],
        `phdr ${i}`,
      );
    });
    t.is(elf.interp, ref.interp);
    t.deepEqual(elf.needed, ref.needed);
    t.is(elf.soname, ref.soname);
    t.deepEqual(elf.rpath, ref.rpath?.split(':') ?? []);
    t.deepEqual(elf.runpath, ref.runpath?.split(':') ?? []);
    t.deepEqual(elf.notes.map((n) => ({ name: n.name, size: n.desc.length })), ref.notes);
  });
}

// ---------------------------------------------------------------------------
// Real binaries: the facts the image builder relies on.

test('dynamic executable: interpreter, libc dependency, x86-64', async (t) => {
  for (const path of [LS, ENV]) {
    const elf = await readElfFile(path);
    t.is(elf.machine, EM.X86_64);
    t.is(elf.interp, '/lib64/ld-linux-x86-64.so.2');
    t.true(elf.needed.includes('libc.so.6'));
    t.is(elf.soname, undefined);
    t.true(elf.notes.some((n) => n.name === 'GNU' && n.type === 3 && n.desc.length === 20), 'has a build-id');
  }
});

test('shared library has its soname', async (t) => {
  const elf = await readElfFile(LIBC);
  t.is(elf.type, ET.DYN);
  t.is(elf.soname, 'libc.so.6');
  t.true(elf.needed.includes('ld-linux-x86-64.so.2'));
});

test('--enable-new-dtags gives RUNPATH, --disable-new-dtags gives RPATH, $ORIGIN kept literally', async (t) => {
  const newTags = await readElfFile(fx.runpath);
  t.deepEqual(newTags.runpath, ['$ORIGIN/../lib', '/opt/skiff/lib']);
  t.deepEqual(newTags.rpath, []);
  const oldTags = await readElfFile(fx.rpath);
  t.deepEqual(oldTags.rpath, ['$ORIGIN/../lib', '/opt/skiff/lib']);
  t.deepEqual(oldTags.runpath, []);
});

test('static binaries have no interpreter and no dependencies', async (t) => {
  const paths = [fx.static, ...(existsSync(BUSYBOX) ? [BUSYBOX] : [])];
  for (const path of paths) {
    const elf = await readElfFile(path);
    t.is(elf.interp, undefined, path);
    t.deepEqual(elf.needed, [], path);
    t.false(elf.programHeaders.some((p) => p.type === PT.DYNAMIC || p.type === PT.INTERP), path);
  }
});

test('PVH entry from a linked image (PT_NOTE, 8-byte desc)', async (t) => {
  const elf = await readElfFile(fx.pvh);
  t.true(elf.programHeaders.some((p) => p.type === PT.NOTE), 'ld put the note in a PT_NOTE');
  t.deepEqual(elf.notes.map((n) => [n.name, n.type]), [['Xen', 18]]);
  t.is(pvhEntry(elf), PVH_ADDR);
});

test('PVH entry with a 4-byte desc', async (t) => {
  t.is(pvhEntry(await readElfFile(fx.pvh32)), PVH_ADDR);
});

test('notes fall back to SHT_NOTE sections when there is no PT_NOTE (relocatable object)', async (t) => {
  const elf = await readElfFile(fx.pvhObject);
  t.is(elf.type, ET.REL);
  t.deepEqual(elf.programHeaders, []);
  t.is(pvhEntry(elf), PVH_ADDR);
});

test('no PVH note means undefined', async (t) => {
  t.is(pvhEntry(await readElfFile(LS)), undefined);
});

test('addresses above 2^53 keep full precision', async (t) => {
  const elf = await readElfFile(fx.high);
  t.is(elf.entry, HIGH_TEXT);
  t.true(elf.programHeaders.some((p) => p.type === PT.LOAD && p.vaddr === HIGH_TEXT));
});

test('works on a Buffer that is a slice of a larger ArrayBuffer', (t) => {
  const raw = readFileSync(fx.pvh);
  const padded = new Uint8Array(raw.length + 13);
  padded.set(raw, 7);
  const elf = parseElf(padded.subarray(7, 7 + raw.length));
  t.is(pvhEntry(elf), PVH_ADDR);
});

test('readElfFile names the path on a missing file', async (t) => {
  const missing = join(dir, 'does-not-exist');
  const err = await t.throwsAsync(readElfFile(missing), { instanceOf: ElfError });
  t.true(err!.message.startsWith(`${missing}: `), err!.message);
  t.is((err!.cause as NodeJS.ErrnoException).code, 'ENOENT');
});

test('readElfFile prefixes parse errors with the path', async (t) => {
  const path = join(dir, 'not-elf.txt');
  writeFileSync(path, 'hello, world\n');
  await t.throwsAsync(readElfFile(path), { instanceOf: ElfError, message: `${path}: not an ELF file (bad magic)` });
});

// ---------------------------------------------------------------------------
// Synthetic files: exact control over the malformations.

interface SynthSegment { type: number; offset: number; vaddr?: number; filesz: number; memsz?: number; align?: number }

const BASE = 0x400000;

/** A 0x400-byte ELF64 with one PT_LOAD covering the whole file, plus `segments`. */
function synth(segments: SynthSegment[], blobs: Array<[number, Uint8Array]> = [], size = 0x400): Uint8Array {
  const bytes = new Uint8Array(size);
  const v = new DataView(bytes.buffer);
  bytes.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1], 0);
  const all: SynthSegment[] = [{ type: PT.LOAD, offset: 0, vaddr: BASE, filesz: size, align: 0x1000 }, ...segments];
  v.setUint16(16, ET.EXEC, true);
  v.setUint16(18, EM.X86_64, true);
  v.setUint32(20, 1, true);
  v.setBigUint64(24, BigInt(BASE + 0x100), true);
  v.setBigUint64(32, 64n, true);
  v.setUint16(52, 64, true);
  v.setUint16(54, 56, true);
  v.setUint16(56, all.length, true);
  all.forEach((s, i) => {
    const at = 64 + i * 56;
    v.setUint32(at, s.type, true);
    v.setUint32(at + 4, PF_R, true);
    v.setBigUint64(at + 8, BigInt(s.offset), true);
    v.setBigUint64(at + 16, BigInt(s.vaddr ?? BASE + s.offset), true);
    v.setBigUint64(at + 24, BigInt(s.vaddr ?? BASE + s.offset), true);
    v.setBigUint64(at + 32, BigInt(s.filesz), true);
    v.setBigUint64(at + 40, BigInt(s.memsz ?? s.filesz), true);
    v.setBigUint64(at + 48, BigInt(s.align ?? 8), true);
  });
  for (const [offset, blob] of blobs) bytes.set(blob, offset);
  return bytes;
}
const PF_R = 4;

const DYN_AT = 0x200;
const STR_AT = 0x300;

function dynBlob(entries: Array<[number, number]>): Uint8Array {
  const out = new Uint8Array((entries.length + 1) * 16);
  const v = new DataView(out.buffer);
  entries.forEach(([tag, val], i) => {
    v.setBigUint64(i * 16, BigInt(tag), true);
    v.setBigUint64(i * 16 + 8, BigInt(val), true);
  });
  return out;
}

const ascii = (s: string) => new TextEncoder().encode(s);

/** Dynamic section at 0x200, string table at 0x300 holding `strings`. */
function synthDynamic(entries: Array<[number, number]>, strings = '\0libfoo.so\0/a:/b\0'): Uint8Array {
  const dyn = dynBlob(entries);
  return synth([{ type: PT.DYNAMIC, offset: DYN_AT, filesz: dyn.length }], [[DYN_AT, dyn], [STR_AT, ascii(strings)]]);
}

test('synthetic dynamic section is read through the PT_LOAD mapping', (t) => {
  const elf = parseElf(synthDynamic([
    [DT.NEEDED, 1], [DT.RPATH, 11], [DT.STRTAB, BASE + STR_AT], [DT.STRSZ, 17], [DT.SONAME, 1],
  ]));
  t.deepEqual(elf.needed, ['libfoo.so']);
  t.deepEqual(elf.rpath, ['/a', '/b']);
  t.is(elf.soname, 'libfoo.so');
});

test('dynamic entries after DT_NULL are ignored', (t) => {
  const dyn = dynBlob([[DT.STRTAB, BASE + STR_AT], [DT.STRSZ, 16], [DT.NEEDED, 1]]);
  const bytes = synth(
    [{ type: PT.DYNAMIC, offset: DYN_AT, filesz: 0x80 }],
    [[DYN_AT, dynBlob([[DT.STRTAB, BASE + STR_AT], [DT.STRSZ, 16]])], [DYN_AT + 0x30, dyn], [STR_AT, ascii('\0libfoo.so\0')]],
  );
  t.deepEqual(parseElf(bytes).needed, []);
});

function noteBlob(notes: Array<{ name: string; type: number; desc: number[] }>, align: number): Uint8Array {
  const out: number[] = [];
  const pad = () => { while (out.length % align) out.push(0); };
  const u32 = (n: number) => out.push(n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, (n >>> 24) & 0xff);
  for (const n of notes) {
    const name = [...ascii(n.name), 0];
    u32(name.length); u32(n.desc.length); u32(n.type);
    out.push(...name); pad();
    out.push(...n.desc); pad();
  }
  return Uint8Array.from(out);
}

test('notes in an 8-aligned PT_NOTE use 8-byte padding', (t) => {
  const notes = [
    { name: 'ABCDE', type: 7, desc: [1, 2, 3, 4] },
    { name: 'Xen', type: 18, desc: [0x00, 0x10, 0x00, 0x00, 0, 0, 0, 0] },
  ];
  const blob = noteBlob(notes, 8);
  const elf = parseElf(synth([{ type: PT.NOTE, offset: 0x200, filesz: blob.length, align: 8 }], [[0x200, blob]]));
  t.deepEqual(elf.notes.map((n) => [n.name, n.type, [...n.desc]]), notes.map((n) => [n.name, n.type, n.desc]));
  t.is(pvhEntry(elf), 0x1000n);
});

test('notes from every PT_NOTE segment, in order', (t) => {
  const a = noteBlob([{ name: 'A', type: 1, desc: [9] }], 4);
  const b = noteBlob([{ name: 'B', type: 2, desc: [] }], 4);
  const elf = parseElf(synth(
    [{ type: PT.NOTE, offset: 0x200, filesz: a.length, align: 4 }, { type: PT.NOTE, offset: 0x300, filesz: b.length, align: 4 }],
    [[0x200, a], [0x300, b]],
  ));
  t.deepEqual(elf.notes.map((n) => n.name), ['A', 'B']);
});

test('pvhEntry rejects a desc that is neither 4 nor 8 bytes', (t) => {
  const blob = noteBlob([{ name: 'Xen', type: 18, desc: [1, 2] }], 4);
  const elf = parseElf(synth([{ type: PT.NOTE, offset: 0x200, filesz: blob.length, align: 4 }], [[0x200, blob]]));
  t.throws(() => pvhEntry(elf), { instanceOf: ElfError, message: /2-byte value/ });
});

// ---------------------------------------------------------------------------
// Malformed input: each gets an ElfError that says what is wrong.

test('empty file', (t) => expectElfError(t, new Uint8Array(0), /^not an ELF file \(file is empty\)$/));

test('bad magic', (t) => {
  expectElfError(t, ascii('#!/bin/sh\necho hi\n'), /^not an ELF file \(bad magic\)$/);
  expectElfError(t, Uint8Array.of(0x7f, 0x45), /bad magic/);
});

test('32-bit ELF is rejected and named', (t) => {
  const hdr = new Uint8Array(52);
  hdr.set([0x7f, 0x45, 0x4c, 0x46, 1, 1, 1]);
  expectElfError(t, hdr, /ELFCLASS32 \(32-bit\).*only ELFCLASS64/);
});

test('big-endian ELF is rejected and named', (t) => {
  const bytes = synth([]);
  bytes[5] = 2;
  expectElfError(t, bytes, /ELFDATA2MSB \(big-endian\)/);
});

test('invalid class and data bytes', (t) => {
  const a = synth([]);
  a[4] = 0;
  expectElfError(t, a, /invalid ELF class 0/);
  const b = synth([]);
  b[5] = 9;
  expectElfError(t, b, /invalid ELF data encoding 9/);
});

test('truncated headers', (t) => {
  const bytes = synth([]);
  expectElfError(t, bytes.subarray(0, 10), /truncated ELF identification/);
  expectElfError(t, bytes.subarray(0, 40), /truncated ELF header \(40 of 64 bytes\)/);
  expectElfError(t, bytes.subarray(0, 100), /ELF program header table \(1 entries\) extends past end of file \(offset 0x40, size 0x38/);
});

test('program header table entry size and count', (t) => {
  const small = synth([]);
  new DataView(small.buffer).setUint16(54, 32, true);
  expectElfError(t, small, /program header entry size 32 is smaller than 56/);
  const xnum = synth([]);
  new DataView(xnum.buffer).setUint16(56, 0xffff, true);
  expectElfError(t, xnum, /too many program headers/);
  const far = synth([]);
  new DataView(far.buffer).setBigUint64(32, 0xfffffffffffffff0n, true);
  expectElfError(t, far, /program header table .* extends past end of file \(offset 0xfffffffffffffff0/);
});

test('segment past end of file', (t) => {
  expectElfError(
    t,
    synth([{ type: PT.NOTE, offset: 0x3f0, filesz: 0x20 }]),
    /^ELF program header 1 \(NOTE\) extends past end of file \(offset 0x3f0, size 0x20, file size 0x400\)$/,
  );
  // offset + size wraps around 2^64 in 64-bit arithmetic; must not pass.
  const wrap = synth([{ type: PT.LOAD, offset: 0x10, filesz: 0 }]);
  new DataView(wrap.buffer).setBigUint64(64 + 56 + 32, 0xfffffffffffffff8n, true);
  new DataView(wrap.buffer).setBigUint64(64 + 56 + 40, 0xfffffffffffffff8n, true);
  expectElfError(t, wrap, /ELF program header 1 \(LOAD\) extends past end of file/);
});

test('PT_LOAD with filesz > memsz', (t) => {
  expectElfError(t, synth([{ type: PT.LOAD, offset: 0, filesz: 0x20, memsz: 0x10 }]), /file size 0x20 larger than memory size 0x10/);
});

test('DT_STRTAB outside every PT_LOAD', (t) => {
  expectElfError(
    t,
    synthDynamic([[DT.NEEDED, 1], [DT.STRTAB, 0x7fff0000], [DT.STRSZ, 16]]),
    /DT_STRTAB address 0x7fff0000 is not inside the file data of any PT_LOAD segment/,
  );
});

test('DT_STRSZ running past its segment', (t) => {
  expectElfError(
    t,
    synthDynamic([[DT.NEEDED, 1], [DT.STRTAB, BASE + STR_AT], [DT.STRSZ, 0x1000]]),
    /DT_STRSZ 0x1000\) extends past the file data of PT_LOAD segment 0/,
  );
});

test('string offset outside the string table', (t) => {
  expectElfError(
    t,
    synthDynamic([[DT.NEEDED, 40], [DT.STRTAB, BASE + STR_AT], [DT.STRSZ, 16]]),
    /DT_NEEDED string offset 0x28 is outside the dynamic string table \(size 0x10\)/,
  );
});

test('unterminated string in the dynamic string table', (t) => {
  // The table is cut at 5 bytes, in the middle of "libfoo.so".
  expectElfError(
    t,
    synthDynamic([[DT.SONAME, 1], [DT.STRTAB, BASE + STR_AT], [DT.STRSZ, 5]]),
    /DT_SONAME string at offset 0x1 is not NUL-terminated/,
  );
});

test('string tags without DT_STRTAB', (t) => {
  expectElfError(t, synthDynamic([[DT.NEEDED, 1], [DT.STRSZ, 16]]), /no DT_STRTAB/);
});

test('unterminated PT_INTERP', (t) => {
  const path = ascii('/lib/ld.so');
  expectElfError(
    t,
    synth([{ type: PT.INTERP, offset: 0x200, filesz: path.length }], [[0x200, path]]),
    /program header 1 \(INTERP\) is not a NUL-terminated path/,
  );
});

test('truncated and overrunning notes', (t) => {
  expectElfError(t, synth([{ type: PT.NOTE, offset: 0x200, filesz: 8, align: 4 }]), /truncated note header/);
  const blob = noteBlob([{ name: 'Xen', type: 18, desc: [1, 2, 3, 4, 5, 6, 7, 8] }], 4);
  expectElfError(
    t,
    synth([{ type: PT.NOTE, offset: 0x200, filesz: blob.length - 4, align: 4 }], [[0x200, blob]]),
    /note at offset 0x200 overruns its container \(name size 4, desc size 8/,
  );
  const huge = noteBlob([{ name: 'X', type: 1, desc: [] }], 4);
  new DataView(huge.buffer).setUint32(0, 0xffffffff, true);
  expectElfError(t, synth([{ type: PT.NOTE, offset: 0x200, filesz: huge.length, align: 4 }], [[0x200, huge]]), /overruns its container/);
});

test('section header table past end of file (only read when there is no PT_NOTE)', (t) => {
  const bytes = synth([]);
  const v = new DataView(bytes.buffer);
  v.setBigUint64(40, 0x380n, true);
  v.setUint16(58, 64, true);
  v.setUint16(60, 4, true);
  expectElfError(t, bytes, /ELF section header table \(4 entries\) extends past end of file/);
});

// ---------------------------------------------------------------------------
// Robustness: whatever the bytes, ElfError or a result, never anything else.

function mulberry32(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let x = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

function parsesOrElfError(bytes: Uint8Array): ElfFile | ElfError {
  try {
    return parseElf(bytes);
  } catch (err) {
    if (err instanceof ElfError) return err;
    throw new Error(`parseElf threw a non-ElfError: ${String(err)}`, { cause: err });
  }
}

/** Offsets of the bytes whose corruption is interesting: headers, phdrs, dynamic entries. */
function hotBytes(bytes: Uint8Array, elf: ElfFile): number[] {
  const hot = new Set<number>();
  const add = (start: bigint, len: bigint) => {
    for (let i = Number(start); i < Number(start + len) && i < bytes.length; i++) hot.add(i);
  };
  add(0n, 64n);
  add(64n, BigInt(elf.programHeaders.length * 56));
  for (const ph of elf.programHeaders) {
    if (ph.type === PT.DYNAMIC || ph.type === PT.NOTE || ph.type === PT.INTERP) add(ph.offset, ph.filesz);
  }
  return [...hot];
}

for (const [label, path] of [['ls', LS], ['pvh', fx.pvh], ['pvh.o', fx.pvhObject], ['runpath', fx.runpath]] as const) {
  test(`fuzz (${label}): truncation at many lengths`, (t) => {
    const bytes = readFileSync(path);
    const cuts = new Set<number>();
    for (let n = 0; n <= Math.min(bytes.length, 4096); n++) cuts.add(n);
    for (let n = 4096; n < bytes.length; n += 997) cuts.add(n);
    const rand = mulberry32(1);
    for (let i = 0; i < 200; i++) cuts.add(Math.floor(rand() * bytes.length));
    for (const n of cuts) parsesOrElfError(bytes.subarray(0, n));
    t.pass();
  });

  test(`fuzz (${label}): byte flips in headers, phdrs, dynamic and notes`, (t) => {
    const original = readFileSync(path);
    const hot = hotBytes(original, parseElf(original));
    const rand = mulberry32(42);
    const pick = () => hot[Math.floor(rand() * hot.length)];
    let errors = 0;
    for (let round = 0; round < 3000; round++) {
      const bytes = Uint8Array.from(original);
      const flips = 1 + Math.floor(rand() * 4);
      for (let f = 0; f < flips; f++) {
        const at = pick();
        bytes[at] = rand() < 0.3 ? 0xff : bytes[at] ^ (1 << Math.floor(rand() * 8));
      }
      if (parsesOrElfError(bytes) instanceof ElfError) errors++;
    }
    t.log(`${errors}/3000 mutants rejected with ElfError`);
    t.true(errors > 0);
  });
}

test('fuzz (synthetic dynamic): every single byte set to every interesting value', (t) => {
  const original = synthDynamic([[DT.NEEDED, 1], [DT.RUNPATH, 11], [DT.STRTAB, BASE + STR_AT], [DT.STRSZ, 17]]);
  t.deepEqual(parseElf(original).runpath, ['/a', '/b']);
  for (let at = 0; at < 0x320; at++) {
    for (const value of [0x00, 0x01, 0x08, 0x7f, 0x80, 0xff]) {
      const bytes = Uint8Array.from(original);
      bytes[at] = value;
      parsesOrElfError(bytes);
    }
  }
  t.pass();
});
