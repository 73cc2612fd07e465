// The image builder: a validated ImageSpec in, one boot image out (a UKI, or a directory of kernel +
// initrd + cmdline + manifest). It reads as the recipe it is: kernel, file set, initrd, image.
// Every intermediate lands in the cache under a key made of the content it was made from, so a
// second build of an unchanged spec only hashes its inputs.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { buildKernel, cachedKernel, type KernelBuildProgress } from '../kernel/build.js';
import { inspectKernel } from '../kernel/inspect.js';
import { CpioWriter } from '../initrd/cpio.js';
import { FileSet, type FileEntry } from '../initrd/fileset.js';
import { usrMergedPath, USR_MERGED_DIRS, type PackageProgress } from '../initrd/packages.js';
import { skiffInitBinary } from '../paths.js';
import type { ImageSpec } from '../spec/spec.js';
import { atomicWrite, cacheDir, exists, sha256, withLock } from '../store/store.js';
import { encodeCommand } from '../vm/config.js';

const execFileP = promisify(execFile);

/** Bump when the assembly steps change in a way that changes the output. */
const RECIPE = 'skiff-image-recipe-1';
export const IMAGE_FORMATS = ['uki', 'dir'] as const;
export type ImageFormat = (typeof IMAGE_FORMATS)[number];
/** The directory format's manifest `format` value. */
export const DIR_MANIFEST = 'skiff-image-dir';

export class ImageBuildError extends Error {}

export type ImageBuildProgress =
  | { phase: 'kernel'; event: KernelBuildProgress }
  | { phase: 'packages'; event: PackageProgress }
  | { phase: 'files'; count: number }
  | { phase: 'initrd'; bytes: number; cached: boolean }
  | { phase: 'image'; format: ImageFormat };

export interface BuiltKernel {
  /** bzImage (a UKI's .linux; booted through the Linux boot protocol). */
  bzImage?: string;
  /** ELF vmlinux with a PVH note (what skiff boots when it can: no decompression). */
  vmlinux?: string;
  version: string;
}

export interface ImageManifest {
  format: typeof DIR_MANIFEST;
  version: 1;
  name: string;
  spec: string;
  kernel: { version: string; vmlinuz?: string; vmlinuzSha256?: string; vmlinux?: string; vmlinuxSha256?: string };
  initrd: { file: string; sha256: string; bytes: number; entries: number };
  cmdline: string;
  osrel: string;
}

export interface BuildResult {
  output: string;
  format: ImageFormat;
  kernel: BuiltKernel;
  initrd: { file: string; sha256: string; bytes: number; entries: number };
  cmdline: string;
  /** sha256 of the UKI file, or of the directory's manifest. */
  sha256: string;
  /** The host files the image's files were copied from. */
  sources: string[];
}

export interface BuildOptions {
  format: ImageFormat;
  output: string;
  jobs?: number;
  onProgress?: (p: ImageBuildProgress) => void;
}

// --- step 1: the kernel -----------------------------------------------------------------------

export async function resolveKernel(spec: ImageSpec, options: Pick<BuildOptions, 'jobs' | 'onProgress'> = {}): Promise<BuiltKernel> {
  if (spec.kernel.kind === 'path') {
    const info = await inspectKernel(spec.kernel.path).catch((err: Error) => {
      throw new ImageBuildError(`kernel ${spec.kernel.kind === 'path' ? spec.kernel.path : ''}: ${err.message}`);
    });
    const version = info.version ?? 'unknown';
    return info.format === 'bzimage' ? { bzImage: spec.kernel.path, version } : { vmlinux: spec.kernel.path, version };
  }
  const { fragment, flavor } = spec.kernel;
  const built =
    (await cachedKernel(fragment, flavor)) ??
    (await buildKernel({ fragment, flavor, jobs: options.jobs, onProgress: (event) => options.onProgress?.({ phase: 'kernel', event }) }));
  return { bzImage: built.bzImage, vmlinux: built.vmlinux, version: built.version };
}

