// Builds skiff's guest kernel from a config fragment on top of tinyconfig, out of Debian's
// linux-source tarball, into a cache keyed by (fragment, source version, compiler, recipe).
import { spawn, execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { packageRoot } from '../paths.js';
import { atomicCopy, atomicWrite, cacheDir, exists, sha256, withLock } from '../store/store.js';
import { KernelConfigError, lostOptions, parseConfig } from './config.js';

const execFileP = promisify(execFile);

/** Bump when the build steps change in a way that changes the output. */
const RECIPE = 'skiff-kernel-recipe-1';
const SOURCE_PACKAGE = 'linux-source-6.1';
const SOURCE_TARBALL = `/usr/src/${SOURCE_PACKAGE}.tar.xz`;
/** Objects a cold build of the default fragment compiles (measured); only used to scale progress. */
const EXPECTED_OBJECTS = 1300;

export class KernelBuildError extends Error {}

export interface KernelArtifacts {
  /** ELF vmlinux (boots through its PVH entry). */
  vmlinux: string;
  /** Compressed bzImage (boots through the Linux boot protocol, e.g. as a UKI's .linux). */
  bzImage: string;
  /** The final .config. */
  config: string;
  /** `uname -r` of this kernel. */
  version: string;
  /** Cache key: a hash of everything the build depends on. */
  key: string;
}

export type KernelBuildProgress =
  | { phase: 'wait'; holderPid: number }
  | { phase: 'extract' }
  | { phase: 'configure' }
  | { phase: 'compile'; done: number; total: number; file: string }
  | { phase: 'install' };

export interface KernelBuildOptions {
  /** Path of the config fragment. */
  fragment: string;
  jobs?: number;
  onProgress?: (p: KernelBuildProgress) => void;
}

export function defaultFragment(): string {
  return path.join(packageRoot(), 'kernel-config', '6.1', 'x86_64.config');
}


interface Inputs {
  fragmentText: string;
  sourceVersion: string;
  compiler: string;
}

async function readInputs(fragment: string): Promise<Inputs> {
  let fragmentText: string;
  try {
    fragmentText = await fs.readFile(fragment, 'utf8');
  } catch (err) {
    throw new KernelBuildError(`cannot read kernel config fragment ${fragment}: ${(err as Error).message}`);
  }
  parseConfig(fragmentText, fragment);
  if (!(await exists(SOURCE_TARBALL))) {
    throw new KernelBuildError(`kernel source ${SOURCE_TARBALL} not found: install it with "apt-get install ${SOURCE_PACKAGE}"`);
  }
  const { sourceVersion, compiler } = await probeToolchain();
  return { fragmentText, sourceVersion, compiler };
}

/**
 * The source package version and the compiler's version line, as dpkg-query and gcc say. Asking
 * them costs ~35 ms of process starts on every boot, so their answers are remembered under a key
 * made of the tarball's and the compiler binary's size and mtime, which change when either does.
 */
async function probeToolchain(): Promise<{ sourceVersion: string; compiler: string }> {
  const [tarball, gcc] = await Promise.all([fs.stat(SOURCE_TARBALL), findInPath('gcc')]);
  const gccStat = gcc ? await fs.stat(gcc) : undefined;
  const probeKey = sha256(`${tarball.size}:${tarball.mtimeMs}`, gcc ? `${gcc}:${gccStat!.size}:${gccStat!.mtimeMs}` : 'no-gcc').slice(0, 16);
  const memo = path.join(cacheDir(), 'kernels', `toolchain-${probeKey}.json`);
  try {
    return JSON.parse(await fs.readFile(memo, 'utf8'));
  } catch {
    const [sourceVersion, compiler] = await Promise.all([sourcePackageVersion(), compilerVersion()]);
    await atomicWrite(memo, JSON.stringify({ sourceVersion, compiler }));
    return { sourceVersion, compiler };
  }
}

async function findInPath(name: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, name);
    try {
      await fs.access(candidate, fs.constants.X_OK);
      return await fs.realpath(candidate);
    } catch {
      // not here
    }
  }
  return undefined;
}

async function sourcePackageVersion(): Promise<string> {
  try {
    const { stdout } = await execFileP('dpkg-query', ['-W', '-f', '${Version}', SOURCE_PACKAGE]);
    if (stdout.trim()) return stdout.trim();
  } catch {
    // Not installed through dpkg: fall back to the tarball's identity.
  }
  const st = await fs.stat(SOURCE_TARBALL);
  return `tarball-${st.size}-${st.mtimeMs}`;
}

async function compilerVersion(): Promise<string> {
  try {
    const { stdout } = await execFileP('gcc', ['--version']);
    return stdout.split('\n')[0];
  } catch {
    throw new KernelBuildError('gcc not found: install the kernel build tools (apt-get install gcc make flex bison bc libelf-dev libssl-dev)');
  }
}

function keyOf(inputs: Inputs): string {
  return sha256(RECIPE, inputs.fragmentText, inputs.sourceVersion, inputs.compiler).slice(0, 16);
}

function kernelDir(key: string): string {
  return path.join(cacheDir(), 'kernels', key);
}

async function readManifest(key: string): Promise<KernelArtifacts | undefined> {
  const dir = kernelDir(key);
  try {
    const manifest = JSON.parse(await fs.readFile(path.join(dir, 'manifest.json'), 'utf8'));
    const artifacts: KernelArtifacts = {
      vmlinux: path.join(dir, 'vmlinux'),
      bzImage: path.join(dir, 'bzImage'),
      config: path.join(dir, 'config'),
      version: String(manifest.version),
      key,
    };
    for (const f of [artifacts.vmlinux, artifacts.bzImage, artifacts.config]) if (!(await exists(f))) return undefined;
    return artifacts;
  } catch {
    return undefined;
  }
}

