/**
 * Streaming writer for cpio "newc" archives (SVR4, magic 070701, no CRC), the
 * format the Linux kernel unpacks as initramfs.
 *
 * Reference: Documentation/driver-api/early-userspace/buffer-format.rst and
 * usr/gen_init_cpio.c in the kernel tree. For equivalent input this writer
 * produces the same bytes as gen_init_cpio, except that c_devmajor/c_devminor
 * are 0 (gen_init_cpio writes a meaningless 3:1) and symlink targets carry no
 * trailing NUL (matching GNU cpio; the kernel adds the NUL itself).
 *
 * Choices:
 * - The root may be given as "/" or "." and is written as "." (what
 *   `find . | cpio -o` emits). The kernel's mkdir(".") fails harmlessly and it
 *   then applies the entry's owner and mode to the rootfs root; GNU cpio does
 *   the same to the extraction directory.
 * - Parent directories are not created implicitly unless the writer is built
 *   with `createParents: true`. Without it nothing is checked either, because
 *   an initramfs may be several concatenated archives and the parent may live
 *   in an earlier one. Entries are written in the order they were added and
 *   the kernel needs a parent before its children.
 * - A path whose parent was added as a non-directory, non-symlink entry is
 *   rejected: no unpacker could ever create it.
 * - Metadata never comes from the host: hostFile content is read at write
 *   time, but its mode/owner/mtime come from `meta` and the writer defaults,
 *   so that the same calls always give the same bytes.
 * - Hard links are not supported; every non-directory has nlink 1, which the
 *   kernel documents as the way to keep concatenated archives independent.
 */
import { createHash, randomBytes } from 'node:crypto';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { Readable } from 'node:stream';

export class CpioError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CpioError';
  }
}

export interface EntryMeta {
  /** Permission bits incl. setuid/setgid/sticky. Defaults: 0o755 dirs, 0o777 symlinks, 0o644 everything else. */
  mode?: number;
  uid?: number;
  gid?: number;
  /** Seconds since the epoch; defaults to the writer's mtime. */
  mtime?: number;
}

export interface CpioWriterOptions {
  /** mtime for entries that give none. Default 0, for reproducible output. */
  mtime?: number;
  /** Add missing ancestor directories (0o755, root:root, default mtime) before an entry. Default false. */
  createParents?: boolean;
}

const S_IFMT = 0o170000;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
const S_IFBLK = 0o060000;
const S_IFIFO = 0o010000;

const MAGIC = '070701';
const HEADER_LEN = 110;
const U32_MAX = 0xffffffff;
/** c_filesize is 8 hex digits. */
export const MAX_FILE_SIZE = U32_MAX;
/** The kernel skips entries whose c_namesize (incl. NUL) exceeds PATH_MAX, and symlink bodies longer than it. */
const PATH_MAX = 4096;
/** (uid_t)-1 means "leave unchanged" to chown(2), so it cannot be a real owner. */
const MAX_ID = U32_MAX - 1;
/** The kernel builds the device number with MKDEV: 12 bits of major, 20 of minor. */
const MAX_MAJOR = 0xfff;
const MAX_MINOR = 0xfffff;
/** Where gen_init_cpio starts numbering; any fixed value keeps output reproducible. */
const FIRST_INO = 721;
/** cpio(1) and gen_init_cpio pad the archive to whole 512-byte blocks. */
const BLOCK = 512;
const READ_CHUNK = 256 * 1024;

type Body =
  | { kind: 'none' }
  | { kind: 'bytes'; data: Uint8Array }
  | { kind: 'host'; hostPath: string };

interface Entry {
  name: string;
  ino: number;
  mode: number; // including the S_IFMT type bits
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  rdevMajor: number;
  rdevMinor: number;
  body: Body;
}

interface HeaderFields {
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  filesize: number;
  rdevMajor: number;
  rdevMinor: number;
  name: string;
}

export class CpioWriter {
  private readonly defaultMtime: number;
  private readonly createParents: boolean;
  private readonly entries: Entry[] = [];
  private readonly byName = new Map<string, Entry>();
  private nextIno = FIRST_INO;
  private streamed = false;

  constructor(options: CpioWriterOptions = {}) {
    this.defaultMtime = options.mtime === undefined ? 0 : checkRange('default mtime', options.mtime, 0, U32_MAX, 'CpioWriter');
    this.createParents = options.createParents ?? false;
  }

  dir(path: string, meta: EntryMeta = {}): void {
    this.add(path, S_IFDIR, 0o755, meta, { kind: 'none' });
  }

