// Minimal ELF64 little-endian reader.
//
// Addresses and sizes stay BigInt end to end: kernel images and PIE binaries
// use addresses above 2^53, and silently rounding an entry point would boot
// garbage. Every offset/size taken from the file goes through `need()` before
// it is used, so malformed input can only ever surface as an ElfError.

import { readFile } from 'node:fs/promises';

export class ElfError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ElfError';
  }
}

export const ET = { NONE: 0, REL: 1, EXEC: 2, DYN: 3, CORE: 4 } as const;
export const EM = { X86_64: 62, AARCH64: 183, RISCV: 243 } as const;
export const PT = {
  NULL: 0,
  LOAD: 1,
  DYNAMIC: 2,
  INTERP: 3,
  NOTE: 4,
  SHLIB: 5,
  PHDR: 6,
  TLS: 7,
  GNU_EH_FRAME: 0x6474e550,
  GNU_STACK: 0x6474e551,
  GNU_RELRO: 0x6474e552,
  GNU_PROPERTY: 0x6474e553,
} as const;
export const PF = { X: 1, W: 2, R: 4 } as const;
export const SHT = { NULL: 0, PROGBITS: 1, STRTAB: 3, DYNAMIC: 6, NOTE: 7, NOBITS: 8 } as const;
export const DT = {
  NULL: 0,
  NEEDED: 1,
  STRTAB: 5,
  STRSZ: 10,
  SONAME: 14,
  RPATH: 15,
  RUNPATH: 29,
} as const;
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;

export interface ProgramHeader {
  index: number;
  type: number;
  flags: number;
  offset: bigint;
  vaddr: bigint;
  paddr: bigint;
  filesz: bigint;
  memsz: bigint;
  align: bigint;
}

export interface ElfNote {
  name: string;
  type: number;
  desc: Uint8Array;
}

export interface ElfFile {
  type: number;
  machine: number;
  entry: bigint;
  programHeaders: ProgramHeader[];
  notes: ElfNote[];
  interp?: string;
  needed: string[];
  soname?: string;
  rpath: string[];
  runpath: string[];
}

const EHDR_SIZE = 64;
const PHDR_MIN_SIZE = 56n;
const SHDR_MIN_SIZE = 64n;
const DYN_SIZE = 16n;
const NOTE_HEADER_SIZE = 12n;
const PN_XNUM = 0xffff;

const ELFCLASS32 = 1;
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ELFDATA2MSB = 2;

const hex = (n: bigint | number): string => `0x${n.toString(16)}`;

const PT_NAMES = new Map<number, string>(Object.entries(PT).map(([k, v]) => [v, k]));
const ptName = (type: number): string => PT_NAMES.get(type) ?? hex(type);

// Non-fatal decoding: paths in ELF files are bytes, and a stray invalid
// sequence should not turn into a parse failure.
const utf8 = new TextDecoder('utf-8');

/** Bounds-checked little-endian view over the file bytes. */
class Reader {
  readonly size: bigint;
  private readonly view: DataView;

  constructor(readonly bytes: Uint8Array) {
    // Buffers are often slices of a shared pool, so respect byteOffset.
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.size = BigInt(bytes.byteLength);
  }

  fits(offset: bigint, size: bigint): boolean {
    return offset >= 0n && size >= 0n && offset + size <= this.size;
  }

  /** Throws unless [offset, offset+size) lies inside the file; returns offset as a safe number. */
  need(offset: bigint, size: bigint, what: string): number {
    if (!this.fits(offset, size)) {
      throw new ElfError(
        `${what} extends past end of file (offset ${hex(offset)}, size ${hex(size)}, file size ${hex(this.size)})`,
      );
    }
    return Number(offset);
  }

  u16(offset: bigint, what: string): number {
    return this.view.getUint16(this.need(offset, 2n, what), true);
  }

  u32(offset: bigint, what: string): number {
    return this.view.getUint32(this.need(offset, 4n, what), true);
  }

  u64(offset: bigint, what: string): bigint {
    return this.view.getBigUint64(this.need(offset, 8n, what), true);
  }

  slice(offset: bigint, size: bigint, what: string): Uint8Array {
    const start = this.need(offset, size, what);
    return this.bytes.slice(start, start + Number(size));
  }
}

interface Header {
  type: number;
  machine: number;
  entry: bigint;
  phoff: bigint;
  shoff: bigint;
  phentsize: bigint;
  phnum: number;
  shentsize: bigint;
  shnum: number;
}