// --- step 2: the file set -----------------------------------------------------------------------

/** What every image has unless its spec gives its own: the directories init mounts on, users. */
function baseEntries(files: FileSet, osrel: string): FileEntry[] {
  const origin = 'skiff base';
  const dirs: [string, number][] = [
    ['dev', 0o755], ['proc', 0o755], ['sys', 0o755], ['run', 0o755], ['tmp', 0o1777], ['root', 0o700], ['etc', 0o755],
  ];
  return [
    ...dirs.map(([p, mode]): FileEntry => ({ kind: 'dir', path: p, mode, origin })),
    // usr-merged, as Debian 12: /bin, /sbin, /lib... lead into /usr (where the image has any).
    ...USR_MERGED_DIRS.filter((d) => files.list().some((e) => e.path.startsWith(`usr/${d}/`))).map(
      (d): FileEntry => ({ kind: 'symlink', path: d, target: `usr/${d}`, origin }),
    ),
    // The kernel opens /dev/console for PID 1's stdio before devtmpfs is mounted.
    { kind: 'char', path: 'dev/console', mode: 0o600, major: 5, minor: 1, origin },
    { kind: 'file', path: 'etc/passwd', mode: 0o644, contents: Buffer.from('root:x:0:0:root:/root:/bin/sh\n'), origin },
    { kind: 'file', path: 'etc/group', mode: 0o644, contents: Buffer.from('root:x:0:\n'), origin },
    { kind: 'file', path: 'etc/hostname', mode: 0o644, contents: Buffer.from('skiff\n'), origin },
    // The same text as a UKI's .osrel section.
    { kind: 'file', path: 'etc/os-release', mode: 0o644, contents: Buffer.from(osrel), origin },
  ];
}

/** Symlinks for each applet of a multi-call binary, as the binary itself lists them. */
async function appletLinks(files: FileSet, binary: string): Promise<FileEntry[]> {
  const entry = files.get(guest(binary));
  if (!entry || entry.kind !== 'file' || !('source' in entry)) {
    throw new ImageBuildError(`applets: ${binary} is not a file of this image (add it through binaries, packages or files)`);
  }
  let stdout: string;
  try {
    ({ stdout } = await execFileP(entry.source, ['--list-full'], { maxBuffer: 1 << 20 }));
  } catch (err) {
    throw new ImageBuildError(`applets: ${binary} --list-full failed: ${(err as Error).message.split('\n')[0]}`);
  }
  const self = guest(binary);
  return stdout
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.includes('..'))
    .map(guest)
    .filter((l) => l !== self)
    .map((l): FileEntry => ({ kind: 'symlink', path: l, target: `/${self}`, origin: `applet of ${binary}` }));
}

function commandsFile(commands: readonly (readonly string[])[]): Buffer {
  return Buffer.from(commands.map((argv) => `${encodeCommand(argv)}\n`).join(''));
}

/** "/bin/sh" → "usr/bin/sh": an image's tree is usr-merged, as Debian 12 and its packages are. */
const guest = (p: string) => usrMergedPath(p.replace(/^\/+/, ''));