  file(path: string, data: Uint8Array | string, meta: EntryMeta = {}): void {
    const bytes = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    if (bytes.byteLength > MAX_FILE_SIZE) {
      throw new CpioError(`${path}: ${bytes.byteLength} bytes is too big for newc cpio (max ${MAX_FILE_SIZE}, 4 GiB - 1)`);
    }
    this.add(path, S_IFREG, 0o644, meta, { kind: 'bytes', data: bytes });
  }

  /** Content is read from hostPath when the archive is written, not now. */
  hostFile(path: string, hostPath: string, meta: EntryMeta = {}): void {
    if (typeof hostPath !== 'string' || hostPath === '' || hostPath.includes('\0')) {
      throw new CpioError(`${path}: invalid host path ${JSON.stringify(hostPath)}`);
    }
    this.add(path, S_IFREG, 0o644, meta, { kind: 'host', hostPath });
  }

  symlink(path: string, target: string, meta: EntryMeta = {}): void {
    const data = Buffer.from(target, 'utf8');
    // The kernel rejects an empty symlink body; it appends the NUL itself.
    if (target === '' || target.includes('\0') || data.length >= PATH_MAX) {
      throw new CpioError(`${path}: invalid symlink target ${JSON.stringify(target.slice(0, 80))} (must be 1..${PATH_MAX - 1} bytes without NUL)`);
    }
    this.add(path, S_IFLNK, 0o777, meta, { kind: 'bytes', data });
  }

  charDevice(path: string, major: number, minor: number, meta: EntryMeta = {}): void {
    this.add(path, S_IFCHR, 0o644, meta, { kind: 'none' }, checkDevice(path, major, minor));
  }

  blockDevice(path: string, major: number, minor: number, meta: EntryMeta = {}): void {
    this.add(path, S_IFBLK, 0o644, meta, { kind: 'none' }, checkDevice(path, major, minor));
  }

  fifo(path: string, meta: EntryMeta = {}): void {
    this.add(path, S_IFIFO, 0o644, meta, { kind: 'none' });
  }

  /** The archive bytes, produced lazily with backpressure. Only one of stream/toBuffer/writeTo, once. */
  stream(): Readable {
    if (this.streamed) throw new CpioError('CpioWriter can only be streamed once');
    this.streamed = true;
    return Readable.from(this.generate(), { objectMode: false });
  }

  async toBuffer(): Promise<Buffer> {
    const chunks: Buffer[] = [];
    for await (const chunk of this.stream()) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  }

