// Debian packages as initrd file sets: each name's candidate version (apt's view of its lists),
// fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a cache keyed by
// name, version and architecture. Nothing is installed on the host.
//
// Choices:
// - Dependencies are not followed: a spec lists every package it wants (as LinuxKit does), so an
//   initrd never grows behind the user's back. What a package's programs need at run time is still
//   found: every ELF program in the packages gets its shared-library closure (closure.ts), looked up
//   in the listed packages first and then on the host. `crun` alone therefore runs in the guest, its
//   libraries coming from the host's libc6, libseccomp2, …. Libraries that are only dlopen()ed
//   (plugins) are not followed; list the package that has them.
// - The guest tree is usr-merged, as Debian 12 is: files a package ships under /bin, /sbin, /lib,
//   /lib64 are placed under /usr (what dpkg does on a merged system), and /bin → usr/bin etc. are
//   symlinks. That is also what host closures produce on a Debian 12 host, so the two never clash.
// - Documentation is left out (usr/share/{doc,man,info,lintian}): it is most of a small package
//   and nothing runs it.
// - The cache holds the .deb and its unpacked tree; both are renamed into place whole, under a lock
//   per package, so concurrent skiff processes download a package once and never see half of one.
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { cacheDir, exists, withLock } from '../store/store.js';
import { ElfError, readElfFile } from '../elf/elf.js';
import { packageProgramClosure } from './closure.js';
import { FileSet } from './fileset.js';

export class PackageError extends Error {}

export type PackageProgress =
  | { phase: 'resolve'; names: string[] }
  | { phase: 'wait'; name: string; holderPid: number }
  | { phase: 'download'; name: string; version: string; percent: number; size: number }
  | { phase: 'unpack'; name: string; version: string }
  | { phase: 'cached'; name: string; version: string };

export interface PackageOptions {
  /** Debian architecture; default: the host's (`dpkg --print-architecture`). */
  arch?: string;
  onProgress?: (event: PackageProgress) => void;
}

export interface FetchedPackage {
  name: string;
  version: string;
  /** The package's own architecture ("all" for architecture-independent packages). */
  arch: string;
  /** The unpacked tree in the cache. */
  root: string;
  /** The package's own files (usr-merged guest paths, docs left out). */
  files: FileSet;
  /** False when the cache already had it. */
  downloaded: boolean;
}

export interface FetchedPackages {
  packages: FetchedPackage[];
  /** Every package's files, the usr-merge links, and the libraries their programs need. */
  files: FileSet;
}

/** Top-level directories that are symlinks into /usr on a usr-merged system (Debian 12). */
export const USR_MERGED_DIRS = ['bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32'] as const;

/** Where a path lands on a usr-merged system: "bin/sh" → "usr/bin/sh"; "lib" → "usr/lib". */
export function usrMergedPath(p: string): string {
  const first = p.split('/', 1)[0];
  return (USR_MERGED_DIRS as readonly string[]).includes(first) ? `usr/${p}` : p;
}