export async function assembleFiles(spec: ImageSpec, osrel: string, onProgress?: (p: ImageBuildProgress) => void): Promise<FileSet> {
  const files = new FileSet();
  for (const [i, f] of spec.files.entries()) {
    const origin = `files[${i}]`;
    const p = guest(f.path);
    if ('contents' in f) files.add({ kind: 'file', path: p, mode: f.mode, contents: Buffer.from(f.contents), origin });
    else if ('source' in f) files.add({ kind: 'file', path: p, mode: f.mode, source: f.source, origin });
    else if ('symlink' in f) files.add({ kind: 'symlink', path: p, target: f.symlink, origin });
    else files.add({ kind: 'dir', path: p, mode: f.mode, origin });
  }
  let packages: FileSet | undefined;
  if (spec.packages.length > 0) {
    const { fetchPackages } = await import('../initrd/packages.js');
    packages = (await fetchPackages([...spec.packages], { onProgress: (event) => onProgress?.({ phase: 'packages', event }) })).files;
    files.merge(packages);
  }
  if (spec.binaries.length > 0) {
    const { binaryClosure } = await import('../initrd/closure.js');
    // A host program uses a listed package's library over the host's, as the guest's ld.so will.
    for (const binary of spec.binaries) files.merge(await binaryClosure(binary, { packages }));
  }
  for (const binary of spec.applets) for (const link of await appletLinks(files, binary)) if (!files.has(link.path)) files.add(link);
  if (spec.init === 'skiff') {
    files.add({ kind: 'file', path: 'init', mode: 0o755, source: skiffInitBinary(), origin: 'init: skiff' });
  } else {
    if (!files.has(guest(spec.init))) throw new ImageBuildError(`init ${spec.init} is not a file of this image`);
    files.add({ kind: 'symlink', path: 'init', target: spec.init, origin: 'init' });
  }
  if (spec.onboot.length > 0) files.add({ kind: 'file', path: 'etc/skiff/onboot', mode: 0o644, contents: commandsFile(spec.onboot), origin: 'onboot' });
  if (spec.services.length > 0) files.add({ kind: 'file', path: 'etc/skiff/services', mode: 0o644, contents: commandsFile(spec.services), origin: 'services' });
  for (const entry of baseEntries(files, osrel)) if (!files.has(entry.path)) files.add(entry);
  onProgress?.({ phase: 'files', count: files.size });
  return files;
}

// --- step 3: the initrd -------------------------------------------------------------------------

export async function fileSha256(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** A key over everything the archive's bytes depend on: paths, kinds, modes, targets and content. */
async function fileSetKey(files: FileSet): Promise<string> {
  const lines: string[] = [RECIPE];
  for (const e of files.list()) {
    switch (e.kind) {
      case 'dir':
        lines.push(`d ${e.path} ${e.mode}`);
        break;
      case 'symlink':
        lines.push(`l ${e.path} ${e.target}`);
        break;
      case 'char':
        lines.push(`c ${e.path} ${e.mode} ${e.major} ${e.minor}`);
        break;
      case 'file':
        lines.push(`f ${e.path} ${e.mode} ${'source' in e ? await fileSha256(e.source) : sha256(e.contents)}`);
        break;
    }
  }
  return sha256(lines.join('\n'));
}

export async function writeInitrd(files: FileSet, onProgress?: (p: ImageBuildProgress) => void): Promise<BuildResult['initrd']> {
  const key = (await fileSetKey(files)).slice(0, 24);
  const file = path.join(cacheDir(), 'initrd', `image-${key}.cpio`);
  const meta = `${file}.json`;
  return withLock(`${file}.lock`, async () => {
    if ((await exists(file)) && (await exists(meta))) {
      const info = JSON.parse(await fs.readFile(meta, 'utf8')) as BuildResult['initrd'];
      onProgress?.({ phase: 'initrd', bytes: info.bytes, cached: true });
      return { ...info, file };
    }
    const cpio = new CpioWriter();
    files.writeInto(cpio);
    await fs.mkdir(path.dirname(file), { recursive: true });
    const { bytes, sha256: digest } = await cpio.writeTo(file);
    const info = { file, sha256: digest, bytes, entries: files.size };
    await atomicWrite(meta, JSON.stringify(info));
    onProgress?.({ phase: 'initrd', bytes, cached: false });
    return info;
  });
}

// --- step 4: the image --------------------------------------------------------------------------

export function osRelease(spec: ImageSpec, kernel: BuiltKernel): string {
  const quote = (s: string) => `"${s.replace(/["\\$`]/g, (c) => `\\${c}`)}"`;
  return [`NAME="skiff"`, `ID=skiff`, `PRETTY_NAME=${quote(`skiff image ${spec.name}`)}`, `IMAGE_ID=${quote(spec.name)}`, `IMAGE_VERSION=${quote(kernel.version)}`, ''].join('\n');
}

