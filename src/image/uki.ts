// Unified Kernel Images: a PE/COFF reader, and a writer that appends the UKI payload sections
// (.osrel .cmdline .initrd .uname .linux) to systemd's EFI stub the way ukify lays them out.
//
// The file is untrusted on the way in: every offset and size comes from a 32-bit field and is
// checked against the file (or the image) before it is used, so a truncated or hostile file can
// only surface as a UkiError. All arithmetic stays below 2^34, well inside a Number's exact range.

import { readFile } from 'node:fs/promises';

export class UkiError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'UkiError';
  }
}

/** Debian's systemd-boot-efi ships the stub here. */
export const DEFAULT_STUB = '/usr/lib/systemd/boot/efi/linuxx64.efi.stub';

export const MACHINE = { I386: 0x14c, AMD64: 0x8664, ARM64: 0xaa64, RISCV64: 0x5064 } as const;

/** Section characteristics used here (PE/COFF "Section Flags"). */
export const SCN = {
  CNT_CODE: 0x20,
  CNT_INITIALIZED_DATA: 0x40,
  CNT_UNINITIALIZED_DATA: 0x80,
  MEM_EXECUTE: 0x20000000,
  MEM_READ: 0x40000000,
  MEM_WRITE: 0x80000000,
} as const;

export interface PeSection {
  index: number;
  name: string;
  virtualAddress: number;
  virtualSize: number;
  rawOffset: number;
  rawSize: number;
  characteristics: number;
}

export interface DataDirectory {
  virtualAddress: number;
  size: number;
}

export interface PeFile {
  machine: number;
  timeDateStamp: number;
  /** COFF file-header characteristics. */
  characteristics: number;
  pointerToSymbolTable: number;
  numberOfSymbols: number;
  sizeOfCode: number;
  sizeOfInitializedData: number;
  addressOfEntryPoint: number;
  sectionAlignment: number;
  fileAlignment: number;
  sizeOfImage: number;
  sizeOfHeaders: number;
  checkSum: number;
  subsystem: number;
  dataDirectories: DataDirectory[];
  /** File offsets of the parts the writer patches. */
  fileHeaderOffset: number;
  optionalHeaderOffset: number;
  sectionTableOffset: number;
  sections: PeSection[];
}

export interface Uki {
  /** The kernel (a bzImage with its own PE header). Views into the file's bytes, not copies. */
  linux: Uint8Array;
  initrd?: Uint8Array;
  cmdline?: string;
  osrel?: string;
  uname?: string;
  sections: PeSection[];
}

export interface UkiOptions {
  /** Path of systemd's EFI stub; DEFAULT_STUB if absent. */
  stub?: string;
  linux: Uint8Array;
  initrd?: Uint8Array;
  cmdline?: string;
  osrel?: string;
  uname?: string;
}

const DOS_HEADER_SIZE = 64;
const E_LFANEW_OFFSET = 0x3c;
const FILE_HEADER_SIZE = 20;
const SECTION_HEADER_SIZE = 40;
const SYMBOL_SIZE = 18;
const PE32PLUS_MAGIC = 0x20b;
const PE32_MAGIC = 0x10b;
/** Optional-header bytes up to and including NumberOfRvaAndSizes (PE32+). */
const PE32PLUS_FIXED_SIZE = 112;
const DATA_DIRECTORY_SIZE = 8;
const DIRECTORY_SECURITY = 4;
const SUBSYSTEM_EFI_APPLICATION = 10;
const FILE_LOCAL_SYMS_STRIPPED = 0x0008;
const U32_LIMIT = 2 ** 32;
/** x86 COMMAND_LINE_SIZE including the NUL: the kernel cuts what is longer. */
const CMDLINE_MAX_BYTES = 2047;

// Offsets inside the PE32+ optional header.
const OPT = {
  magic: 0,
  sizeOfCode: 4,
  sizeOfInitializedData: 8,
  addressOfEntryPoint: 16,
  sectionAlignment: 32,
  fileAlignment: 36,
  sizeOfImage: 56,
  sizeOfHeaders: 60,
  checkSum: 64,
  subsystem: 68,
  numberOfRvaAndSizes: 108,
} as const;