const SKIPPED_DIRS = ['usr/share/doc', 'usr/share/man', 'usr/share/info', 'usr/share/lintian'];
// Debian policy 5.6.1 (lower case, at least two characters, starting alphanumeric).
const PACKAGE_NAME = /^[a-z0-9][a-z0-9+.-]+$/;
const ARCH_NAME = /^[a-z0-9][a-z0-9-]*$/;

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a tool to completion; a failure to start it is a PackageError naming the tool. */
function run(cmd: string, args: string[], options: { cwd?: string; onStatus?: (line: string) => void } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const stdio: ('ignore' | 'pipe')[] = ['ignore', 'pipe', 'pipe'];
    if (options.onStatus) stdio.push('pipe');
    // LC_ALL=C: apt's messages are parsed and quoted; they must not be translated.
    const child = spawn(cmd, args, { cwd: options.cwd, stdio, env: { ...process.env, LC_ALL: 'C' } });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    if (options.onStatus) {
      let partial = '';
      const status = child.stdio[3] as NodeJS.ReadableStream;
      status.setEncoding('utf8');
      status.on('data', (d: string) => {
        const lines = (partial + d).split('\n');
        partial = lines.pop()!;
        for (const line of lines) options.onStatus!(line);
      });
    }
    child.on('error', (err) => reject(new PackageError(`cannot run ${cmd}: ${err.message}`)));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** apt's last error line ("E: …"), for one-line messages. */
function aptError(r: RunResult): string {
  const errors = r.stderr.split('\n').filter((l) => l.startsWith('E: ')).map((l) => l.slice(3));
  const last = errors.at(-1) ?? r.stderr.trim().split('\n').at(-1) ?? '';
  return last || `exit status ${r.code}`;
}

let hostArch: Promise<string> | undefined;

function defaultArch(): Promise<string> {
  hostArch ??= run('dpkg', ['--print-architecture']).then((r) => {
    const arch = r.stdout.trim();
    if (r.code !== 0 || !ARCH_NAME.test(arch)) throw new PackageError(`dpkg --print-architecture failed: ${r.stderr.trim() || r.stdout.trim()}`);
    return arch;
  });
  return hostArch;
}

interface Candidate {
  /** What apt is asked for: "name:arch". */
  query: string;
  name: string;
  version: string;
  arch: string;
  size: number;
}

/** Each name's candidate version, from apt's local lists (no network). */
async function resolveCandidates(names: string[], arch: string): Promise<Candidate[]> {
  const r = await run('apt-cache', ['show', '--no-all-versions', '--', ...names.map((n) => `${n}:${arch}`)]);
  const found = new Map<string, Candidate>();
  for (const record of r.stdout.split(/\n\n+/)) {
    const field = (f: string) => new RegExp(`^${f}: (.*)$`, 'm').exec(record)?.[1].trim();
    const name = field('Package');
    const version = field('Version');
    const recordArch = field('Architecture');
    if (!name || !version || !recordArch || found.has(name)) continue;
    found.set(name, { query: `${name}:${arch}`, name, version, arch: recordArch, size: Number(field('Size') ?? 0) });
  }
  // apt-cache says nothing about a name it cannot show (or only "E: No packages found" when it
  // can show none), so every missing name is asked about on its own for a message that helps.
  const missing = names.filter((n) => !found.has(n));
  if (missing.length > 0) throw new PackageError(await whyMissing(missing[0], arch));
  if (r.code !== 0) throw new PackageError(`apt-cache show failed: ${aptError(r)}`);
  return names.map((n) => found.get(n)!);
}

async function whyMissing(name: string, arch: string): Promise<string> {
  const policy = await run('apt-cache', ['policy', '--', `${name}:${arch}`]);
  if (/Candidate: \(none\)/.test(policy.stdout)) {
    const providers = await run('apt-cache', ['showpkg', '--', name]);
    const reverse = /Reverse Provides: *\n([\s\S]*)$/.exec(providers.stdout)?.[1] ?? '';
    const names = [...new Set(reverse.split('\n').map((l) => l.trim().split(' ')[0]).filter(Boolean))].slice(0, 5);
    const hint = names.length > 0 ? `; it is provided by ${names.join(', ')}` : '';
    return `package "${name}" has no installable version for ${arch} (a virtual or obsolete package?)${hint}`;
  }
  return `package "${name}" not found in apt's package lists for ${arch} (check the name, or run apt-get update)`;
}

/** apt's file names: the epoch's ":" is written "%3a". */
const keyOf = (c: Candidate): string => `${c.name}_${c.version.replace(/:/g, '%3a')}_${c.arch}`;

/** Removes leftovers of a process that died mid-download or mid-unpack (we hold the lock). */
async function removeLeftovers(dir: string): Promise<void> {
  const names = await fs.readdir(dir).catch(() => [] as string[]);
  await Promise.all(names.filter((n) => n.startsWith('.tmp-')).map((n) => fs.rm(path.join(dir, n), { recursive: true, force: true })));
}

async function download(c: Candidate, dir: string, deb: string, onProgress: (e: PackageProgress) => void): Promise<void> {
  const tmp = await fs.mkdtemp(path.join(dir, '.tmp-download-'));
  try {
    let percent = 0;
    onProgress({ phase: 'download', name: c.name, version: c.version, percent, size: c.size });
    // APT::Status-Fd=3 makes apt report "dlstatus:<n>:<percent>:<text>" lines on fd 3.
    const r = await run('apt-get', ['download', '-q', '-o', 'APT::Status-Fd=3', '--', `${c.query}=${c.version}`], {
      cwd: tmp,
      onStatus: (line) => {
        const m = /^dlstatus:[^:]*:([0-9.]+):/.exec(line);
        const now = m ? Math.min(100, Math.floor(Number(m[1]))) : percent;
        if (now > percent) onProgress({ phase: 'download', name: c.name, version: c.version, percent: (percent = now), size: c.size });
      },
    });
    if (r.code !== 0) throw new PackageError(`downloading package "${c.name}" ${c.version} failed: ${aptError(r)}`);
    const debs = (await fs.readdir(tmp)).filter((n) => n.endsWith('.deb'));
    if (debs.length !== 1) throw new PackageError(`apt-get download ${c.name} left ${debs.length} .deb files, expected one`);
    await fs.rename(path.join(tmp, debs[0]), deb);
    if (percent < 100) onProgress({ phase: 'download', name: c.name, version: c.version, percent: 100, size: c.size });
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
}

async function unpack(c: Candidate, deb: string, dir: string, root: string): Promise<void> {
  const tmp = await fs.mkdtemp(path.join(dir, '.tmp-root-'));
  try {
    const r = await run('dpkg-deb', ['-x', deb, tmp]);
    if (r.code !== 0) throw new PackageError(`unpacking package "${c.name}" (${deb}) failed: ${r.stderr.trim().split('\n').at(-1) ?? `exit status ${r.code}`}`);
    await fs.rename(tmp, root);
  } catch (err) {
    await fs.rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

/** Downloads and unpacks one package unless the cache has it; returns its unpacked tree. */
async function ensureUnpacked(c: Candidate, onProgress: (e: PackageProgress) => void): Promise<{ root: string; downloaded: boolean }> {
  const key = keyOf(c);
  const dir = path.join(cacheDir(), 'packages', key);
  const root = path.join(dir, 'root');
  if (await exists(root)) {
    onProgress({ phase: 'cached', name: c.name, version: c.version });
    return { root, downloaded: false };
  }
  return withLock(
    path.join(cacheDir(), 'packages', `${key}.lock`),
    async () => {
      if (await exists(root)) {
        onProgress({ phase: 'cached', name: c.name, version: c.version });
        return { root, downloaded: false };
      }
      await fs.mkdir(dir, { recursive: true });
      await removeLeftovers(dir);
      const deb = path.join(dir, `${key}.deb`);
      let downloaded = false;
      if (!(await exists(deb))) {
        await download(c, dir, deb, onProgress);
        downloaded = true;
      }
      onProgress({ phase: 'unpack', name: c.name, version: c.version });
      await unpack(c, deb, dir, root);
      return { root, downloaded };
    },
    (holderPid) => onProgress({ phase: 'wait', name: c.name, holderPid }),
  );
}

/** The unpacked tree as guest entries: modes and symlinks kept, usr-merged, docs left out. */
async function treeFiles(root: string, origin: string): Promise<{ files: FileSet; programs: string[] }> {
  const files = new FileSet();
  const programs: string[] = [];
  const visit = async (rel: string): Promise<void> => {
    for (const dirent of await fs.readdir(path.join(root, rel), { withFileTypes: true })) {
      const from = rel === '' ? dirent.name : `${rel}/${dirent.name}`;
      if (SKIPPED_DIRS.includes(from)) continue;
      const host = path.join(root, from);
      const to = usrMergedPath(from);
      const st = await fs.lstat(host);
      if (st.isDirectory()) {
        files.add({ kind: 'dir', path: to, mode: st.mode & 0o7777, origin });
        await visit(from);
      } else if (st.isSymbolicLink()) {
        files.add({ kind: 'symlink', path: to, target: mergedTarget(from, to, await fs.readlink(host)), origin });
      } else if (st.isFile()) {
        files.add({ kind: 'file', path: to, mode: st.mode & 0o7777, source: host, origin });
        if (st.mode & 0o111 && (await isElf(host))) programs.push(to);
      } else {
        throw new PackageError(`${origin} has /${from}, which is neither a file, a directory nor a symlink`);
      }
    }
  };
  await visit('');
  return { files, programs };
}

/** A relative link moved by the usr merge is made absolute, so it still points where it did. */
function mergedTarget(from: string, to: string, target: string): string {
  if (from === to || target.startsWith('/')) return target;
  const resolved = path.posix.normalize(`/${path.posix.dirname(from)}/${target}`).slice(1);
  return `/${usrMergedPath(resolved)}`;
}

async function isElf(file: string): Promise<boolean> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(4);
    const { bytesRead } = await fh.read(buf, 0, 4, 0);
    return bytesRead === 4 && buf.readUInt32BE(0) === 0x7f454c46;
  } finally {
    await fh.close();
  }
}

/**
 * Fetches the named packages (candidate versions, no dependencies) into the cache and returns their
 * files, with the shared libraries their programs need from the packages or the host.
 */
export async function fetchPackages(names: string[], options: PackageOptions = {}): Promise<FetchedPackages> {
  const onProgress = options.onProgress ?? (() => {});
  const unique = [...new Set(names)];
  for (const n of unique) {
    if (!PACKAGE_NAME.test(n)) throw new PackageError(`"${n}" is not a Debian package name (lower-case letters, digits, "+", "-", ".")`);
  }
  const arch = options.arch ?? (await defaultArch());
  if (!ARCH_NAME.test(arch)) throw new PackageError(`"${arch}" is not a Debian architecture name`);
  const result: FetchedPackages = { packages: [], files: new FileSet() };
  if (unique.length === 0) return result;

  onProgress({ phase: 'resolve', names: unique });
  const candidates = await resolveCandidates(unique, arch);
  const packageFiles = new FileSet();
  const programs: string[] = [];
  for (const c of candidates) {
    const { root, downloaded } = await ensureUnpacked(c, onProgress);
    const tree = await treeFiles(root, `package ${c.name}`);
    packageFiles.merge(tree.files);
    programs.push(...tree.programs);
    result.packages.push({ name: c.name, version: c.version, arch: c.arch, root, files: tree.files, downloaded });
  }
  for (const dir of USR_MERGED_DIRS) {
    if (packageFiles.has(`usr/${dir}`)) packageFiles.add({ kind: 'symlink', path: dir, target: `usr/${dir}`, origin: 'usr merge' });
  }
  result.files.merge(packageFiles);
  for (const program of programs) {
    const elf = await isDynamicProgram(packageFiles, program);
    if (elf) await packageProgramClosure(program, packageFiles, result.files);
  }
  return result;
}

/** Only programs with an interpreter load libraries; shared objects alone are not followed. */
async function isDynamicProgram(files: FileSet, guestPath: string): Promise<boolean> {
  const e = files.get(guestPath);
  if (!e || e.kind !== 'file' || !('source' in e)) return false;
  try {
    return (await readElfFile(e.source)).interp !== undefined;
  } catch (err) {
    // A 32-bit or big-endian helper is shipped as it is; its libraries are not followed.
    if (err instanceof ElfError && /unsupported ELF (class|byte order)/.test(err.message)) return false;
    throw new PackageError(err instanceof Error ? err.message : String(err));
  }
}