  /** Writes to a temp file beside `path` and renames it, so readers never see a partial archive. */
  async writeTo(path: string): Promise<{ bytes: number; sha256: string }> {
    const source = this.stream();
    const tmp = `${path}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
    const hash = createHash('sha256');
    let bytes = 0;
    let fh: FileHandle | undefined;
    let created = false;
    try {
      fh = await open(tmp, 'wx', 0o644);
      created = true;
      for await (const chunk of source) {
        const buf = chunk as Buffer;
        hash.update(buf);
        bytes += buf.length;
        await writeAll(fh, buf);
      }
      await fh.sync();
      await fh.close();
      fh = undefined;
      await rename(tmp, path);
    } catch (err) {
      source.destroy();
      await fh?.close().catch(() => undefined);
      if (created) await unlink(tmp).catch(() => undefined);
      throw err;
    }
    return { bytes, sha256: hash.digest('hex') };
  }

  private add(path: string, type: number, defaultPerm: number, meta: EntryMeta, body: Body, rdev: [number, number] = [0, 0]): void {
    if (this.streamed) throw new CpioError(`${path}: cannot add entries after the archive has been streamed`);
    const name = normalizePath(path);
    const entry: Entry = {
      name,
      ino: 0,
      mode: type | permBits(name, type, meta.mode, defaultPerm),
      uid: meta.uid === undefined ? 0 : checkRange('uid', meta.uid, 0, MAX_ID, name),
      gid: meta.gid === undefined ? 0 : checkRange('gid', meta.gid, 0, MAX_ID, name),
      // gen_init_cpio and GNU cpio both give directories nlink 2.
      nlink: type === S_IFDIR ? 2 : 1,
      mtime: meta.mtime === undefined ? this.defaultMtime : checkRange('mtime', meta.mtime, 0, U32_MAX, name),
      rdevMajor: rdev[0],
      rdevMinor: rdev[1],
      body,
    };
    if (this.byName.has(name)) throw new CpioError(`duplicate path in cpio archive: ${name}`);
    this.checkAncestors(name);
    this.push(entry);
  }

  private checkAncestors(name: string): void {
    for (const ancestor of ancestorsOf(name)) {
      const existing = this.byName.get(ancestor);
      if (existing) {
        const type = existing.mode & S_IFMT;
        if (type !== S_IFDIR && type !== S_IFLNK) {
          throw new CpioError(`${name}: parent ${ancestor} was added as a non-directory`);
        }
      } else if (this.createParents) {
        this.push(this.implicitDir(ancestor));
      }
    }
  }

  private implicitDir(name: string): Entry {
    return {
      name, ino: 0, mode: S_IFDIR | 0o755, uid: 0, gid: 0, nlink: 2, mtime: this.defaultMtime,
      rdevMajor: 0, rdevMinor: 0, body: { kind: 'none' },
    };
  }

  private push(entry: Entry): void {
    // Inodes are handed out only once an entry is accepted, so a rejected call leaves no gap.
    entry.ino = this.nextIno++;
    this.entries.push(entry);
    this.byName.set(entry.name, entry);
  }

  private async *generate(): AsyncGenerator<Buffer> {
    let offset = 0;
    for (const entry of this.entries) {
      for await (const chunk of entryChunks(entry)) {
        offset += chunk.length;
        yield chunk;
      }
    }
    const trailer = encodeHeader({
      ino: 0, mode: 0, uid: 0, gid: 0, nlink: 1, mtime: 0, filesize: 0, rdevMajor: 0, rdevMinor: 0, name: 'TRAILER!!!',
    });
    offset += trailer.length;
    yield Buffer.concat([trailer, Buffer.alloc(padTo(offset, BLOCK))]);
  }
}

async function* entryChunks(entry: Entry): AsyncGenerator<Buffer> {
  const { body } = entry;
  if (body.kind === 'host') {
    yield* hostFileChunks(entry, body.hostPath);
    return;
  }
  const data = body.kind === 'bytes' ? body.data : new Uint8Array(0);
  const header = encodeHeader(headerFields(entry, data.byteLength));
  yield Buffer.concat([header, data, Buffer.alloc(padTo(data.byteLength, 4))]);
}

async function* hostFileChunks(entry: Entry, hostPath: string): AsyncGenerator<Buffer> {
  const what = `${entry.name} (host file ${hostPath})`;
  let fh: FileHandle;
  try {
    fh = await open(hostPath, 'r');
  } catch (err) {
    throw new CpioError(`${what}: cannot open: ${(err as Error).message}`, { cause: err });
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new CpioError(`${what}: not a regular file`);
    if (st.size > MAX_FILE_SIZE) {
      throw new CpioError(`${what}: ${st.size} bytes is too big for newc cpio (max ${MAX_FILE_SIZE}, 4 GiB - 1)`);
    }
    yield encodeHeader(headerFields(entry, st.size));
    yield* readExactly(fh, st.size, what);
    yield Buffer.alloc(padTo(st.size, 4));
  } finally {
    await fh.close();
  }
}

/** The header already promised `size` bytes, so any change in size would corrupt the archive. */
async function* readExactly(fh: FileHandle, size: number, what: string): AsyncGenerator<Buffer> {
  let done = 0;
  while (done < size) {
    // A fresh buffer per chunk: the stream may still hold the previous one.
    const buf = Buffer.allocUnsafe(Math.min(READ_CHUNK, size - done));
    const { bytesRead } = await fh.read(buf, 0, buf.length, done);
    if (bytesRead === 0) {
      throw new CpioError(`${what}: file changed size while being archived (shrank from ${size} to ${done} bytes)`);
    }
    done += bytesRead;
    yield bytesRead === buf.length ? buf : buf.subarray(0, bytesRead);
  }
  const probe = await fh.read(Buffer.alloc(1), 0, 1, size);
  if (probe.bytesRead > 0) {
    throw new CpioError(`${what}: file changed size while being archived (grew beyond ${size} bytes)`);
  }
}

function headerFields(entry: Entry, filesize: number): HeaderFields {
  return {
    ino: entry.ino, mode: entry.mode, uid: entry.uid, gid: entry.gid, nlink: entry.nlink, mtime: entry.mtime,
    filesize, rdevMajor: entry.rdevMajor, rdevMinor: entry.rdevMinor, name: entry.name,
  };
}

/** Header, NUL-terminated name and the padding that aligns the data to 4 bytes. */
function encodeHeader(f: HeaderFields): Buffer {
  const name = Buffer.from(f.name + '\0', 'utf8');
  const fields = [
    f.ino, f.mode, f.uid, f.gid, f.nlink, f.mtime, f.filesize,
    0, 0, // c_devmajor/c_devminor: only used for hard-link matching, which we never trigger
    f.rdevMajor, f.rdevMinor, name.length,
    0, // c_check: unused with magic 070701
  ];
  const header = Buffer.from(MAGIC + fields.map(hex8).join(''), 'ascii');
  return Buffer.concat([header, name, Buffer.alloc(padTo(HEADER_LEN + name.length, 4))]);
}

function hex8(n: number): string {
  // Upper case like gen_init_cpio; the kernel and GNU cpio accept either.
  return n.toString(16).toUpperCase().padStart(8, '0');
}

function padTo(offset: number, align: number): number {
  return (align - (offset % align)) % align;
}

/** "/", ".", "./" → "."; "/bin//sh/" → "bin/sh". */
export function normalizePath(path: string): string {
  if (typeof path !== 'string' || path === '') throw new CpioError('empty path in cpio archive');
  if (path.includes('\0')) throw new CpioError(`path contains NUL: ${JSON.stringify(path)}`);
  const parts = path.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw new CpioError(`path must not contain '..' components: ${path}`);
  const name = parts.length === 0 ? '.' : parts.join('/');
  if (Buffer.byteLength(name, 'utf8') + 1 > PATH_MAX) {
    throw new CpioError(`path too long for the kernel's unpacker (max ${PATH_MAX - 1} bytes): ${name.slice(0, 80)}...`);
  }
  return name;
}

