// Tells what a kernel file is: an ELF vmlinux (with or without a PVH entry) or a bzImage, and its
// version. Reads only what it needs, with every offset checked against the file's size.
import { promises as fs } from 'node:fs';
import { ElfError, parseElf, pvhEntry } from '../elf/elf.js';

export class KernelFileError extends Error {}

export interface KernelInfo {
  path: string;
  format: 'elf' | 'bzimage';
  /** e.g. "6.1.192-skiff", from the kernel's own version string. */
  version?: string;
  /** Guest-physical PVH entry point (Xen ELF note 18), ELF only. */
  pvhEntry?: bigint;
  /** bzImage boot protocol version, e.g. "2.15". */
  bootProtocol?: string;
  size: number;
}

const ELF_MAGIC = Buffer.from([0x7f, 0x45, 0x4c, 0x46]);
// Linux x86 boot protocol (Documentation/x86/boot.rst): setup header fields at fixed offsets.
const HDR_MAGIC_OFFSET = 0x202; // "HdrS"
const HDR_VERSION_OFFSET = 0x206;
const HDR_KERNEL_VERSION_OFFSET = 0x20e; // pointer to the version string, minus 0x200
const BOOT_FLAG_OFFSET = 0x1fe; // 0xAA55

/**
 * With `version: false` only the parts that say how to boot the file are read (the ELF headers and
 * notes, or the bzImage setup header), not the whole 20+ MiB: this is on every boot's path.
 */
export async function inspectKernel(file: string, options: { version?: boolean } = {}): Promise<KernelInfo> {
  let bytes: Buffer;
  try {
    bytes = options.version === false ? await readBootParts(file) : await fs.readFile(file);
  } catch (err) {
    throw new KernelFileError(`cannot read kernel ${file}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
  }
  if (bytes.subarray(0, 4).equals(ELF_MAGIC)) return inspectElf(file, bytes);
  if (bytes.length > HDR_KERNEL_VERSION_OFFSET + 2 && bytes.toString('latin1', HDR_MAGIC_OFFSET, HDR_MAGIC_OFFSET + 4) === 'HdrS' && bytes.readUInt16LE(BOOT_FLAG_OFFSET) === 0xaa55) {
    return inspectBzImage(file, bytes);
  }
  throw new KernelFileError(`${file} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)`);
}

/** Program header types whose bytes the ELF reader looks at. */
const PT_DYNAMIC = 2;
const PT_INTERP = 3;
const PT_NOTE = 4;
const SETUP_HEADER_BYTES = 0x1000;

/**
 * The file's size in a buffer with only the headers and the note/interp segments read in, so the ELF
 * reader's bounds checks see the real file size. The buffer is not zero-filled (that alone cost
 * ~5 ms per boot for a 25 MB vmlinux): it is used as is only when the reader is known to look at
 * nothing else — a PT_NOTE segment present (so no section headers are read) and no PT_DYNAMIC (whose
 * strings live in PT_LOAD data). Anything else is read whole.
 */
async function readBootParts(file: string): Promise<Buffer> {
  const fh = await fs.open(file, 'r');
  try {
    const { size } = await fh.stat();
    const whole = async () => {
      const all = Buffer.alloc(size);
      await fh.read(all, 0, size, 0);
      return all;
    };
    const buf = Buffer.allocUnsafeSlow(size);
    const readRange = async (offset: number, length: number) => {
      if (offset < 0 || length <= 0 || offset >= size) return;
      await fh.read(buf, offset, Math.min(length, size - offset), offset);
    };
    await readRange(0, SETUP_HEADER_BYTES);
    if (size < 64 || !buf.subarray(0, 4).equals(ELF_MAGIC)) return size <= SETUP_HEADER_BYTES ? buf.subarray(0, size) : whole();
    const phoff = Number(buf.readBigUInt64LE(32));
    const phentsize = buf.readUInt16LE(54);
    const phnum = buf.readUInt16LE(56);
    if (phentsize < 56 || !Number.isSafeInteger(phoff) || phoff + phentsize * phnum > size) return whole(); // parseElf will say what is wrong
    await readRange(phoff, phentsize * phnum);
    let notes = false;
    for (let i = 0; i < phnum; i++) {
      const at = phoff + i * phentsize;
      const type = buf.readUInt32LE(at);
      if (type === PT_DYNAMIC) return whole();
      if (type !== PT_NOTE && type !== PT_INTERP) continue;
      notes ||= type === PT_NOTE;
      const offset = Number(buf.readBigUInt64LE(at + 8));
      const filesz = Number(buf.readBigUInt64LE(at + 32));
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(filesz)) return whole();
      await readRange(offset, filesz);
    }
    return notes ? buf : whole();
  } finally {
    await fh.close();
  }
}

function inspectElf(file: string, bytes: Buffer): KernelInfo {
  try {
    const elf = parseElf(bytes);
    return { path: file, format: 'elf', version: findVersionString(bytes), pvhEntry: pvhEntry(elf), size: bytes.length };
  } catch (err) {
    if (err instanceof ElfError) throw new KernelFileError(`${file} is not a usable vmlinux: ${err.message}`);
    throw err;
  }
}

function inspectBzImage(file: string, bytes: Buffer): KernelInfo {
  const protocol = bytes.readUInt16LE(HDR_VERSION_OFFSET);
  const pointer = bytes.readUInt16LE(HDR_KERNEL_VERSION_OFFSET);
  let version: string | undefined;
  const start = pointer + 0x200;
  if (pointer !== 0 && start < bytes.length) {
    const end = bytes.indexOf(0, start);
    const text = bytes.toString('latin1', start, end < 0 ? Math.min(bytes.length, start + 256) : Math.min(end, start + 256));
    version = text.split(' ')[0] || undefined;
  }
  return { path: file, format: 'bzimage', version, bootProtocol: `${protocol >> 8}.${String(protocol & 0xff).padStart(2, '0')}`, size: bytes.length };
}

/** vmlinux carries "Linux version X (...)" in its read-only data; the banner is the only source. */
function findVersionString(bytes: Buffer): string | undefined {
  const marker = Buffer.from('Linux version ');
  for (let at = bytes.indexOf(marker); at >= 0; at = bytes.indexOf(marker, at + 1)) {
    const start = at + marker.length;
    const end = bytes.indexOf(0x20, start);
    if (end < 0 || end - start > 64) continue;
    const version = bytes.toString('latin1', start, end);
    // The banner is a format string in some builds ("%s"); only a real version counts.
    if (/^\d+\.\d+/.test(version)) return version;
  }
  return undefined;
}
