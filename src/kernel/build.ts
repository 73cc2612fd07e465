// Builds skiff's guest kernel from a config fragment on top of tinyconfig, out of Debian's
// linux-source tarball, into a cache keyed by (fragment, source version, compiler, recipe).
// A flavor (kernel-config/6.1/<flavor>/: patches plus a config fragment) is built incrementally
// from the default build: a hard-linked, patched copy of the source and a copy of the build tree.
import { spawn, execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { packageRoot } from '../paths.js';
import { atomicCopy, atomicWrite, cacheDir, exists, sha256, withLock } from '../store/store.js';
import { canonicalConfig, KernelConfigError, lostOptions, parseConfig } from './config.js';
import { KERNEL_FLAVORS, type KernelFlavor } from './flavors.js';

export { KERNEL_FLAVORS, type KernelFlavor };

const execFileP = promisify(execFile);

/** Bump when the build steps change in a way that changes the output. */
const RECIPE = 'skiff-kernel-recipe-1';
const SOURCE_PACKAGE = 'linux-source-6.1';
const SOURCE_TARBALL = `/usr/src/${SOURCE_PACKAGE}.tar.xz`;
/** Objects a cold build of the default fragment compiles (measured); only used to scale progress. */
const EXPECTED_OBJECTS = 1300;
/** Bump when the flavor build steps change in a way that changes the output. */
const FLAVOR_RECIPE = 'skiff-kernel-flavor-recipe-1';
/**
 * Objects a flavor build from an earlier build of the flavor recompiles (measured for pvm-native:
 * a patch change); from the default build, pvm-native's CONFIG_HZ recompiles nearly everything.
 * Only used to scale progress.
 */
const EXPECTED_FLAVOR_OBJECTS = 20;

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
  | { phase: 'patch'; flavor: string }
  | { phase: 'configure'; flavor?: string; incremental?: boolean }
  | { phase: 'compile'; done: number; total: number; file: string }
  | { phase: 'install' };

export interface KernelBuildOptions {
  /** Path of the config fragment. */
  fragment: string;
  /** Build this flavor on top of the fragment's kernel (which is built first if missing). */
  flavor?: KernelFlavor;
  jobs?: number;
  onProgress?: (p: KernelBuildProgress) => void;
}

export function defaultFragment(): string {
  return path.join(packageRoot(), 'kernel-config', '6.1', 'x86_64.config');
}

export function flavorDir(flavor: KernelFlavor): string {
  return path.join(packageRoot(), 'kernel-config', '6.1', flavor);
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
  return sha256(RECIPE, canonicalConfig(inputs.fragmentText), inputs.sourceVersion, inputs.compiler).slice(0, 16);
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

/**
 * The cached kernel for this fragment (and flavor), or undefined if it has not been built. Fast:
 * no build tools run.
 */
export async function cachedKernel(fragment = defaultFragment(), flavor?: KernelFlavor): Promise<KernelArtifacts | undefined> {
  const inputs = await readInputs(fragment);
  return readManifest(flavor ? flavorKeyOf(keyOf(inputs), await readFlavor(flavor)) : keyOf(inputs));
}

export async function buildKernel(options: KernelBuildOptions): Promise<KernelArtifacts> {
  if (options.flavor) return buildFlavor(options, options.flavor);
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

  return compileAndInstall(key, source, out, options, EXPECTED_OBJECTS, (objects) => ({
    objects,
    sourceVersion: inputs.sourceVersion,
    compiler: inputs.compiler,
    recipe: RECIPE,
  }));
}

/** `make vmlinux bzImage` in out, then the artifacts and the manifest into the cache entry of key. */
async function compileAndInstall(
  key: string,
  source: string,
  out: string,
  options: KernelBuildOptions,
  expectedObjects: number,
  manifestFields: (objects: number) => Record<string, unknown>,
): Promise<KernelArtifacts> {
  const progress = options.onProgress ?? (() => {});
  const make = (args: string[], onLine?: (line: string) => void) => runMake(source, out, args, onLine);
  const jobs = options.jobs ?? os.availableParallelism();
  let done = 0;
  await make([`-j${jobs}`, 'vmlinux', 'bzImage'], (line) => {
    const m = /^\s+(CC|AS)\s+(\S+)/.exec(line);
    if (!m) return;
    done++;
    progress({ phase: 'compile', done, total: Math.max(expectedObjects, done + 1), file: m[2] });
  });

  progress({ phase: 'install' });
  const version = (await make(['-s', 'kernelrelease'])).trim();
  const dir = kernelDir(key);
  await atomicCopy(path.join(out, 'vmlinux'), path.join(dir, 'vmlinux'));
  await atomicCopy(path.join(out, 'arch/x86/boot/bzImage'), path.join(dir, 'bzImage'));
  await atomicCopy(path.join(out, '.config'), path.join(dir, 'config'));
  // The manifest is written last: its presence means the entry is complete.
  await atomicWrite(path.join(dir, 'manifest.json'), JSON.stringify({ version, ...manifestFields(done), builtAt: new Date().toISOString() }, null, 2));
  return (await readManifest(key))!;
}

interface Flavor {
  name: KernelFlavor;
  dir: string;
  configFile: string;
  configText: string;
  /** In the order they are applied. */
  patches: { name: string; file: string; text: string }[];
}

async function readFlavor(name: KernelFlavor): Promise<Flavor> {
  if (!(KERNEL_FLAVORS as readonly string[]).includes(name)) throw new KernelBuildError(`unknown kernel flavor "${name}" (known: ${KERNEL_FLAVORS.join(', ')})`);
  const dir = flavorDir(name);
  const configFile = path.join(dir, 'config');
  let entries: string[];
  let configText: string;
  try {
    entries = await fs.readdir(dir);
    configText = await fs.readFile(configFile, 'utf8');
  } catch (err) {
    throw new KernelBuildError(`cannot read kernel flavor ${name} in ${dir}: ${(err as Error).message}`);
  }
  parseConfig(configText, configFile);
  const patches = await Promise.all(
    entries
      .filter((e) => e.endsWith('.patch'))
      .sort()
      .map(async (e) => ({ name: e, file: path.join(dir, e), text: await fs.readFile(path.join(dir, e), 'utf8') })),
  );
  return { name, dir, configFile, configText, patches };
}

function flavorKeyOf(baseKey: string, flavor: Flavor): string {
  return sha256(FLAVOR_RECIPE, baseKey, flavor.name, canonicalConfig(flavor.configText), ...flavor.patches.flatMap((p) => [p.name, p.text])).slice(0, 16);
}

/** The files a unified diff changes (its "+++ b/..." lines), relative to the tree. */
function patchedFiles(text: string): string[] {
  return [...text.matchAll(/^\+\+\+ b\/(\S+)/gm)].map((m) => m[1]);
}

/**
 * A flavor: the default kernel of the fragment first (built if missing), then, under the flavor's
 * own key, a copy of its build tree built against a patched copy of its source, so only what the
 * patches and the flavor's config change recompiles.
 */
async function buildFlavor(options: KernelBuildOptions, name: KernelFlavor): Promise<KernelArtifacts> {
  const flavor = await readFlavor(name);
  const inputs = await readInputs(options.fragment);
  const baseKey = keyOf(inputs);
  const key = flavorKeyOf(baseKey, flavor);
  const hit = await readManifest(key);
  if (hit) return hit;
  await buildKernel({ ...options, flavor: undefined });
  const lock = path.join(cacheDir(), 'kernels', `${key}.lock`);
  return withLock(lock, async () => (await readManifest(key)) ?? buildFlavorLocked(key, baseKey, inputs, flavor, options), (holderPid) =>
    options.onProgress?.({ phase: 'wait', holderPid }),
  );
}

/** Written into a flavor's build tree once it has built (its presence says so): what a later build of the flavor may copy. */
interface FlavorTree {
  flavor: string;
  base: string;
  /** The patched source tree it was built against. */
  source: string;
  /** Every file its patches changed, relative to the source tree. */
  patchedFiles: string[];
}
const FLAVOR_TREE = '.skiff-flavor.json';

/**
 * The build tree a flavor build starts from: the newest earlier build of the same flavor on the
 * same default kernel (a changed patch then recompiles only what it touches), else the default
 * kernel's own (kept after its build). Undefined when neither is there: a full build.
 */
async function seedTree(flavor: Flavor, baseKey: string, key: string, pristine: string): Promise<{ out: string; tree: FlavorTree } | undefined> {
  const kbuild = path.join(cacheDir(), 'kbuild');
  let newest: { out: string; tree: FlavorTree; mtime: number } | undefined;
  for (const name of await fs.readdir(kbuild).catch(() => [] as string[])) {
    if (name === key) continue; // about to be rebuilt
    const out = path.join(kbuild, name);
    try {
      const marker = path.join(out, FLAVOR_TREE);
      const tree = JSON.parse(await fs.readFile(marker, 'utf8')) as FlavorTree;
      const { mtimeMs } = await fs.stat(marker);
      if (tree.flavor !== flavor.name || tree.base !== baseKey) continue;
      if (!newest || mtimeMs > newest.mtime) newest = { out, tree, mtime: mtimeMs };
    } catch {
      // not a finished flavor build tree
    }
  }
  if (newest) return newest;
  const baseOut = path.join(kbuild, baseKey);
  if ((await exists(path.join(baseOut, '.config'))) && (await exists(path.join(baseOut, 'vmlinux')))) {
    return { out: baseOut, tree: { flavor: '', base: baseKey, source: pristine, patchedFiles: [] } };
  }
  return undefined;
}

async function buildFlavorLocked(key: string, baseKey: string, inputs: Inputs, flavor: Flavor, options: KernelBuildOptions): Promise<KernelArtifacts> {
  const started = Date.now();
  const progress = options.onProgress ?? (() => {});
  const pristine = await extractSource(inputs.sourceVersion, () => progress({ phase: 'extract' }));
  progress({ phase: 'patch', flavor: flavor.name });
  const source = await patchedSource(pristine, inputs.sourceVersion, flavor);
  const patched = [...new Set(flavor.patches.flatMap((p) => patchedFiles(p.text)))];
  const out = path.join(cacheDir(), 'kbuild', key);
  const make = (args: string[]) => runMake(source, out, args);
  const seed = await seedTree(flavor, baseKey, key, pristine);
  await fs.rm(out, { recursive: true, force: true });
  progress({ phase: 'configure', flavor: flavor.name, incremental: seed !== undefined });
  if (seed) {
    await runTool('cp', ['-a', seed.out, out]);
    await fs.rm(path.join(out, FLAVOR_TREE), { force: true });
    await relocateBuildTree(out, [
      [seed.tree.source, source],
      [seed.out, out],
    ]);
    // What the copied objects were compiled from and what they must now be compiled from differ in
    // the files either patch set changes: each must be newer than every copied object. Those this
    // flavor patches have their own inodes (checked in patchedSource); one the seed's patches
    // changed and these do not is still a hard link to the pristine tree, so it first gets its own
    // copy: the pristine tree's files are never touched.
    const now = new Date();
    for (const f of new Set([...patched, ...seed.tree.patchedFiles])) {
      const file = path.join(source, f);
      if (!patched.includes(f)) {
        if (!(await exists(file))) continue;
        const tmp = `${file}.skiff-tmp`;
        await fs.copyFile(file, tmp);
        await fs.rename(tmp, file);
      }
      await fs.utimes(file, now, now);
    }
    // The default kernel's final .config plus the flavor's fragment, whatever the seed's was.
    const baseConfig = await fs.readFile(path.join(kernelDir(baseKey), 'config'), 'utf8');
    await fs.writeFile(path.join(out, '.config'), `${baseConfig}\n${flavor.configText}\n`);
  } else {
    await fs.mkdir(out, { recursive: true });
    await make(['tinyconfig']);
    await fs.appendFile(path.join(out, '.config'), `\n${inputs.fragmentText}\n${flavor.configText}\n`);
  }
  await make(['olddefconfig']);
  const requested = new Map(parseConfig(inputs.fragmentText, options.fragment).map((o) => [o.name, o]));
  for (const o of parseConfig(flavor.configText, flavor.configFile)) requested.set(o.name, o);
  const lost = lostOptions([...requested.values()], parseConfig(await fs.readFile(path.join(out, '.config'), 'utf8'), '.config'));
  if (lost.length > 0) {
    await fs.rm(out, { recursive: true, force: true });
    throw new KernelConfigError(
      `olddefconfig dropped or changed ${lost.length} requested option(s) from ${options.fragment} + ${flavor.configFile}: ${lost.join(', ')}`,
    );
  }

  const seededFrom = seed ? path.basename(seed.out) : null;
  const artifacts = await compileAndInstall(key, source, out, options, seed?.tree.flavor ? EXPECTED_FLAVOR_OBJECTS : EXPECTED_OBJECTS, (objects) => ({
    objects,
    flavor: flavor.name,
    patches: flavor.patches.map((p) => p.name),
    base: baseKey,
    seededFrom,
    buildSeconds: Math.round((Date.now() - started) / 100) / 10,
    sourceVersion: inputs.sourceVersion,
    compiler: inputs.compiler,
    recipe: FLAVOR_RECIPE,
  }));
  const tree: FlavorTree = { flavor: flavor.name, base: baseKey, source, patchedFiles: patched };
  await atomicWrite(path.join(out, FLAVOR_TREE), JSON.stringify(tree, null, 2));
  return artifacts;
}

/**
 * The pristine source with the flavor's patches applied, once per (source version, patches): a
 * hard-link copy (`cp -al`, directory entries only), then GNU patch, which writes each file it
 * changes as a new file and renames it into place, so the pristine tree's files are never written.
 * That is checked: a patched file that still shares its inode with the pristine one is an error.
 */
async function patchedSource(pristine: string, version: string, flavor: Flavor): Promise<string> {
  const id = sha256(FLAVOR_RECIPE, ...flavor.patches.flatMap((p) => [p.name, p.text])).slice(0, 12);
  const dir = path.join(cacheDir(), 'src', `${SOURCE_PACKAGE}_${version}+${flavor.name}-${id}`);
  const marker = path.join(dir, '.skiff-complete');
  if (await exists(marker)) return dir;
  return withLock(`${dir}.lock`, async () => {
    if (await exists(marker)) return dir;
    await fs.rm(dir, { recursive: true, force: true });
    await runTool('cp', ['-al', pristine, dir]);
    await fs.rm(marker); // a hard link to the pristine tree's marker
    for (const p of flavor.patches) {
      await runTool('patch', ['-p1', '--batch', '--forward', '--no-backup-if-mismatch', '-d', dir, '-i', p.file]);
      for (const f of patchedFiles(p.text)) {
        const [mine, theirs] = await Promise.all([fs.stat(path.join(dir, f)), fs.stat(path.join(pristine, f)).catch(() => undefined)]);
        if (theirs && mine.ino === theirs.ino) {
          throw new KernelBuildError(
            `patch wrote ${f} in place through its hard link while applying ${p.name}, which changed the shared source in ${pristine}: remove that directory (skiff unpacks it again) and use GNU patch`,
          );
        }
      }
    }
    await atomicWrite(marker, `${version} ${flavor.name} ${id}`);
    return dir;
  });
}

/**
 * Makes a copied build tree refer to another source tree and to its own place. Kbuild builds out
 * of tree with absolute source paths, and the tools it builds (objtool, on which every object
 * depends) with absolute output paths: both are in the command lines it records (.*.cmd) and in
 * dependency files (.d), and a changed command line recompiles. Rewriting them (mtimes kept) makes
 * the copy see the same commands, and the hard-linked files' unchanged mtimes, so only what the
 * patches and the config change rebuilds.
 */
async function relocateBuildTree(out: string, moves: [from: string, to: string][]): Promise<void> {
  const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  // A path, not the start of a longer name (the patched source's name starts with the pristine one's).
  const pattern = new RegExp(`(${moves.map(([from]) => escape(from)).join('|')})(?![A-Za-z0-9_.+-])`, 'g');
  const target = new Map(moves);
  const rewrite = async (file: string) => {
    const text = await fs.readFile(file, 'latin1');
    const changed = text.replace(pattern, (from) => target.get(from)!);
    if (changed === text) return;
    const st = await fs.stat(file);
    await fs.writeFile(file, changed, 'latin1');
    await fs.utimes(file, st.atime, st.mtime);
  };
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await fs.readdir(dir, { withFileTypes: true })) {
      const file = path.join(dir, entry.name);
      if (entry.isDirectory()) await walk(file);
      else if (entry.isFile() && (entry.name.endsWith('.cmd') || entry.name.endsWith('.d'))) await rewrite(file);
    }
  };
  await walk(out);
  await rewrite(path.join(out, 'Makefile'));
  await fs.rm(path.join(out, 'source'), { force: true });
  await fs.symlink(moves[0][1], path.join(out, 'source'));
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
