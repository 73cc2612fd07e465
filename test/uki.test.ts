// UKI writer and reader: against binutils as an independent PE reader, against malformed and
// mutated files, and a real boot of a written UKI under QEMU + OVMF (standard UEFI firmware).
import test, { type ExecutionContext } from 'ava';
import { execFile, execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import { DEFAULT_STUB, MACHINE, SCN, UkiError, buildUki, parseUki, readPe, readUki, writeUki, type UkiOptions } from '../src/image/uki.js';
import { cachedKernel } from '../src/kernel/build.js';
import { defaultImage } from '../src/image/default.js';
import { EXIT_PORT, encodeCommand } from '../src/vm/config.js';

const execFileP = promisify(execFile);
const dir = mkdtempSync(path.join(tmpdir(), 'skiff-uki-test-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

// Debian's systemd-boot-efi is a declared dependency of the image builder: missing is a failure.
const stub = readFileSync(DEFAULT_STUB);

/** Deterministic bytes (xorshift32), so fixtures and mutations are the same on every run. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

function pseudoRandom(size: number, seed: number): Buffer {
  const next = prng(seed);
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = next() & 0xff;
  return b;
}

/**
 * Enough of a bzImage for the writer's kernel check (PE "MZ" + setup header "HdrS"); the rest is
 * noise. The real kernel is used by the boot test.
 */
function fakeKernel(size = 300_001, seed = 1): Buffer {
  const k = pseudoRandom(size, seed);
  k.write('MZ', 0, 'latin1');
  k.writeUInt16LE(0xaa55, 0x1fe);
  k.write('HdrS', 0x202, 'latin1');
  return k;
}

const payload: Omit<UkiOptions, 'stub'> = {
  linux: fakeKernel(),
  initrd: pseudoRandom(70_003, 2),
  cmdline: 'console=ttyS0 quiet skiff.cmd=6563686f00',
  osrel: 'ID=skiff\nNAME="skiff"\nVERSION_ID=0.1\n',
  uname: '6.1.0-skiff',
};
const uki = buildUki(stub, payload);

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

interface ObjdumpSection {
  name: string;
  size: number;
  vma: number;
  fileOffset: number;
}

function objdumpSections(file: string): ObjdumpSection[] {
  const out = execFileSync('objdump', ['-h', file], { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
  const rows = [...out.matchAll(/^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+2\*\*\d+/gm)];
  return rows.map((m) => ({ name: m[1], size: parseInt(m[2], 16), vma: parseInt(m[3], 16), fileOffset: parseInt(m[4], 16) }));
}

function objdumpHeader(file: string): Map<string, string> {
  const out = execFileSync('objdump', ['-p', file], { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
  const fields = new Map<string, string>();
  for (const m of out.matchAll(/^(\w+)\s+([0-9a-f]+)\b/gm)) if (!fields.has(m[1])) fields.set(m[1], m[2]);
  return fields;
}

async function writeTemp(name: string, bytes: Uint8Array): Promise<string> {
  const file = path.join(dir, name);
  await fs.writeFile(file, bytes);
  return file;
}

// ---------------------------------------------------------------------------
// Writer → reader

test('round trip: every payload comes back byte for byte', (t) => {
  const back = parseUki(uki);
  t.true(Buffer.from(back.linux).equals(payload.linux));
  t.true(Buffer.from(back.initrd!).equals(payload.initrd!));
  t.is(back.cmdline, payload.cmdline);
  t.is(back.osrel, payload.osrel);
  t.is(back.uname, payload.uname);
  t.deepEqual(
    back.sections.map((s) => s.name),
    ['.text', '.reloc', '.data', '.dynamic', '.rela', '.dynsym', '.sbat', '.sdmagic', '.osrel', '.cmdline', '.initrd', '.uname', '.linux'],
  );
});

test('round trip with only .linux: the optional fields are absent, not empty', (t) => {
  const back = parseUki(buildUki(stub, { linux: payload.linux, cmdline: '' }));
  t.true(Buffer.from(back.linux).equals(payload.linux));
  t.false('initrd' in back);
  t.false('cmdline' in back);
  t.false('osrel' in back);
  t.false('uname' in back);
  t.is(back.sections.filter((s) => s.name.startsWith('.') && ['.cmdline', '.initrd'].includes(s.name)).length, 0);
});

test('readUki reads a file; writeUki reads the stub from disk and gives the same bytes as buildUki', async (t) => {
  const built = await writeUki({ ...payload, stub: DEFAULT_STUB });
  t.true(built.equals(uki));
  t.true(Buffer.from((await readUki(await writeTemp('rt.efi', built))).linux).equals(payload.linux));
});

test('objdump -h (binutils) sees the same sections: names, sizes, addresses, file offsets', async (t) => {
  const file = await writeTemp('objdump.efi', uki);
  const ours = readPe(uki).sections;
  const theirs = objdumpSections(file);
  t.is(theirs.length, ours.length);
  for (const [i, s] of ours.entries()) {
    t.like(theirs[i], { name: s.name, size: s.virtualSize, vma: s.virtualAddress, fileOffset: s.rawOffset }, `section ${i}`);
  }
  // The stub's own table read by both readers, before anything was added.
  const stubSections = readPe(stub).sections;
  t.deepEqual(
    objdumpSections(DEFAULT_STUB).map((s) => [s.name, s.size, s.vma, s.fileOffset]),
    stubSections.map((s) => [s.name, s.virtualSize, s.virtualAddress, s.rawOffset]),
  );
});

test('objcopy extracts the same payload bytes the reader returns', async (t) => {
  const file = await writeTemp('objcopy.efi', uki);
  for (const [name, expected] of [['.linux', payload.linux], ['.initrd', payload.initrd!], ['.cmdline', Buffer.from(payload.cmdline!)]] as const) {
    const out = path.join(dir, `extract${name}`);
    await execFileP('objcopy', ['-O', 'binary', `--only-section=${name}`, file, out]);
    t.true((await fs.readFile(out)).equals(expected), name);
  }
});

test('headers: ukify layout, alignments, SizeOfImage, zero checksum, symbol table dropped', async (t) => {
  const pe = readPe(uki);
  const before = readPe(stub);
  const added = pe.sections.slice(before.sections.length);
  t.deepEqual(added.map((s) => s.name), ['.osrel', '.cmdline', '.initrd', '.uname', '.linux'], '.linux last, as ukify');
  const stubEnd = Math.max(...before.sections.map((s) => s.virtualAddress + s.virtualSize), before.sizeOfImage);
  let prevEnd = stubEnd;
  for (const s of added) {
    t.is(s.virtualAddress % pe.sectionAlignment, 0, `${s.name} address aligned`);
    t.is(s.rawOffset % pe.fileAlignment, 0, `${s.name} file offset aligned`);
    t.is(s.rawSize % pe.fileAlignment, 0, `${s.name} raw size aligned`);
    t.true(s.virtualAddress >= prevEnd, `${s.name} after what precedes it`);
    t.true(s.rawSize >= s.virtualSize && s.rawSize - s.virtualSize < pe.fileAlignment);
    t.is(s.characteristics, s.name === '.linux' ? SCN.CNT_CODE | SCN.MEM_READ : SCN.CNT_INITIALIZED_DATA | SCN.MEM_READ);
    prevEnd = s.virtualAddress + s.virtualSize;
  }
  const last = added[added.length - 1];
  t.is(pe.sizeOfImage, Math.ceil((last.virtualAddress + last.virtualSize) / pe.sectionAlignment) * pe.sectionAlignment);
  t.is(uki.length, last.rawOffset + last.rawSize, 'the file ends with .linux');
  t.is(pe.checkSum, 0);
  t.is(pe.timeDateStamp, before.timeDateStamp, "the stub's timestamp is kept, no new one");
  t.true(before.pointerToSymbolTable > 0, 'the Debian 12 stub still has a COFF symbol table');
  t.is(pe.pointerToSymbolTable, 0);
  t.is(pe.numberOfSymbols, 0);
  // The stub's own sections are carried over untouched.
  for (const s of before.sections) {
    t.true(uki.subarray(s.rawOffset, s.rawOffset + s.rawSize).equals(stub.subarray(s.rawOffset, s.rawOffset + s.rawSize)), s.name);
  }
  const dump = objdumpHeader(await writeTemp('hdr.efi', uki));
  t.is(parseInt(dump.get('SizeOfImage')!, 16), pe.sizeOfImage);
  t.is(parseInt(dump.get('SizeOfHeaders')!, 16), pe.sizeOfHeaders);
  t.is(parseInt(dump.get('CheckSum')!, 16), 0);
  t.is(parseInt(dump.get('Subsystem')!, 16), 10);
});

test('reproducible: two builds give the same sha256, and a changed input changes it', async (t) => {
  const a = await writeUki(payload);
  await new Promise((r) => setTimeout(r, 1100)); // a second apart: no clock may leak into the output
  const b = await writeUki(payload);
  t.is(sha256(a), sha256(b));
  t.not(sha256(buildUki(stub, { ...payload, cmdline: `${payload.cmdline} x` })), sha256(a));
});

// ---------------------------------------------------------------------------
// Writer refusals

test('writer refuses inputs that would not boot, with a clear message', (t) => {
  const refuse = (options: Omit<UkiOptions, 'stub'>, re: RegExp, s: Uint8Array = stub) => {
    const err = t.throws(() => buildUki(s, options), { instanceOf: UkiError });
    t.regex(err!.message, re);
    t.notRegex(err!.message, /\n/, 'one line');
  };
  refuse({ linux: new Uint8Array() }, /kernel \(\.linux\) is empty/);
  const elf = fakeKernel();
  elf.write('\x7fELF', 0, 'latin1');
  elf.write('XXXX', 0x202, 'latin1');
  refuse({ linux: elf }, /not a bzImage .*ELF file, probably vmlinux/);
  const noEfi = fakeKernel();
  noEfi.writeUInt16LE(0, 0); // no MZ, and xloadflags without the handover bit
  noEfi.writeUInt16LE(0x20f, 0x206);
  noEfi.writeUInt16LE(0x21, 0x236);
  refuse({ linux: noEfi }, /no EFI stub .*CONFIG_EFI_STUB=y/);
  refuse({ linux: payload.linux, cmdline: 'console=ttyS0\nquiet' }, /non-printable or non-ASCII character \(code 0xa\) at offset 13/);
  refuse({ linux: payload.linux, cmdline: 'café' }, /non-ASCII character \(code 0xe9\)/);
  refuse({ linux: payload.linux, cmdline: 'x'.repeat(2048) }, /2048 bytes, the x86 limit is 2047/);
  refuse({ linux: payload.linux, uname: 'a\0b' }, /\.uname text contains a NUL/);
  // A UKI is not a stub.
  refuse(payload, /already has a \.osrel section: it is a UKI, not a stub/, uki);
  // Not a PE at all.
  refuse(payload, /EFI stub is unusable: not a PE image: no "MZ"/, Buffer.from('#!/bin/sh\n'));
  // A signed stub: the certificate table directory is set.
  const signed = Buffer.from(stub);
  const pe = readPe(stub);
  signed.writeUInt32LE(0x20000, pe.optionalHeaderOffset + 112 + 4 * 8);
  signed.writeUInt32LE(0x100, pe.optionalHeaderOffset + 112 + 4 * 8 + 4);
  refuse(payload, /EFI stub is signed/, signed);
  // Another architecture's stub.
  const arm = Buffer.from(stub);
  arm.writeUInt16LE(MACHINE.ARM64, pe.fileHeaderOffset);
  refuse(payload, /stub is for machine arm64 \(0xaa64\), not x86-64/, arm);
  // No room for five more section headers: four extra (empty) entries already fill the space.
  const crowded = Buffer.from(stub);
  crowded.writeUInt16LE(pe.sections.length + 4, pe.fileHeaderOffset + 2);
  refuse(payload, /no room for 5 more section headers/, crowded);
  t.notThrows(() => buildUki(crowded, { linux: payload.linux }), 'one more header still fits');
  // Something lives right after the section table.
  const squatted = Buffer.from(stub);
  squatted[pe.sectionTableOffset + pe.sections.length * 40 + 3] = 1;
  refuse(payload, /data right after its section table/, squatted);
});

test('writeUki names a missing stub and how to get the default one', async (t) => {
  const err = await t.throwsAsync(writeUki({ ...payload, stub: path.join(dir, 'nope.stub') }), { instanceOf: UkiError });
  t.regex(err!.message, /nope\.stub: no such file$/);
});

// ---------------------------------------------------------------------------
// Reader against malformed files

const pe = readPe(uki);
const sectionAt = (name: string) => pe.sections.find((s) => s.name === name)!;
const headerOf = (name: string) => pe.sectionTableOffset + sectionAt(name).index * 40;

function patched(edit: (b: Buffer) => void, from: Uint8Array = uki): Buffer {
  const b = Buffer.from(from);
  edit(b);
  return b;
}

const malformed: [string, Uint8Array, RegExp][] = [
  ['empty file', new Uint8Array(), /not a PE image: the file is empty/],
  ['one byte', Buffer.from('M'), /not a PE image: no "MZ" signature/],
  ['bad MZ', patched((b) => b.write('ZM', 0, 'latin1')), /no "MZ" signature at offset 0/],
  ['truncated DOS header', uki.subarray(0, 40), /truncated DOS header \(40 of 64 bytes\)/],
  ['e_lfanew past EOF', patched((b) => b.writeUInt32LE(0xfffffff0, 0x3c)), /PE header at 0xfffffff0 \(from e_lfanew\) extends past the end of the file/],
  ['bad PE signature', patched((b) => b.write('PX', pe.fileHeaderOffset - 4, 'latin1')), /no "PE\\0\\0" signature at offset 0x80/],
  ['truncated in the optional header', uki.subarray(0, pe.optionalHeaderOffset + 50), /optional header extends past the end of the file/],
  ['PE32, not PE32+', patched((b) => b.writeUInt16LE(0x10b, pe.optionalHeaderOffset)), /PE32 \(32-bit\) image/],
  ['optional header too small', patched((b) => b.writeUInt16LE(64, pe.fileHeaderOffset + 16)), /optional header is 64 bytes, smaller than its fixed part/],
  ['too many data directories', patched((b) => b.writeUInt32LE(0x10000, pe.optionalHeaderOffset + 108)), /claims 65536 data directories/],
  ['FileAlignment not a power of two', patched((b) => b.writeUInt32LE(0x300, pe.optionalHeaderOffset + 36)), /FileAlignment 0x300 is not a power of two/],
  ['section table past EOF', patched((b) => b.writeUInt16LE(60000, pe.fileHeaderOffset + 2)), /section table \(60000 entries\) extends past the end of the file/],
  ['truncated inside .linux', uki.subarray(0, sectionAt('.linux').rawOffset + 1000), /section 12 \("\.linux"\) data extends past the end of the file/],
  ['raw offset near 4 GiB', patched((b) => b.writeUInt32LE(0xffffff00, headerOf('.initrd') + 20)), /section 10 \("\.initrd"\) data extends past the end of the file \(offset 0xffffff00/],
  ['VirtualSize 0xffffffff', patched((b) => b.writeUInt32LE(0xffffffff, headerOf('.linux') + 8)), /section 12 \("\.linux"\) ends at 0x1[0-9a-f]{8} in memory, past SizeOfImage/],
  ['SizeOfImage too small', patched((b) => b.writeUInt32LE(0x1000, pe.optionalHeaderOffset + 56)), /past SizeOfImage 0x1000/],
  ['overlapping sections', patched((b) => b.writeUInt32LE(sectionAt('.cmdline').virtualAddress, headerOf('.initrd') + 12)), /sections "\.cmdline" and "\.initrd" overlap in memory/],
  [
    'payload larger in memory than in the file',
    patched((b) => {
      b.writeUInt32LE(sectionAt('.linux').rawSize + 1, headerOf('.linux') + 8);
      b.writeUInt32LE(pe.sizeOfImage + pe.sectionAlignment, pe.optionalHeaderOffset + 56);
    }),
    /\.linux is 0x[0-9a-f]+ bytes in memory but only 0x[0-9a-f]+ in the file: the image is damaged/],
  ['not x86-64', patched((b) => b.writeUInt16LE(MACHINE.ARM64, pe.fileHeaderOffset)), /machine arm64 \(0xaa64\): skiff boots x86-64 \(amd64\) UKIs only/],
  ['no .linux (the bare stub)', stub, /not a UKI: the PE image has no \.linux section/],
  ['.linux twice', patched((b) => b.write('.linux\0\0', headerOf('.initrd'), 'latin1')), /\.linux appears twice \(sections 10 and 12\)/],
  ['multi-profile', patched((b) => b.write('.profile', headerOf('.uname'), 'latin1')), /multi-profile UKIs/],
  ['invalid UTF-8 in .osrel', patched((b) => b.writeUInt8(0xff, sectionAt('.osrel').rawOffset)), /\.osrel is not valid UTF-8/],
];

for (const [what, bytes, re] of malformed) {
  test(`malformed: ${what}`, (t) => {
    const err = t.throws(() => parseUki(bytes), { instanceOf: UkiError });
    t.regex(err!.message, re);
    t.notRegex(err!.message, /\n/, 'one line');
  });
}

test('readUki prefixes the file name, and names a missing file', async (t) => {
  const file = await writeTemp('bare-stub.efi', stub);
  const err = await t.throwsAsync(readUki(file), { instanceOf: UkiError });
  t.is(err!.message, `${file}: not a UKI: the PE image has no .linux section`);
  const missing = await t.throwsAsync(readUki(path.join(dir, 'missing.efi')), { instanceOf: UkiError });
  t.regex(missing!.message, /missing\.efi: no such file$/);
});

test('400 seeded mutations of a real UKI only ever parse or throw UkiError', (t) => {
  // A small payload keeps each mutation cheap; the headers are the interesting part.
  const small = buildUki(stub, { ...payload, linux: fakeKernel(4096, 3), initrd: pseudoRandom(1000, 4) });
  const headerEnd = readPe(small).sizeOfHeaders;
  const next = prng(0x5eed);
  let parsed = 0;
  let refused = 0;
  for (let i = 0; i < 400; i++) {
    const b = Buffer.from(small);
    const kind = i % 4;
    if (kind === 3) {
      // Truncation anywhere.
      const cut = next() % b.length;
      tryParse(b.subarray(0, cut), `mutation ${i}: truncated at ${cut}`);
      continue;
    }
    const flips = 1 + (next() % 6);
    for (let f = 0; f < flips; f++) {
      // Mostly the headers (where one byte changes the meaning of everything), sometimes anywhere.
      const at = kind === 2 ? next() % b.length : next() % headerEnd;
      // Extreme values find overflow paths faster than uniform noise.
      const v = next();
      b[at] = (v & 3) === 0 ? 0xff : (v & 3) === 1 ? 0 : (v >>> 8) & 0xff;
    }
    tryParse(b, `mutation ${i}`);
  }
  function tryParse(bytes: Uint8Array, what: string) {
    try {
      const u = parseUki(bytes);
      // A parse that succeeds must be a right answer: each payload whole, as its header says.
      const size = (name: string) => u.sections.find((s) => s.name === name)?.virtualSize;
      if (u.linux.length !== size('.linux')) t.fail(`${what}: .linux is ${u.linux.length} bytes, its header says ${size('.linux')}`);
      if (u.initrd && u.initrd.length !== size('.initrd')) t.fail(`${what}: .initrd is ${u.initrd.length} bytes, its header says ${size('.initrd')}`);
      parsed++;
    } catch (err) {
      if (!(err instanceof UkiError)) t.fail(`${what}: ${(err as Error).name}: ${(err as Error).message}`);
      else if (err.message.includes('\n')) t.fail(`${what}: a multi-line message`);
      refused++;
    }
  }
  // Both outcomes must occur, or the mutations were not exercising the reader.
  t.true(parsed > 20, `${parsed} parsed`);
  t.true(refused > 100, `${refused} refused`);
  t.log(`${parsed} mutated files parsed, ${refused} refused with UkiError`);
});

// ---------------------------------------------------------------------------
// A real boot under UEFI firmware

const OVMF = '/usr/share/ovmf/OVMF.fd';
const OVMF_BOOT_TIMEOUT_MS = 240_000;

interface QemuResult {
  code: number | null;
  output: string;
  ms: number;
  /** When the firmware handed over to the UKI (OVMF's "BdsDxe: starting Boot000N"). */
  firmwareMs?: number;
  timedOut: boolean;
}

/**
 * Runs QEMU to its end, or kills it at the deadline, or as soon as `failed` matches the output
 * (firmware falling back to its shell would otherwise wait there forever).
 */
function runQemu(args: string[], timeoutMs: number, failed: RegExp): Promise<QemuResult> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    let timedOut = false;
    let firmwareMs: number | undefined;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    const collect = (d: Buffer) => {
      output += d.toString('latin1');
      if (firmwareMs === undefined && /BdsDxe: starting Boot\d+ "UEFI/.test(output)) firmwareMs = Date.now() - started;
      if (failed.test(output)) child.kill('SIGKILL');
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, output, ms: Date.now() - started, firmwareMs, timedOut });
    });
  });
}

const OVMF_ARGS = [
  '-nodefaults',
  '-no-user-config',
  '-nographic',
  '-machine', 'q35',
  '-accel', 'tcg',
  '-m', '512',
  '-bios', OVMF,
  '-serial', 'stdio',
  '-no-reboot',
  '-device', `isa-debug-exit,iobase=0x${EXIT_PORT.toString(16)},iosize=4`,
];

/** The kernel command line that makes skiff-init echo `token` and end the VM through the exit port. */
const echoCmdline = (token: string): string =>
  ['console=ttyS0', 'panic=-1', `skiff.exit_port=0x${EXIT_PORT.toString(16)}`, `skiff.cmd=${encodeCommand(['echo', token])}`].join(' ');

async function skiffUki(t: ExecutionContext, cmdline: string): Promise<Buffer | undefined> {
  const kernel = await cachedKernel();
  if (!kernel) {
    t.fail('the default kernel is not built: run "node dist/bundle/skiff.js kernel build"');
    return undefined;
  }
  if (!/^CONFIG_EFI_STUB=y$/m.test(await fs.readFile(kernel.config, 'utf8'))) {
    t.fail(`the cached kernel ${kernel.version} has no EFI stub (CONFIG_EFI_STUB): rebuild it`);
    return undefined;
  }
  return writeUki({
    linux: await fs.readFile(kernel.bzImage),
    initrd: await fs.readFile((await defaultImage()).initrd!),
    cmdline,
    uname: kernel.version,
    osrel: 'ID=skiff\n',
  });
}

/** Boots under OVMF; the guest must print `token` on a line of its own and exit with status 0. */
async function bootsAndEchoes(t: ExecutionContext, qemuArgs: string[], token: string): Promise<QemuResult> {
  // Should the UKI fail, OVMF moves on to its built-in shell and would wait there until the deadline.
  const r = await runQemu([...OVMF_ARGS, ...qemuArgs], OVMF_BOOT_TIMEOUT_MS, /starting Boot\d+ "EFI Internal Shell"/);
  // OVMF paints the screen with ANSI escapes; drop them so failures read as text.
  const tail = r.output.replace(/\x1b\[[0-9;=]*[A-Za-z]/g, '').slice(-3000);
  t.false(r.timedOut, `QEMU did not end within ${OVMF_BOOT_TIMEOUT_MS / 1000} s:\n${tail}`);
  t.regex(r.output, new RegExp(`^${token}\\r?$`, 'm'), tail);
  // isa-debug-exit: QEMU exits with (status << 1) | 1, so echo's 0 is 1.
  t.is(r.code, 1, tail);
  return r;
}

test('a written UKI boots under QEMU + OVMF from a FAT ESP (EFI/BOOT/BOOTX64.EFI) and runs the command', async (t) => {
  t.timeout(OVMF_BOOT_TIMEOUT_MS + 60_000);
  const token = `uki-ok-${randomBytes(6).toString('hex')}`;
  const image = await skiffUki(t, echoCmdline(token));
  if (!image) return;
  // The removable-media path every UEFI firmware boots without any boot entry.
  const esp = path.join(dir, 'esp');
  await fs.mkdir(path.join(esp, 'EFI', 'BOOT'), { recursive: true });
  await fs.writeFile(path.join(esp, 'EFI', 'BOOT', 'BOOTX64.EFI'), image);
  const r = await bootsAndEchoes(
    t,
    // QEMU's vvfat serves the directory as a FAT disk; read-only needs a device that allows it.
    ['-drive', `if=none,id=esp,format=raw,file=fat:${esp},readonly=on`, '-device', 'virtio-blk-pci,drive=esp'],
    token,
  );
  const firmware = r.firmwareMs === undefined ? '?' : (r.firmwareMs / 1000).toFixed(1);
  t.log(`OVMF boot under TCG: firmware to the UKI ${firmware} s, to the command's exit ${(r.ms / 1000).toFixed(1)} s`);
});

test('under OVMF -kernel UKI.efi boots too, and -append (the LoadOptions) replaces the built-in .cmdline', async (t) => {
  t.timeout(OVMF_BOOT_TIMEOUT_MS + 60_000);
  const builtIn = `uki-builtin-${randomBytes(6).toString('hex')}`;
  const appended = `uki-appended-${randomBytes(6).toString('hex')}`;
  const image = await skiffUki(t, echoCmdline(builtIn));
  if (!image) return;
  const file = await writeTemp('kernel-arg.efi', image);
  // systemd-stub 252 without Secure Boot: non-empty LoadOptions win over .cmdline.
  const r = await bootsAndEchoes(t, ['-kernel', file, '-append', echoCmdline(appended)], appended);
  t.false(r.output.includes(builtIn), 'the built-in command line was not used');
  t.log(`OVMF -kernel boot under TCG: ${(r.ms / 1000).toFixed(1)} s`);
});
