// The files a dynamic program needs to run: itself, its ELF interpreter and the DT_NEEDED closure,
// each library found the way glibc's ld.so (2.36, Debian 12) finds it, so that the guest's own ld.so
// later walks the same paths to the same files.
//
// Choices:
// - Libraries come from /etc/ld.so.cache, never from /etc/ld.so.conf. ld.so itself never reads
//   ld.so.conf; the cache is its whole view of it, so a library installed without running ldconfig is
//   invisible to ld.so and a stale cache entry is what it follows. Reading the cache gives the same
//   answer as ldd, which the tests use as the reference.
// - The guest gets no ld.so.cache. A library the host found through the cache in a directory the
//   guest's ld.so does not search by default (an ld.so.conf.d entry like /usr/local/lib) gets a
//   symlink in the first default directory, so the guest resolves the name to the same file.
// - glibc-hwcaps and legacy hwcaps subdirectories (x86-64-v3/, tls/, x86_64/) are not searched, and
//   cache entries for them are skipped: which one ld.so picks depends on the CPU that runs the program,
//   and the guest's CPU need not be the host's. The baseline library beside them runs on any CPU.
// - Every symlink met on the way is kept as a symlink at its own path (/lib64 → usr/lib64,
//   libfoo.so.1 → libfoo.so.1.2.3), plus the real file, so the guest tree has the host's shape;
//   on a usr-merged host (Debian 12) that includes /lib → usr/lib and friends.
// - LD_LIBRARY_PATH and LD_PRELOAD are ignored: they describe the host user's session, not the
//   program. Relative RPATH/RUNPATH entries (which depend on the working directory) are skipped, as is
//   DF_1_NODEFLIB (no program on Debian sets it).
// - Libraries may also come from a FileSet of unpacked packages (the `packages` option): every lookup
//   is first done completely in the packages' tree and only then on the host, so a package always
//   provides its own libraries and the host fills in the rest.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { EM, ElfError, parseElf, type ElfFile } from '../elf/elf.js';
import { FileSet, type FileEntry } from './fileset.js';

export class ClosureError extends Error {}

export interface ClosureOptions {
  /** Adds into this set (and returns it) instead of a new one. */
  into?: FileSet;
  /** Unpacked packages (guest paths, usr-merged): searched before the host for every library. */
  packages?: FileSet;
}

/** What one machine's ld.so (Debian's glibc) knows about where libraries live. */
interface MachineInfo {
  triplet: string;
  platform: string;
  /** ld.so.cache entry flags that ld.so accepts for this machine (FLAG_ELF_LIBC6 | the machine's flag). */
  cacheFlags: number;
}

const MACHINES = new Map<number, MachineInfo>([
  [EM.X86_64, { triplet: 'x86_64-linux-gnu', platform: 'x86_64', cacheFlags: 0x0303 }],
  [EM.AARCH64, { triplet: 'aarch64-linux-gnu', platform: 'aarch64', cacheFlags: 0x0a03 }],
]);

const ELFCLASS64 = 2;
const MAX_SYMLINKS = 40; // the kernel's limit, so a loop fails here as it would there

/** ld.so's system search path on Debian (`ld.so --help`), without the leading slash. */
function defaultDirs(m: MachineInfo): string[] {
  return [`lib/${m.triplet}`, `usr/lib/${m.triplet}`, 'lib', 'usr/lib'];
}

// ---------------------------------------------------------------------------------------------
// Trees: the host's filesystem, or a FileSet of unpacked packages, walked the same way.

type Node =
  | { kind: 'file'; source: string; mode: number }
  | { kind: 'symlink'; target: string }
  | { kind: 'dir' }
  | { kind: 'other' };

interface Tree {
  /** Looks up a guest path (no leading slash) without following a final symlink. */
  lookup(p: string): Promise<Node | undefined>;
  /** The entry to put into the guest set for a path this tree holds. */
  entry(p: string, node: Node, origin: string): FileEntry;
  /** Searched through the host's ld.so.cache. */
  readonly usesCache: boolean;
}

class HostTree implements Tree {
  readonly usesCache = true;