function checkIdent(bytes: Uint8Array): void {
  if (bytes.length === 0) throw new ElfError('not an ELF file (file is empty)');
  if (bytes.length < 4 || bytes[0] !== 0x7f || bytes[1] !== 0x45 || bytes[2] !== 0x4c || bytes[3] !== 0x46) {
    throw new ElfError('not an ELF file (bad magic)');
  }
  if (bytes.length < 16) throw new ElfError(`truncated ELF identification (${bytes.length} of 16 bytes)`);
  const cls = bytes[4];
  if (cls === ELFCLASS32) throw new ElfError('unsupported ELF class: found ELFCLASS32 (32-bit), only ELFCLASS64 is supported');
  if (cls !== ELFCLASS64) throw new ElfError(`invalid ELF class ${cls} (expected 2 = ELFCLASS64)`);
  const data = bytes[5];
  if (data === ELFDATA2MSB) throw new ElfError('unsupported ELF byte order: found ELFDATA2MSB (big-endian), only little-endian is supported');
  if (data !== ELFDATA2LSB) throw new ElfError(`invalid ELF data encoding ${data} (expected 1 = ELFDATA2LSB)`);
}

function readHeader(r: Reader): Header {
  checkIdent(r.bytes);
  if (r.bytes.length < EHDR_SIZE) {
    throw new ElfError(`truncated ELF header (${r.bytes.length} of ${EHDR_SIZE} bytes)`);
  }
  const what = 'ELF header';
  return {
    type: r.u16(16n, what),
    machine: r.u16(18n, what),
    entry: r.u64(24n, what),
    phoff: r.u64(32n, what),
    shoff: r.u64(40n, what),
    phentsize: BigInt(r.u16(54n, what)),
    phnum: r.u16(56n, what),
    shentsize: BigInt(r.u16(58n, what)),
    shnum: r.u16(60n, what),
  };
}

function readProgramHeaders(r: Reader, h: Header): ProgramHeader[] {
  if (h.phnum === 0) return [];
  if (h.phnum === PN_XNUM) throw new ElfError('too many program headers (e_phnum is PN_XNUM, not supported)');
  if (h.phentsize < PHDR_MIN_SIZE) {
    throw new ElfError(`ELF program header entry size ${h.phentsize} is smaller than ${PHDR_MIN_SIZE}`);
  }
  r.need(h.phoff, h.phentsize * BigInt(h.phnum), `ELF program header table (${h.phnum} entries)`);
  const headers: ProgramHeader[] = [];
  for (let i = 0; i < h.phnum; i++) {
    const base = h.phoff + BigInt(i) * h.phentsize;
    const what = `ELF program header ${i}`;
    headers.push({
      index: i,
      type: r.u32(base, what),
      flags: r.u32(base + 4n, what),
      offset: r.u64(base + 8n, what),
      vaddr: r.u64(base + 16n, what),
      paddr: r.u64(base + 24n, what),
      filesz: r.u64(base + 32n, what),
      memsz: r.u64(base + 40n, what),
      align: r.u64(base + 48n, what),
    });
  }
  for (const ph of headers) checkSegment(r, ph);
  return headers;
}

// Consumers (image builders, the kernel loader) copy segment contents
// straight out of the file, so a segment whose bytes are not all there is
// reported up front rather than when somebody finally reads it.
function checkSegment(r: Reader, ph: ProgramHeader): void {
  r.need(ph.offset, ph.filesz, `ELF program header ${ph.index} (${ptName(ph.type)})`);
  if (ph.type === PT.LOAD && ph.filesz > ph.memsz) {
    throw new ElfError(
      `ELF program header ${ph.index} (LOAD) has file size ${hex(ph.filesz)} larger than memory size ${hex(ph.memsz)}`,
    );
  }
}

function alignUp(value: bigint, align: bigint): bigint {
  return (value + align - 1n) / align * align;
}

// The gABI says 8, but every ELF64 producer except a few uses 4-byte note
// alignment; GNU property notes are the exception and announce it with an
// 8-aligned container.
const noteAlign = (containerAlign: bigint): bigint => (containerAlign === 8n ? 8n : 4n);

function parseNotes(r: Reader, start: bigint, size: bigint, align: bigint, where: string): ElfNote[] {
  r.need(start, size, where);
  const end = start + size;
  const notes: ElfNote[] = [];
  let pos = start;
  while (pos < end) {
    if (end - pos < NOTE_HEADER_SIZE) {
      throw new ElfError(`${where}: truncated note header at offset ${hex(pos)} (${end - pos} bytes left)`);
    }
    const what = `${where}: note at offset ${hex(pos)}`;
    const namesz = BigInt(r.u32(pos, what));
    const descsz = BigInt(r.u32(pos + 4n, what));
    const type = r.u32(pos + 8n, what);
    const nameAt = pos + NOTE_HEADER_SIZE;
    const descAt = start + alignUp(nameAt + namesz - start, align);
    if (descAt + descsz > end) {
      throw new ElfError(
        `${what} overruns its container (name size ${namesz}, desc size ${descsz}, container ends at ${hex(end)})`,
      );
    }
    notes.push({ name: cString(r.slice(nameAt, namesz, what)), type, desc: r.slice(descAt, descsz, what) });
    pos = start + alignUp(descAt + descsz - start, align);
  }
  return notes;
}