/** The cached kernel for this fragment, or undefined if it has not been built. Fast: no build tools run. */
export async function cachedKernel(fragment = defaultFragment()): Promise<KernelArtifacts | undefined> {
  return readManifest(keyOf(await readInputs(fragment)));
}

export async function buildKernel(options: KernelBuildOptions): Promise<KernelArtifacts> {
  const inputs = await readInputs(options.fragment);
  const key = keyOf(inputs);
  const hit = await readManifest(key);
  if (hit) return hit;
  const lock = path.join(cacheDir(), 'kernels', `${key}.lock`);
  return withLock(lock, async () => (await readManifest(key)) ?? build(key, inputs, options), (holderPid) =>
    options.onProgress?.({ phase: 'wait', holderPid }),
  );
}

async function build(key: string, inputs: Inputs, options: KernelBuildOptions): Promise<KernelArtifacts> {
  const progress = options.onProgress ?? (() => {});
  const source = await extractSource(inputs.sourceVersion, () => progress({ phase: 'extract' }));
  const out = path.join(cacheDir(), 'kbuild', key);
  await fs.mkdir(out, { recursive: true });
  const make = (args: string[], onLine?: (line: string) => void) => runMake(source, out, args, onLine);

  progress({ phase: 'configure' });
  await make(['tinyconfig']);
  await fs.appendFile(path.join(out, '.config'), `\n${inputs.fragmentText}\n`);
  await make(['olddefconfig']);
  const finalConfig = await fs.readFile(path.join(out, '.config'), 'utf8');
  const lost = lostOptions(parseConfig(inputs.fragmentText, options.fragment), parseConfig(finalConfig, '.config'));
  if (lost.length > 0) {
    // A configuration that cannot be built is of no use to a later incremental build.
    await fs.rm(out, { recursive: true, force: true });
    throw new KernelConfigError(`olddefconfig dropped or changed ${lost.length} requested option(s) from ${options.fragment}: ${lost.join(', ')}`);
  }

  const jobs = options.jobs ?? os.availableParallelism();
  let done = 0;
  await make([`-j${jobs}`, 'vmlinux', 'bzImage'], (line) => {
    const m = /^\s+(CC|AS)\s+(\S+)/.exec(line);
    if (!m) return;
    done++;
    progress({ phase: 'compile', done, total: Math.max(EXPECTED_OBJECTS, done + 1), file: m[2] });
  });

  progress({ phase: 'install' });
  const version = (await make(['-s', 'kernelrelease'])).trim();
  const dir = kernelDir(key);
  await atomicCopy(path.join(out, 'vmlinux'), path.join(dir, 'vmlinux'));
  await atomicCopy(path.join(out, 'arch/x86/boot/bzImage'), path.join(dir, 'bzImage'));
  await atomicCopy(path.join(out, '.config'), path.join(dir, 'config'));
  // The manifest is written last: its presence means the entry is complete.
  await atomicWrite(
    path.join(dir, 'manifest.json'),
    JSON.stringify({ version, objects: done, sourceVersion: inputs.sourceVersion, compiler: inputs.compiler, recipe: RECIPE, builtAt: new Date().toISOString() }, null, 2),
  );
  return (await readManifest(key))!;
}

/** Unpacks Debian's source tarball once per source version, shared by every fragment. */
async function extractSource(version: string, onExtract: () => void): Promise<string> {
  const dir = path.join(cacheDir(), 'src', `${SOURCE_PACKAGE}_${version}`);
  const marker = path.join(dir, '.skiff-complete');
  if (await exists(marker)) return dir;
  return withLock(`${dir}.lock`, async () => {
    if (await exists(marker)) return dir;
    onExtract();
    await fs.rm(dir, { recursive: true, force: true });
    await fs.mkdir(dir, { recursive: true });
    await runTool('tar', ['-xf', SOURCE_TARBALL, '-C', dir, '--strip-components=1']);
    await atomicWrite(marker, version);
    return dir;
  });
}

function runTool(cmd: string, args: string[], opts: { cwd?: string; onLine?: (line: string) => void } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
      // Fixed build identity so the same inputs give the same kernel bytes.
      env: { ...process.env, KBUILD_BUILD_USER: 'skiff', KBUILD_BUILD_HOST: 'skiff', KBUILD_BUILD_TIMESTAMP: '1970-01-01', LC_ALL: 'C' },
    });
    let stdout = '';
    const tail: string[] = [];
    const keep = (line: string) => {
      tail.push(line);
      if (tail.length > 40) tail.shift();
    };
    createInterface({ input: child.stdout }).on('line', (line) => {
      stdout += line + '\n';
      keep(line);
      opts.onLine?.(line);
    });
    createInterface({ input: child.stderr }).on('line', keep);
    child.on('error', (err) =>
      reject(new KernelBuildError(`cannot run ${cmd}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'not installed' : err.message}`)),
    );
    child.on('close', (code, signal) => {
      if (code === 0) return resolve(stdout);
      const errors = tail.filter((l) => /error|Error|\*\*\*/.test(l));
      const detail = (errors.length ? errors : tail).slice(-6).join(' | ');
      reject(new KernelBuildError(`${cmd} ${args.join(' ')} failed (${signal ?? `exit ${code}`}): ${detail}`));
    });
  });
}

function runMake(source: string, out: string, args: string[], onLine?: (line: string) => void): Promise<string> {
  return runTool('make', ['--no-print-directory', '-C', source, `O=${out}`, 'ARCH=x86_64', ...args], { onLine });
}