  async lookup(p: string): Promise<Node | undefined> {
    const full = `/${p}`;
    let st;
    try {
      st = await fs.lstat(full);
    } catch {
      return undefined;
    }
    if (st.isSymbolicLink()) return { kind: 'symlink', target: await fs.readlink(full) };
    if (st.isDirectory()) return { kind: 'dir' };
    if (st.isFile()) return { kind: 'file', source: full, mode: st.mode & 0o7777 };
    return { kind: 'other' };
  }

  entry(p: string, node: Node, origin: string): FileEntry {
    if (node.kind === 'symlink') return { kind: 'symlink', path: p, target: node.target, origin };
    if (node.kind === 'file') return { kind: 'file', path: p, mode: node.mode, source: node.source, origin };
    throw new ClosureError(`/${p}: not a file or symlink`);
  }
}

class FileSetTree implements Tree {
  readonly usesCache = false;
  private readonly dirs = new Set<string>();

  constructor(private readonly set: FileSet) {
    for (const e of set.list()) {
      const parts = e.path.split('/');
      for (let i = 1; i < parts.length; i++) this.dirs.add(parts.slice(0, i).join('/'));
    }
  }

  async lookup(p: string): Promise<Node | undefined> {
    const e = this.set.get(p);
    if (!e) return this.dirs.has(p) ? { kind: 'dir' } : undefined;
    switch (e.kind) {
      case 'symlink': return { kind: 'symlink', target: e.target };
      case 'dir': return { kind: 'dir' };
      case 'file': return 'source' in e ? { kind: 'file', source: e.source, mode: e.mode } : { kind: 'other' };
      default: return { kind: 'other' };
    }
  }

  entry(p: string): FileEntry {
    const e = this.set.get(p);
    if (!e) throw new ClosureError(`/${p}: not in the package set`);
    return e;
  }
}

interface Walked {
  /** The real path (no symlinks left), no leading slash. */
  real: string;
  node: Node & { kind: 'file' };
  /** Every symlink passed on the way, as [path, node]. */
  links: [string, Node][];
}

/** Resolves an absolute path inside a tree like the kernel does; undefined unless it ends at a file. */
async function walk(tree: Tree, absPath: string): Promise<Walked | undefined> {
  let pending = absPath.split('/');
  const done: string[] = [];
  const links: [string, Node][] = [];
  let hops = 0;
  let node: Node | undefined = { kind: 'dir' };
  while (pending.length > 0) {
    const c = pending.shift()!;
    if (c === '' || c === '.') continue;
    if (node.kind !== 'dir') return undefined; // ENOTDIR
    if (c === '..') {
      done.pop();
      continue;
    }
    const p = [...done, c].join('/');
    node = await tree.lookup(p);
    if (!node) return undefined;
    if (node.kind === 'symlink') {
      if (++hops > MAX_SYMLINKS) return undefined; // ELOOP
      links.push([p, node]);
      if (node.target.startsWith('/')) done.length = 0;
      pending = [...node.target.split('/'), ...pending];
      node = { kind: 'dir' }; // the link's directory, which the target is resolved against
      continue;
    }
    done.push(c);
  }
  if (node.kind !== 'file') return undefined;
  return { real: done.join('/'), node, links };
}

// ---------------------------------------------------------------------------------------------
// /etc/ld.so.cache (glibc's "glibc-ld.so.cache1.1" format, optionally behind the old "ld.so-1.7.0" one)

interface CacheEntry {
  flags: number;
  key: string;
  value: string;
  hwcap: bigint;
}

const CACHE_NEW_MAGIC = 'glibc-ld.so.cache1.1';
const CACHE_OLD_MAGIC = 'ld.so-1.7.0';
const CACHE_NEW_HEADER = 48;
const CACHE_NEW_ENTRY = 24;
const CACHE_OLD_HEADER = 16;
const CACHE_OLD_ENTRY = 12;