function cString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return utf8.decode(nul === -1 ? bytes : bytes.subarray(0, nul));
}

function segmentNotes(r: Reader, phs: ProgramHeader[]): ElfNote[] {
  return phs
    .filter((ph) => ph.type === PT.NOTE)
    .flatMap((ph) => parseNotes(r, ph.offset, ph.filesz, noteAlign(ph.align), `ELF program header ${ph.index} (NOTE)`));
}

interface SectionHeader {
  index: number;
  type: number;
  offset: bigint;
  size: bigint;
  addralign: bigint;
}

function readSectionHeaders(r: Reader, h: Header): SectionHeader[] {
  if (h.shoff === 0n) return [];
  if (h.shentsize < SHDR_MIN_SIZE) {
    throw new ElfError(`ELF section header entry size ${h.shentsize} is smaller than ${SHDR_MIN_SIZE}`);
  }
  const count = sectionCount(r, h);
  r.need(h.shoff, h.shentsize * count, `ELF section header table (${count} entries)`);
  const sections: SectionHeader[] = [];
  for (let i = 0n; i < count; i++) {
    const base = h.shoff + i * h.shentsize;
    const what = `ELF section header ${i}`;
    sections.push({
      index: Number(i),
      type: r.u32(base + 4n, what),
      offset: r.u64(base + 24n, what),
      size: r.u64(base + 32n, what),
      addralign: r.u64(base + 48n, what),
    });
  }
  return sections;
}

// With 0xff00 or more sections e_shnum is 0 and the real count lives in
// sh_size of section 0.
function sectionCount(r: Reader, h: Header): bigint {
  if (h.shnum !== 0) return BigInt(h.shnum);
  return r.u64(h.shoff + 32n, 'ELF section header 0');
}

function sectionNotes(r: Reader, h: Header): ElfNote[] {
  return readSectionHeaders(r, h)
    .filter((sh) => sh.type === SHT.NOTE)
    .flatMap((sh) => parseNotes(r, sh.offset, sh.size, noteAlign(sh.addralign), `ELF section ${sh.index} (NOTE)`));
}

function readInterp(r: Reader, phs: ProgramHeader[]): string | undefined {
  const ph = phs.find((p) => p.type === PT.INTERP);
  if (!ph) return undefined;
  const bytes = r.slice(ph.offset, ph.filesz, `ELF program header ${ph.index} (INTERP)`);
  // Same rule the kernel applies: a non-terminated interpreter path is not
  // executable, so refusing it here beats producing an image that won't boot.
  if (bytes.length < 2 || bytes[bytes.length - 1] !== 0) {
    throw new ElfError(`ELF program header ${ph.index} (INTERP) is not a NUL-terminated path (${bytes.length} bytes)`);
  }
  return cString(bytes);
}

interface DynamicInfo {
  needed: string[];
  soname?: string;
  rpath: string[];
  runpath: string[];
}

type DynEntry = { tag: bigint; val: bigint };

const STRING_TAGS: readonly bigint[] = [DT.NEEDED, DT.SONAME, DT.RPATH, DT.RUNPATH].map(BigInt);
const DT_NAMES = new Map<bigint, string>(Object.entries(DT).map(([k, v]) => [BigInt(v), k]));

function readDynamicEntries(r: Reader, ph: ProgramHeader): DynEntry[] {
  const entries: DynEntry[] = [];
  const count = ph.filesz / DYN_SIZE;
  for (let i = 0n; i < count; i++) {
    const at = ph.offset + i * DYN_SIZE;
    const what = `ELF program header ${ph.index} (DYNAMIC) entry ${i}`;
    const tag = r.u64(at, what);
    if (tag === BigInt(DT.NULL)) break;
    entries.push({ tag, val: r.u64(at + 8n, what) });
  }
  return entries;
}

interface StringTable {
  offset: bigint;
  size: bigint;
}

// DT_STRTAB is a virtual address; only the PT_LOAD mapping says where those
// bytes sit in the file.
function locateStringTable(phs: ProgramHeader[], addr: bigint, strsz: bigint | undefined): StringTable {
  const seg = phs.find((p) => p.type === PT.LOAD && addr >= p.vaddr && addr < p.vaddr + p.filesz);
  if (!seg) {
    throw new ElfError(`DT_STRTAB address ${hex(addr)} is not inside the file data of any PT_LOAD segment`);
  }
  const available = seg.filesz - (addr - seg.vaddr);
  // Without DT_STRSZ the containing segment is the only bound there is.
  const size = strsz ?? available;
  if (size > available) {
    throw new ElfError(
      `dynamic string table at ${hex(addr)} (DT_STRSZ ${hex(size)}) extends past the file data of PT_LOAD segment ${seg.index}`,
    );
  }
  return { offset: seg.offset + (addr - seg.vaddr), size };
}