/** The payload sections, in the order ukify writes them: .linux last, so nothing follows the kernel. */
const PAYLOAD_ORDER = ['.osrel', '.cmdline', '.initrd', '.uname', '.linux'] as const;
type PayloadName = (typeof PAYLOAD_ORDER)[number];
/** Every section the UAPI spec gives a meaning; each may appear once (.dtb excepted). */
const UKI_SINGLETONS = new Set<string>([...PAYLOAD_ORDER, '.splash', '.ucode', '.pcrsig', '.pcrpkey', '.sbat-uki', '.fwauto']);

const hex = (n: number): string => `0x${n.toString(16)}`;
const MACHINE_NAMES = new Map<number, string>(Object.entries(MACHINE).map(([k, v]) => [v, k.toLowerCase()]));
const machineName = (m: number): string => `${MACHINE_NAMES.get(m) ?? 'unknown'} (${hex(m)})`;
const isPowerOfTwo = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
const alignUp = (value: number, align: number): number => Math.ceil(value / align) * align;
const utf8 = new TextDecoder('utf-8', { fatal: true });

// What a UEFI loader maps: VirtualSize bytes (raw data cut or zero-filled to fit). A VirtualSize
// of 0 is an old linkers' way of saying "same as SizeOfRawData", and EDK2 honours it.
const memorySize = (s: PeSection): number => (s.virtualSize === 0 ? s.rawSize : s.virtualSize);

/** Bounds-checked little-endian view over the file bytes. */
class Reader {
  private readonly view: DataView;