/** Parses ld.so.cache bytes; entries in file order, which is the order ld.so prefers them in. */
export function parseLdSoCache(bytes: Uint8Array): CacheEntry[] {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let base = 0;
  if (buf.subarray(0, CACHE_OLD_MAGIC.length).toString('latin1') === CACHE_OLD_MAGIC) {
    if (buf.length < CACHE_OLD_HEADER) throw new ClosureError('ld.so.cache: truncated header');
    const oldCount = buf.readUInt32LE(12);
    base = CACHE_OLD_HEADER + oldCount * CACHE_OLD_ENTRY;
    base = (base + 7) & ~7; // the new format follows, aligned like struct cache_file_new
  }
  if (buf.length < base + CACHE_NEW_HEADER || buf.subarray(base, base + CACHE_NEW_MAGIC.length).toString('latin1') !== CACHE_NEW_MAGIC) {
    throw new ClosureError('ld.so.cache: not in the glibc-ld.so.cache1.1 format');
  }
  const count = buf.readUInt32LE(base + 20);
  if (base + CACHE_NEW_HEADER + count * CACHE_NEW_ENTRY > buf.length) {
    throw new ClosureError(`ld.so.cache: ${count} entries do not fit in ${buf.length} bytes`);
  }
  // String offsets count from the start of the new-format header.
  const str = (offset: number): string => {
    const start = base + offset;
    const end = start < buf.length ? buf.indexOf(0, start) : -1;
    if (end === -1) throw new ClosureError(`ld.so.cache: string at offset ${offset} runs past the end`);
    return buf.subarray(start, end).toString('utf8');
  };
  const entries: CacheEntry[] = [];
  for (let i = 0; i < count; i++) {
    const at = base + CACHE_NEW_HEADER + i * CACHE_NEW_ENTRY;
    entries.push({
      flags: buf.readInt32LE(at),
      key: str(buf.readUInt32LE(at + 4)),
      value: str(buf.readUInt32LE(at + 8)),
      hwcap: buf.readBigUInt64LE(at + 16),
    });
  }
  return entries;
}

let hostCache: Promise<Map<string, CacheEntry[]>> | undefined;

/** The host's cache by library name; empty without a cache (ld.so then searches only its defaults). */
function hostLdSoCache(): Promise<Map<string, CacheEntry[]>> {
  hostCache ??= (async () => {
    const byKey = new Map<string, CacheEntry[]>();
    let bytes: Buffer;
    try {
      bytes = await fs.readFile('/etc/ld.so.cache');
    } catch {
      return byKey;
    }
    let entries: CacheEntry[];
    try {
      entries = parseLdSoCache(bytes);
    } catch (err) {
      throw new ClosureError(`/etc/ld.so.cache: ${(err as Error).message.replace(/^ld\.so\.cache: /, '')}`);
    }
    for (const e of entries) {
      const list = byKey.get(e.key) ?? [];
      list.push(e);
      byKey.set(e.key, list);
    }
    return byKey;
  })();
  return hostCache;
}

// ---------------------------------------------------------------------------------------------
// Resolution

/** One loaded object, as ld.so's link_map sees it. */
interface Loaded {
  /** Guest path it was found at (before symlinks), no leading slash. */
  path: string;
  elf: ElfFile;
  /** Directory $ORIGIN stands for. */
  origin: string;
  /** The object whose DT_NEEDED loaded it; undefined for the program. */
  loader?: Loaded;
}

type Header = { elf: false } | { elf: true; class: number; machine: number };

async function readHeader(file: string): Promise<Header> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(20);
    const { bytesRead } = await fh.read(buf, 0, 20, 0);
    if (bytesRead < 4 || buf.readUInt32BE(0) !== 0x7f454c46) return { elf: false };
    if (bytesRead < 20) return { elf: true, class: 0, machine: 0 };
    return { elf: true, class: buf[4], machine: buf.readUInt16LE(18) };
  } finally {
    await fh.close();
  }
}

async function readElf(file: string, shownAs: string): Promise<ElfFile> {
  let bytes: Buffer;
  try {
    bytes = await fs.readFile(file);
  } catch (err) {
    throw new ClosureError(`${shownAs}: cannot read: ${(err as Error).message}`);
  }
  try {
    return parseElf(bytes);
  } catch (err) {
    if (err instanceof ElfError) throw new ClosureError(`${shownAs}: ${err.message}`);
    throw err;
  }
}