function ancestorsOf(name: string): string[] {
  const parts = name.split('/');
  const out: string[] = [];
  for (let i = 1; i < parts.length; i++) out.push(parts.slice(0, i).join('/'));
  return out;
}

/** Accepts bare permission bits, or a full st_mode whose type matches the entry (handy with fs.stat). */
function permBits(name: string, type: number, mode: number | undefined, defaultPerm: number): number {
  if (mode === undefined) return defaultPerm;
  checkRange('mode', mode, 0, 0o177777, name);
  const givenType = mode & S_IFMT;
  if (givenType !== 0 && givenType !== type) {
    throw new CpioError(`${name}: mode 0o${mode.toString(8)} has file type bits that do not match the entry type`);
  }
  return mode & 0o7777;
}

function checkDevice(path: string, major: number, minor: number): [number, number] {
  return [checkRange('device major', major, 0, MAX_MAJOR, path), checkRange('device minor', minor, 0, MAX_MINOR, path)];
}

function checkRange(what: string, value: number, min: number, max: number, name: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new CpioError(`${name}: ${what} ${String(value)} out of range (must be an integer ${min}..${max})`);
  }
  return value;
}

async function writeAll(fh: FileHandle, buf: Buffer): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off);
    off += bytesWritten;
  }
}

export interface CpioListing {
  path: string;
  kind: 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo' | 'socket' | 'other';
  mode: number;
  size: number;
}

const KIND_BY_TYPE = new Map<number, CpioListing['kind']>([
  [S_IFREG, 'file'], [S_IFDIR, 'dir'], [S_IFLNK, 'symlink'], [S_IFCHR, 'char'], [S_IFBLK, 'block'], [S_IFIFO, 'fifo'], [0o140000, 'socket'],
]);

/**
 * Lists a newc archive (what `skiff inspect` shows of an initrd). The bytes may come from an image
 * someone else built, so every header field and size is checked against the buffer.
 */
export function listCpio(bytes: Uint8Array): CpioListing[] {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: CpioListing[] = [];
  let off = 0;
  for (;;) {
    if (off + HEADER_LEN > buf.length) throw new CpioError(`cpio archive ends inside a header at byte ${off}`);
    const magic = buf.toString('latin1', off, off + 6);
    if (magic !== MAGIC) throw new CpioError(`not a newc cpio archive: bad magic at byte ${off}`);
    const field = (i: number): number => {
      const text = buf.toString('latin1', off + 6 + 8 * i, off + 14 + 8 * i);
      if (!/^[0-9a-fA-F]{8}$/.test(text)) throw new CpioError(`cpio header at byte ${off}: field ${i} is not hex`);
      return parseInt(text, 16);
    };
    const mode = field(1);
    const filesize = field(6);
    const namesize = field(11);
    const nameStart = off + HEADER_LEN;
    if (namesize === 0 || namesize > PATH_MAX || nameStart + namesize > buf.length) throw new CpioError(`cpio header at byte ${off}: bad name size ${namesize}`);
    const name = buf.toString('utf8', nameStart, nameStart + namesize - 1);
    const dataStart = nameStart + namesize + padTo(HEADER_LEN + namesize, 4);
    if (name === 'TRAILER!!!') return out;
    if (dataStart + filesize > buf.length) throw new CpioError(`cpio entry ${name}: ${filesize} bytes of data run past the end of the archive`);
    out.push({ path: name, kind: KIND_BY_TYPE.get(mode & S_IFMT) ?? 'other', mode: mode & 0o7777, size: filesize });
    off = dataStart + filesize + padTo(filesize, 4);
  }
}