  constructor(readonly bytes: Uint8Array) {
    // Buffers are often slices of a shared pool, so respect byteOffset.
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get size(): number {
    return this.bytes.byteLength;
  }

  /** Throws unless [offset, offset+size) lies inside the file. */
  need(offset: number, size: number, what: string): number {
    if (!(offset >= 0 && size >= 0 && offset + size <= this.size)) {
      throw new UkiError(
        `${what} extends past the end of the file (offset ${hex(offset)}, size ${hex(size)}, file size ${hex(this.size)}): the file is truncated or not a PE image`,
      );
    }
    return offset;
  }

  u16(offset: number, what: string): number {
    return this.view.getUint16(this.need(offset, 2, what), true);
  }

  u32(offset: number, what: string): number {
    return this.view.getUint32(this.need(offset, 4, what), true);
  }
}

function sectionName(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  // Image files have no string table for long names, so the 8 bytes are the whole name.
  return String.fromCharCode(...(nul === -1 ? bytes : bytes.subarray(0, nul)));
}

function readHeaders(r: Reader): Omit<PeFile, 'sections'> & { numberOfSections: number } {
  if (r.size === 0) throw new UkiError('not a PE image: the file is empty');
  if (r.size < 2 || r.bytes[0] !== 0x4d || r.bytes[1] !== 0x5a) throw new UkiError('not a PE image: no "MZ" signature at offset 0');
  if (r.size < DOS_HEADER_SIZE) throw new UkiError(`not a PE image: truncated DOS header (${r.size} of ${DOS_HEADER_SIZE} bytes)`);
  const peOffset = r.u32(E_LFANEW_OFFSET, 'DOS header');
  r.need(peOffset, 4 + FILE_HEADER_SIZE, `PE header at ${hex(peOffset)} (from e_lfanew)`);
  if (r.u32(peOffset, 'PE signature') !== 0x00004550) {
    throw new UkiError(`not a PE image: no "PE\\0\\0" signature at offset ${hex(peOffset)} (from e_lfanew)`);
  }
  const fh = peOffset + 4;
  const what = 'COFF file header';
  const machine = r.u16(fh, what);
  const numberOfSections = r.u16(fh + 2, what);
  const timeDateStamp = r.u32(fh + 4, what);
  const pointerToSymbolTable = r.u32(fh + 8, what);
  const numberOfSymbols = r.u32(fh + 12, what);
  const sizeOfOptionalHeader = r.u16(fh + 16, what);
  const characteristics = r.u16(fh + 18, what);

  const oh = fh + FILE_HEADER_SIZE;
  if (sizeOfOptionalHeader < 2) throw new UkiError(`not a PE image: optional header is ${sizeOfOptionalHeader} bytes`);
  r.need(oh, sizeOfOptionalHeader, 'optional header');
  const magic = r.u16(oh + OPT.magic, 'optional header');
  if (magic === PE32_MAGIC) throw new UkiError('PE32 (32-bit) image: a UKI for x86-64 is PE32+');
  if (magic !== PE32PLUS_MAGIC) throw new UkiError(`not a PE image: optional header magic ${hex(magic)} (expected ${hex(PE32PLUS_MAGIC)}, PE32+)`);
  if (sizeOfOptionalHeader < PE32PLUS_FIXED_SIZE) {
    throw new UkiError(`PE32+ optional header is ${sizeOfOptionalHeader} bytes, smaller than its fixed part (${PE32PLUS_FIXED_SIZE})`);
  }
  const o = (field: keyof typeof OPT): number => r.u32(oh + OPT[field], 'optional header');
  const numberOfRvaAndSizes = o('numberOfRvaAndSizes');
  if (PE32PLUS_FIXED_SIZE + numberOfRvaAndSizes * DATA_DIRECTORY_SIZE > sizeOfOptionalHeader) {
    throw new UkiError(`optional header claims ${numberOfRvaAndSizes} data directories but has room for ${(sizeOfOptionalHeader - PE32PLUS_FIXED_SIZE) / DATA_DIRECTORY_SIZE}`);
  }
  const dataDirectories: DataDirectory[] = [];
  for (let i = 0; i < numberOfRvaAndSizes; i++) {
    const at = oh + PE32PLUS_FIXED_SIZE + i * DATA_DIRECTORY_SIZE;
    dataDirectories.push({ virtualAddress: r.u32(at, 'data directory'), size: r.u32(at + 4, 'data directory') });
  }
  const headers = {
    machine,
    numberOfSections,
    timeDateStamp,
    characteristics,
    pointerToSymbolTable,
    numberOfSymbols,
    sizeOfCode: o('sizeOfCode'),
    sizeOfInitializedData: o('sizeOfInitializedData'),
    addressOfEntryPoint: o('addressOfEntryPoint'),
    sectionAlignment: o('sectionAlignment'),
    fileAlignment: o('fileAlignment'),
    sizeOfImage: o('sizeOfImage'),
    sizeOfHeaders: o('sizeOfHeaders'),
    checkSum: o('checkSum'),
    subsystem: r.u16(oh + OPT.subsystem, 'optional header'),
    dataDirectories,
    fileHeaderOffset: fh,
    optionalHeaderOffset: oh,
    sectionTableOffset: oh + sizeOfOptionalHeader,
  };
  if (!isPowerOfTwo(headers.fileAlignment)) throw new UkiError(`PE FileAlignment ${hex(headers.fileAlignment)} is not a power of two`);
  if (!isPowerOfTwo(headers.sectionAlignment)) throw new UkiError(`PE SectionAlignment ${hex(headers.sectionAlignment)} is not a power of two`);
  if (headers.sectionAlignment < headers.fileAlignment) {
    throw new UkiError(`PE SectionAlignment ${hex(headers.sectionAlignment)} is smaller than FileAlignment ${hex(headers.fileAlignment)}`);
  }
  return headers;
}

function readSections(r: Reader, h: ReturnType<typeof readHeaders>): PeSection[] {
  r.need(h.sectionTableOffset, h.numberOfSections * SECTION_HEADER_SIZE, `section table (${h.numberOfSections} entries)`);
  const sections: PeSection[] = [];
  for (let i = 0; i < h.numberOfSections; i++) {
    const at = h.sectionTableOffset + i * SECTION_HEADER_SIZE;
    const name = sectionName(r.bytes.subarray(at, at + 8));
    const what = `section header ${i} (${JSON.stringify(name)})`;
    const s: PeSection = {
      index: i,
      name,
      virtualSize: r.u32(at + 8, what),
      virtualAddress: r.u32(at + 12, what),
      rawSize: r.u32(at + 16, what),
      rawOffset: r.u32(at + 20, what),
      characteristics: r.u32(at + 36, what),
    };
    const label = `section ${i} (${JSON.stringify(name)})`;
    if (s.rawSize > 0) r.need(s.rawOffset, s.rawSize, `${label} data`);
    const end = s.virtualAddress + memorySize(s);
    if (end > h.sizeOfImage) {
      throw new UkiError(`${label} ends at ${hex(end)} in memory, past SizeOfImage ${hex(h.sizeOfImage)}`);
    }
    if (s.virtualAddress < h.sizeOfHeaders && end > s.virtualAddress) {
      throw new UkiError(`${label} at ${hex(s.virtualAddress)} overlaps the headers (SizeOfHeaders ${hex(h.sizeOfHeaders)})`);
    }
    sections.push(s);
  }
  // Loaders map sections in table order; overlapping ones overwrite each other (systemd-stub
  // warns "Overlapping PE sections detected"). The spec requires ascending addresses.
  const byAddress = [...sections].filter((s) => memorySize(s) > 0).sort((a, b) => a.virtualAddress - b.virtualAddress);
  for (let i = 1; i < byAddress.length; i++) {
    const prev = byAddress[i - 1];
    const cur = byAddress[i];
    if (prev.virtualAddress + memorySize(prev) > cur.virtualAddress) {
      throw new UkiError(`sections ${JSON.stringify(prev.name)} and ${JSON.stringify(cur.name)} overlap in memory (${hex(prev.virtualAddress)} and ${hex(cur.virtualAddress)})`);
    }
  }
  return sections;
}

/** Reads the headers and section table of a PE32+ image. */
export function readPe(bytes: Uint8Array): PeFile {
  const r = new Reader(bytes);
  const headers = readHeaders(r);
  const sections = readSections(r, headers);
  const { numberOfSections: _, ...rest } = headers;
  return { ...rest, sections };
}

function payloadBytes(bytes: Uint8Array, s: PeSection): Uint8Array {
  // VirtualSize is the payload's true length (SizeOfRawData is rounded up to FileAlignment).
  // A larger VirtualSize would have the loader append zeros: no UKI tool writes that, and a
  // kernel or initrd padded that way is a damaged file, not something to boot.
  if (s.virtualSize > s.rawSize) {
    throw new UkiError(
      `UKI section ${s.name} is ${hex(s.virtualSize)} bytes in memory but only ${hex(s.rawSize)} in the file: the image is damaged`,
    );
  }
  return bytes.subarray(s.rawOffset, s.rawOffset + s.virtualSize);
}

function payloadText(bytes: Uint8Array, s: PeSection): string {
  let data = payloadBytes(bytes, s);
  // Some tools NUL-terminate text sections; the stub stops at the first NUL either way.
  let end = data.length;
  while (end > 0 && data[end - 1] === 0) end--;
  data = data.subarray(0, end);
  try {
    return utf8.decode(data);
  } catch {
    throw new UkiError(`UKI section ${s.name} is not valid UTF-8 text`);
  }
}

/** Parses a UKI held in memory. The returned byte arrays are views into `bytes`. */
export function parseUki(bytes: Uint8Array): Uki {
  const pe = readPe(bytes);
  if (pe.machine !== MACHINE.AMD64) throw new UkiError(`the UKI is for machine ${machineName(pe.machine)}: skiff boots x86-64 (amd64) UKIs only`);
  const found = new Map<string, PeSection>();
  for (const s of pe.sections) {
    if (s.name === '.profile') throw new UkiError('multi-profile UKIs (.profile sections) are not supported');
    if (!UKI_SINGLETONS.has(s.name)) continue;
    const seen = found.get(s.name);
    if (seen) throw new UkiError(`UKI section ${s.name} appears twice (sections ${seen.index} and ${s.index}); it may appear once`);
    found.set(s.name, s);
  }
  const linux = found.get('.linux');
  if (!linux) throw new UkiError('not a UKI: the PE image has no .linux section');
  const uki: Uki = { linux: payloadBytes(bytes, linux), sections: pe.sections };
  if (uki.linux.length === 0) throw new UkiError('the UKI has an empty .linux section');
  const initrd = found.get('.initrd');
  if (initrd) uki.initrd = payloadBytes(bytes, initrd);
  const text = (name: PayloadName): string | undefined => {
    const s = found.get(name);
    return s ? payloadText(bytes, s) : undefined;
  };
  const cmdline = text('.cmdline');
  if (cmdline !== undefined) uki.cmdline = cmdline;
  const osrel = text('.osrel');
  if (osrel !== undefined) uki.osrel = osrel;
  const uname = text('.uname');
  if (uname !== undefined) uki.uname = uname;
  return uki;
}

export async function readUki(file: string): Promise<Uki> {
  let bytes: Buffer;
  try {
    bytes = await readFile(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new UkiError(`${file}: ${code === 'ENOENT' ? 'no such file' : (err as Error).message}`, { cause: err });
  }
  try {
    return parseUki(bytes);
  } catch (err) {
    if (err instanceof UkiError) throw new UkiError(`${file}: ${err.message}`, { cause: err });
    throw err;
  }
}

function checkText(name: string, text: string): Uint8Array {
  if (text.includes('\0')) throw new UkiError(`the ${name} text contains a NUL character`);
  return Buffer.from(text, 'utf8');
}

// systemd-stub widens the .cmdline bytes to UTF-16 one byte per character and the x86 handover
// path blanks everything above 0x7e, so anything but printable ASCII would reach the kernel mangled.
function checkCmdline(cmdline: string): Uint8Array {
  for (let i = 0; i < cmdline.length; i++) {
    const c = cmdline.charCodeAt(i);
    if (c < 0x20 || c > 0x7e) {
      throw new UkiError(`the kernel command line has a non-printable or non-ASCII character (code ${hex(c)}) at offset ${i}: systemd-stub passes printable ASCII only`);
    }
  }
  if (cmdline.length > CMDLINE_MAX_BYTES) {
    throw new UkiError(`the kernel command line is ${cmdline.length} bytes, the x86 limit is ${CMDLINE_MAX_BYTES}`);
  }
  return Buffer.from(cmdline, 'latin1');
}

// Linux x86 boot protocol (Documentation/arch/x86/boot.rst): the setup header of a bzImage.
const BOOT_FLAG_OFFSET = 0x1fe;
const SETUP_MAGIC_OFFSET = 0x202;
const SETUP_VERSION_OFFSET = 0x206;
const XLOADFLAGS_OFFSET = 0x236;
const XLF_EFI_HANDOVER_64 = 1 << 3;

// systemd 252 starts the kernel either as a PE image of its own (a bzImage built with
// CONFIG_EFI_STUB starts with "MZ") or through the EFI handover entry; a vmlinux ELF or a kernel
// without the EFI stub would give a UKI that boots nowhere, so it is refused here.
function checkKernel(linux: Uint8Array): void {
  const view = new DataView(linux.buffer, linux.byteOffset, linux.byteLength);
  if (linux.length < 0x240 || view.getUint16(BOOT_FLAG_OFFSET, true) !== 0xaa55 || view.getUint32(SETUP_MAGIC_OFFSET, true) !== 0x53726448) {
    const elf = linux.length >= 4 && linux[0] === 0x7f && linux[1] === 0x45 && linux[2] === 0x4c && linux[3] === 0x46;
    throw new UkiError(`the kernel is not a bzImage (no "HdrS" setup header${elf ? '; it is an ELF file, probably vmlinux' : ''}): a UKI's .linux must be a bzImage`);
  }
  const hasPe = linux[0] === 0x4d && linux[1] === 0x5a;
  const handover = view.getUint16(SETUP_VERSION_OFFSET, true) >= 0x20c && (view.getUint16(XLOADFLAGS_OFFSET, true) & XLF_EFI_HANDOVER_64) !== 0;
  if (!hasPe && !handover) {
    throw new UkiError('the kernel has no EFI stub (build it with CONFIG_EFI=y and CONFIG_EFI_STUB=y): systemd-stub cannot start it');
  }
}

interface NewSection {
  name: PayloadName;
  data: Uint8Array;
  characteristics: number;
  virtualAddress: number;
  rawOffset: number;
  rawSize: number;
}

/**
 * Old stubs (Debian 12's systemd 252 among them) still carry a COFF symbol table after the last
 * section, which image files should not have. It is dropped when it is the file's tail, as ukify
 * does, so the new sections follow the stub's own data directly.
 */
function symbolTableTail(r: Reader, pe: PeFile, dataEnd: number): number | undefined {
  if (pe.pointerToSymbolTable === 0) return undefined;
  const symbols = pe.pointerToSymbolTable + pe.numberOfSymbols * SYMBOL_SIZE;
  if (pe.pointerToSymbolTable < dataEnd || symbols + 4 > r.size) return undefined;
  const stringTable = r.u32(symbols, 'COFF string table size');
  return symbols + stringTable === r.size ? pe.pointerToSymbolTable : undefined;
}

/** Builds a UKI from the stub's bytes; pure and deterministic (the output depends on the inputs only). */
export function buildUki(stubBytes: Uint8Array, options: Omit<UkiOptions, 'stub'>): Buffer {
  let pe: PeFile;
  try {
    pe = readPe(stubBytes);
  } catch (err) {
    if (err instanceof UkiError) throw new UkiError(`the EFI stub is unusable: ${err.message}`, { cause: err });
    throw err;
  }
  if (pe.machine !== MACHINE.AMD64) throw new UkiError(`the EFI stub is for machine ${machineName(pe.machine)}, not x86-64 (amd64)`);
  if (pe.subsystem !== SUBSYSTEM_EFI_APPLICATION) throw new UkiError(`the EFI stub's subsystem is ${pe.subsystem}, not 10 (EFI application)`);
  const security = pe.dataDirectories[DIRECTORY_SECURITY];
  if (security && (security.virtualAddress !== 0 || security.size !== 0)) {
    throw new UkiError('the EFI stub is signed (it has a certificate table): adding sections would break the signature; use an unsigned stub and sign the UKI');
  }
  for (const s of pe.sections) {
    if (UKI_SINGLETONS.has(s.name) || s.name === '.profile') throw new UkiError(`the EFI stub already has a ${s.name} section: it is a UKI, not a stub`);
  }
  if (!options.linux || options.linux.length === 0) throw new UkiError('the kernel (.linux) is empty');
  checkKernel(options.linux);

  const payload: Record<PayloadName, Uint8Array | undefined> = {
    '.osrel': options.osrel ? checkText('.osrel', options.osrel) : undefined,
    '.cmdline': options.cmdline ? checkCmdline(options.cmdline) : undefined,
    '.initrd': options.initrd && options.initrd.length > 0 ? options.initrd : undefined,
    '.uname': options.uname ? checkText('.uname', options.uname) : undefined,
    '.linux': options.linux,
  };

  const r = new Reader(stubBytes);
  const dataEnd = Math.max(pe.sizeOfHeaders, ...pe.sections.map((s) => (s.rawSize > 0 ? s.rawOffset + s.rawSize : 0)));
  const symbolsAt = symbolTableTail(r, pe, dataEnd);
  const keep = symbolsAt ?? r.size;

  // Lay out: memory after everything the stub maps, file after everything the stub holds.
  let nextAddress = alignUp(Math.max(pe.sizeOfImage, ...pe.sections.map((s) => s.virtualAddress + memorySize(s))), pe.sectionAlignment);
  let nextOffset = alignUp(Math.max(keep, dataEnd), pe.fileAlignment);
  const added: NewSection[] = [];
  for (const name of PAYLOAD_ORDER) {
    const data = payload[name];
    if (!data) continue;
    const rawSize = alignUp(data.length, pe.fileAlignment);
    added.push({
      name,
      data,
      // ukify marks .linux as code: kernels booted through the EFI handover protocol run in place.
      characteristics: name === '.linux' ? SCN.CNT_CODE | SCN.MEM_READ : SCN.CNT_INITIALIZED_DATA | SCN.MEM_READ,
      virtualAddress: nextAddress,
      rawOffset: nextOffset,
      rawSize,
    });
    nextAddress = alignUp(nextAddress + data.length, pe.sectionAlignment);
    nextOffset += rawSize;
  }
  if (nextAddress >= U32_LIMIT || nextOffset >= U32_LIMIT) {
    throw new UkiError(`the UKI would be ${Math.max(nextAddress, nextOffset)} bytes: PE images are limited to 4 GiB`);
  }

  // The new headers go right after the stub's section table, inside the header area. The header
  // area may grow up to the first section's data (ukify rounds SizeOfHeaders up the same way).
  const tableEnd = pe.sectionTableOffset + (pe.sections.length + added.length) * SECTION_HEADER_SIZE;
  const sizeOfHeaders = Math.max(pe.sizeOfHeaders, alignUp(tableEnd, pe.fileAlignment));
  const headerRoom = Math.min(
    ...pe.sections.filter((s) => s.rawSize > 0).map((s) => s.rawOffset),
    ...pe.sections.filter((s) => memorySize(s) > 0).map((s) => s.virtualAddress),
  );
  if (sizeOfHeaders > headerRoom) {
    throw new UkiError(
      `the EFI stub has no room for ${added.length} more section headers (the headers would end at ${hex(sizeOfHeaders)}, the first section starts at ${hex(headerRoom)})`,
    );
  }
  const tableStart = pe.sectionTableOffset + pe.sections.length * SECTION_HEADER_SIZE;
  if (stubBytes.subarray(tableStart, tableEnd).some((b) => b !== 0)) {
    throw new UkiError(`the EFI stub has data right after its section table (at ${hex(tableStart)}), where the new section headers must go`);
  }

  const out = Buffer.alloc(nextOffset);
  out.set(stubBytes.subarray(0, keep), 0);
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const fh = pe.fileHeaderOffset;
  const oh = pe.optionalHeaderOffset;
  view.setUint16(fh + 2, pe.sections.length + added.length, true);
  if (symbolsAt !== undefined) {
    view.setUint32(fh + 8, 0, true);
    view.setUint32(fh + 12, 0, true);
    view.setUint16(fh + 18, pe.characteristics | FILE_LOCAL_SYMS_STRIPPED, true);
  }
  let sizeOfCode = pe.sizeOfCode;
  let sizeOfInitializedData = pe.sizeOfInitializedData;
  for (const [i, s] of added.entries()) {
    const at = tableStart + i * SECTION_HEADER_SIZE;
    out.write(s.name, at, 8, 'latin1');
    view.setUint32(at + 8, s.data.length, true);
    view.setUint32(at + 12, s.virtualAddress, true);
    view.setUint32(at + 16, s.rawSize, true);
    view.setUint32(at + 20, s.rawOffset, true);
    view.setUint32(at + 36, s.characteristics, true);
    out.set(s.data, s.rawOffset);
    if (s.characteristics & SCN.CNT_CODE) sizeOfCode += s.rawSize;
    else sizeOfInitializedData += s.rawSize;
  }
  const last = added[added.length - 1];
  view.setUint32(oh + OPT.sizeOfCode, Math.min(sizeOfCode, U32_LIMIT - 1), true);
  view.setUint32(oh + OPT.sizeOfInitializedData, Math.min(sizeOfInitializedData, U32_LIMIT - 1), true);
  view.setUint32(oh + OPT.sizeOfImage, alignUp(last.virtualAddress + last.data.length, pe.sectionAlignment), true);
  view.setUint32(oh + OPT.sizeOfHeaders, sizeOfHeaders, true);
  // UEFI loaders ignore the checksum; zero says "not computed" rather than carrying a stale one.
  view.setUint32(oh + OPT.checkSum, 0, true);
  return out;
}

/** Builds a UKI from systemd's EFI stub and the payload. Byte-for-byte reproducible. */
export async function writeUki(options: UkiOptions): Promise<Buffer> {
  const stub = options.stub ?? DEFAULT_STUB;
  let stubBytes: Buffer;
  try {
    stubBytes = await readFile(stub);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const hint = code === 'ENOENT' && stub === DEFAULT_STUB ? ': install it with "apt-get install systemd-boot-efi"' : '';
    throw new UkiError(`EFI stub ${stub}: ${code === 'ENOENT' ? 'no such file' : (err as Error).message}${hint}`, { cause: err });
  }
  return buildUki(stubBytes, options);
}