function readDynString(r: Reader, table: StringTable, index: bigint, tag: bigint): string {
  const tagName = `DT_${DT_NAMES.get(tag) ?? hex(tag)}`;
  if (index >= table.size) {
    throw new ElfError(`${tagName} string offset ${hex(index)} is outside the dynamic string table (size ${hex(table.size)})`);
  }
  const start = r.need(table.offset + index, 0n, `${tagName} string`);
  const end = r.need(table.offset + table.size, 0n, 'dynamic string table');
  const nul = r.bytes.subarray(start, end).indexOf(0);
  if (nul === -1) {
    throw new ElfError(`${tagName} string at offset ${hex(index)} is not NUL-terminated inside the dynamic string table`);
  }
  return utf8.decode(r.bytes.subarray(start, start + nul));
}

const firstValue = (entries: DynEntry[], tag: number): bigint | undefined =>
  entries.find((e) => e.tag === BigInt(tag))?.val;

// An empty DT_RPATH is "no search path", not one empty component.
const splitPath = (s: string): string[] => (s === '' ? [] : s.split(':'));

function readDynamic(r: Reader, phs: ProgramHeader[]): DynamicInfo {
  const info: DynamicInfo = { needed: [], rpath: [], runpath: [] };
  const ph = phs.find((p) => p.type === PT.DYNAMIC);
  if (!ph) return info;
  const entries = readDynamicEntries(r, ph);
  const stringEntries = entries.filter((e) => STRING_TAGS.includes(e.tag));
  if (stringEntries.length === 0) return info;

  const strtab = firstValue(entries, DT.STRTAB);
  if (strtab === undefined) {
    throw new ElfError('dynamic section references strings (DT_NEEDED/DT_SONAME/DT_RPATH/DT_RUNPATH) but has no DT_STRTAB');
  }
  const table = locateStringTable(phs, strtab, firstValue(entries, DT.STRSZ));
  for (const e of stringEntries) {
    const s = readDynString(r, table, e.val, e.tag);
    switch (Number(e.tag)) {
      case DT.NEEDED: info.needed.push(s); break;
      case DT.SONAME: info.soname ??= s; break;
      case DT.RPATH: info.rpath.push(...splitPath(s)); break;
      case DT.RUNPATH: info.runpath.push(...splitPath(s)); break;
    }
  }
  return info;
}

export function parseElf(bytes: Uint8Array): ElfFile {
  const r = new Reader(bytes);
  const h = readHeader(r);
  const programHeaders = readProgramHeaders(r, h);
  const hasNoteSegment = programHeaders.some((p) => p.type === PT.NOTE);
  const notes = hasNoteSegment ? segmentNotes(r, programHeaders) : sectionNotes(r, h);
  const interp = readInterp(r, programHeaders);
  const dyn = readDynamic(r, programHeaders);
  const elf: ElfFile = {
    type: h.type,
    machine: h.machine,
    entry: h.entry,
    programHeaders,
    notes,
    needed: dyn.needed,
    rpath: dyn.rpath,
    runpath: dyn.runpath,
  };
  if (interp !== undefined) elf.interp = interp;
  if (dyn.soname !== undefined) elf.soname = dyn.soname;
  return elf;
}

/** Reads and parses `path`; every error (including I/O) is an ElfError whose message starts with the path. */
export async function readElfFile(path: string): Promise<ElfFile> {
  let bytes: Uint8Array;
  try {
    bytes = await readFile(path);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new ElfError(`${path}: cannot read file: ${reason}`, { cause: err });
  }
  try {
    return parseElf(bytes);
  } catch (err) {
    if (err instanceof ElfError) throw new ElfError(`${path}: ${err.message}`, { cause: err });
    throw err;
  }
}

/**
 * Entry point for PVH boot, from the Xen XEN_ELFNOTE_PHYS32_ENTRY note.
 * Linux emits it as a pointer-sized value, so both 4- and 8-byte forms occur.
 */
export function pvhEntry(elf: ElfFile): bigint | undefined {
  const note = elf.notes.find((n) => n.name === 'Xen' && n.type === XEN_ELFNOTE_PHYS32_ENTRY);
  if (!note) return undefined;
  const d = note.desc;
  const view = new DataView(d.buffer, d.byteOffset, d.byteLength);
  if (d.byteLength === 4) return BigInt(view.getUint32(0, true));
  if (d.byteLength === 8) return view.getBigUint64(0, true);
  throw new ElfError(`Xen PHYS32_ENTRY note has a ${d.byteLength}-byte value (expected 4 or 8)`);
}