async function writeUkiImage(spec: ImageSpec, kernel: BuiltKernel, initrd: BuildResult['initrd'], output: string): Promise<string> {
  if (!kernel.bzImage) {
    throw new ImageBuildError(`a UKI needs a bzImage kernel (with the EFI stub); ${spec.kernel.kind === 'path' ? spec.kernel.path : 'the kernel'} is an ELF vmlinux: use --format dir`);
  }
  const { writeUki } = await import('./uki.js');
  const bytes = await writeUki({
    linux: await fs.readFile(kernel.bzImage),
    initrd: await fs.readFile(initrd.file),
    cmdline: spec.cmdline,
    osrel: osRelease(spec, kernel),
    uname: kernel.version,
  });
  await atomicWrite(output, bytes);
  return sha256(bytes);
}

/** The directory holds the same kernel, initrd and cmdline bytes as the UKI, plus the vmlinux when there is one. */
async function writeDirImage(spec: ImageSpec, kernel: BuiltKernel, initrd: BuildResult['initrd'], output: string): Promise<string> {
  const st = await fs.lstat(output).catch(() => undefined);
  if (st && !(st.isDirectory() && (await exists(path.join(output, 'manifest.json'))))) {
    throw new ImageBuildError(`${output} exists and is not a skiff image directory; not overwriting it`);
  }
  const temp = `${output}.tmp-${process.pid}`;
  await fs.rm(temp, { recursive: true, force: true });
  await fs.mkdir(temp, { recursive: true });
  const manifest: ImageManifest = {
    format: DIR_MANIFEST,
    version: 1,
    name: spec.name,
    spec: spec.file,
    kernel: { version: kernel.version },
    initrd: { file: 'initrd.cpio', sha256: initrd.sha256, bytes: initrd.bytes, entries: initrd.entries },
    cmdline: spec.cmdline,
    osrel: osRelease(spec, kernel),
  };
  if (kernel.bzImage) {
    await fs.copyFile(kernel.bzImage, path.join(temp, 'vmlinuz'));
    manifest.kernel.vmlinuz = 'vmlinuz';
    manifest.kernel.vmlinuzSha256 = await fileSha256(kernel.bzImage);
  }
  if (kernel.vmlinux) {
    await fs.copyFile(kernel.vmlinux, path.join(temp, 'vmlinux'));
    manifest.kernel.vmlinux = 'vmlinux';
    manifest.kernel.vmlinuxSha256 = await fileSha256(kernel.vmlinux);
  }
  await fs.copyFile(initrd.file, path.join(temp, 'initrd.cpio'));
  await fs.writeFile(path.join(temp, 'cmdline'), `${spec.cmdline}\n`);
  const text = `${JSON.stringify(manifest, null, 2)}\n`;
  await fs.writeFile(path.join(temp, 'manifest.json'), text);
  if (st) await fs.rm(output, { recursive: true, force: true });
  await fs.rename(temp, output);
  return sha256(text);
}

export async function buildImage(spec: ImageSpec, options: BuildOptions): Promise<BuildResult> {
  const kernel = await resolveKernel(spec, options);
  const files = await assembleFiles(spec, osRelease(spec, kernel), options.onProgress);
  const initrd = await writeInitrd(files, options.onProgress);
  options.onProgress?.({ phase: 'image', format: options.format });
  const output = path.resolve(options.output);
  await fs.mkdir(path.dirname(output), { recursive: true });
  const digest =
    options.format === 'uki' ? await writeUkiImage(spec, kernel, initrd, output) : await writeDirImage(spec, kernel, initrd, output);
  const sources = files.list().flatMap((e) => (e.kind === 'file' && 'source' in e ? [e.source] : []));
  return { output, format: options.format, kernel, initrd, cmdline: spec.cmdline, sha256: digest, sources };
}