/** Expands $ORIGIN, $LIB and $PLATFORM (also as ${…}) the way Debian's ld.so does. */
function expandTokens(dir: string, origin: string, m: MachineInfo): string {
  return dir.replace(/\$(?:\{(ORIGIN|LIB|PLATFORM)\}|(ORIGIN|LIB|PLATFORM)(?![A-Za-z0-9_]))/g, (_, a?: string, b?: string) => {
    const token = a ?? b;
    if (token === 'ORIGIN') return `/${origin}`;
    if (token === 'LIB') return `lib/${m.triplet}`;
    return m.platform;
  });
}

class Closure {
  private readonly trees: { tree: Tree; origin: string }[];
  private readonly byName = new Map<string, Loaded>();
  private machine!: MachineInfo;
  private machineCode = 0;

  constructor(
    private readonly into: FileSet,
    packages: FileSet | undefined,
    hostOrigin: string,
  ) {
    this.trees = [];
    if (packages) this.trees.push({ tree: new FileSetTree(packages), origin: 'packages' });
    this.trees.push({ tree: new HostTree(), origin: hostOrigin });
  }

  private add(tree: Tree, origin: string, found: Walked): void {
    for (const [p, node] of found.links) this.into.add(tree.entry(p, node, origin));
    this.into.add(tree.entry(found.real, found.node, origin));
  }

  /** Adds the program at `guestPath` (found in `tree`) and everything it loads. */
  async program(tree: Tree, origin: string, guestPath: string, shownAs: string): Promise<void> {
    const found = await walk(tree, `/${guestPath}`);
    if (!found) throw new ClosureError(`${shownAs}: no such file`);
    this.add(tree, origin, found);
    const header = await readHeader(found.node.source);
    if (!header.elf) return; // a script: the file alone (its #! interpreter is the spec's business)
    const elf = await readElf(found.node.source, shownAs);
    if (!elf.interp) return; // static: nothing else is loaded
    const machine = MACHINES.get(elf.machine);
    if (!machine) throw new ClosureError(`${shownAs}: ELF machine ${elf.machine} is not supported (x86_64 and aarch64 are)`);
    this.machine = machine;
    this.machineCode = elf.machine;

    // The program's $ORIGIN is where the kernel found it: its real directory.
    const main: Loaded = { path: guestPath, elf, origin: path.posix.dirname(found.real) };
    await this.interpreter(elf.interp, shownAs);

    // ld.so loads breadth-first: the program's DT_NEEDED in order, then each of theirs.
    const queue: Loaded[] = [main];
    while (queue.length > 0) {
      const obj = queue.shift()!;
      for (const name of obj.elf.needed) {
        if (this.byName.has(name)) continue;
        const lib = await this.load(name, obj, shownAs);
        queue.push(lib);
      }
    }
  }

  private async interpreter(interp: string, shownAs: string): Promise<void> {
    for (const { tree, origin } of this.trees) {
      const found = await walk(tree, interp);
      if (!found) continue;
      this.add(tree, origin, found);
      const elf = await readElf(found.node.source, interp);
      const loaded: Loaded = { path: interp.replace(/^\/+/, ''), elf, origin: path.posix.dirname(interp.replace(/^\/+/, '')) };
      this.byName.set(interp, loaded);
      if (elf.soname) this.byName.set(elf.soname, loaded);
      return;
    }
    throw new ClosureError(`${shownAs} needs its interpreter ${interp}, which does not exist`);
  }

  private async load(name: string, needer: Loaded, shownAs: string): Promise<Loaded> {
    const searched: string[] = [];
    for (const { tree, origin } of this.trees) {
      const hit = await this.search(tree, name, needer, searched);
      if (!hit) continue;
      const { found, at, viaCache } = hit;
      this.add(tree, origin, found);
      const elf = await readElf(found.node.source, `/${at}`);
      const loaded: Loaded = { path: at, elf, origin: path.posix.dirname(at), loader: needer };
      this.byName.set(name, loaded);
      if (elf.soname) this.byName.set(elf.soname, loaded);
      if (viaCache) this.cacheLink(name, at, origin);
      return loaded;
    }
    const who = needer.loader ? `/${needer.path} (loaded by ${shownAs})` : shownAs;
    const where = [...new Set(searched)].map((d) => (d === 'ld.so.cache' ? d : `/${d}`)).join(', ');
    throw new ClosureError(`${who} needs ${name}, not found in ${where}`);
  }

  /** The guest has no ld.so.cache: a library the cache found outside the default dirs gets a link in one. */
  private cacheLink(name: string, at: string, origin: string): void {
    const dirs = defaultDirs(this.machine);
    if (dirs.includes(path.posix.dirname(at))) return;
    this.into.add({ kind: 'symlink', path: `usr/lib/${this.machine.triplet}/${name}`, target: `/${at}`, origin });
  }

  /** ld.so's search order for one name, inside one tree (dl-load.c, _dl_map_object). */
  private async search(
    tree: Tree,
    name: string,
    needer: Loaded,
    searched: string[],
  ): Promise<{ found: Walked; at: string; viaCache: boolean } | undefined> {
    const m = this.machine;
    const tryFile = async (candidate: string, viaCache = false) => {
      const found = await walk(tree, candidate);
      if (!found || !(await this.fits(found.node.source))) return undefined;
      return { found, at: candidate.replace(/^\/+/, ''), viaCache };
    };
    const tryDirs = async (dirs: string[]) => {
      for (const dir of dirs) {
        searched.push(dir.replace(/^\/+/, ''));
        const hit = await tryFile(`${dir}/${name}`);
        if (hit) return hit;
      }
      return undefined;
    };
    const pathList = (obj: Loaded, list: string[]) =>
      list.map((d) => expandTokens(d, obj.origin, m)).filter((d) => d.startsWith('/'));

    if (name.includes('/')) {
      if (!name.startsWith('/')) throw new ClosureError(`/${needer.path}: DT_NEEDED ${name} is a relative path, which depends on the working directory`);
      return tryFile(name);
    }
    // DT_RPATH of the needing object, then of the object that loaded it, up to the program (every
    // chain ends there, so ld.so's extra look at the program's RPATH never adds anything); all
    // skipped when the needing object has DT_RUNPATH, and an object's RPATH only counts when it has
    // no RUNPATH.
    if (needer.elf.runpath.length === 0) {
      for (let obj: Loaded | undefined = needer; obj; obj = obj.loader) {
        if (obj.elf.runpath.length > 0 || obj.elf.rpath.length === 0) continue;
        const hit = await tryDirs(pathList(obj, obj.elf.rpath));
        if (hit) return hit;
      }
    }
    const runpath = await tryDirs(pathList(needer, needer.elf.runpath));
    if (runpath) return runpath;
    if (tree.usesCache) {
      searched.push('ld.so.cache');
      for (const e of (await hostLdSoCache()).get(name) ?? []) {
        if (e.flags !== m.cacheFlags || e.hwcap !== 0n) continue;
        const hit = await tryFile(e.value, true);
        if (hit) return hit;
      }
    }
    return tryDirs(defaultDirs(m).map((d) => `/${d}`));
  }

  /** ld.so passes over a file of the wrong class or machine and keeps searching. */
  private async fits(file: string): Promise<boolean> {
    const h = await readHeader(file).catch(() => undefined);
    if (!h) return false;
    if (!h.elf) return true; // not ELF at all: ld.so stops with an error, and so will readElf
    return h.class === ELFCLASS64 && h.machine === this.machineCode;
  }
}

/**
 * The host program at `hostPath` (same path in the guest) with its interpreter and every library it
 * loads, symlinks kept. A non-ELF file (a script) or a static program is the file alone.
 */
export async function binaryClosure(hostPath: string, options: ClosureOptions = {}): Promise<FileSet> {
  const into = options.into ?? new FileSet();
  const abs = path.resolve(hostPath);
  const closure = new Closure(into, options.packages, `host (for ${abs})`);
  await closure.program(new HostTree(), `host (for ${abs})`, abs.replace(/^\/+/, ''), abs);
  return into;
}

/**
 * A program inside unpacked packages (`guestPath` in `packages`) with its interpreter and libraries:
 * from the packages first, then from the host. Adds into `into` (default: a new set).
 */
export async function packageProgramClosure(guestPath: string, packages: FileSet, into = new FileSet()): Promise<FileSet> {
  const p = guestPath.replace(/^\/+/, '');
  const closure = new Closure(into, packages, `host (for /${p})`);
  await closure.program(new FileSetTree(packages), 'packages', p, `/${p}`);
  return into;
}
