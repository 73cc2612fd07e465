// Opens a boot image for booting without firmware: a UKI's sections are read directly (the kernel and
// initrd are extracted once into the cache, keyed by the image's hash), a directory image through its
// manifest. Images may come from anywhere, so everything read from them is checked.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { atomicWrite, cacheDir, exists } from '../store/store.js';
import { DIR_MANIFEST, fileSha256, type ImageManifest } from './build.js';

export class ImageError extends Error {}

export interface BootableImage {
  format: 'uki' | 'dir';
  /** The image as given. */
  source: string;
  /** What skiff boots: the vmlinux when the image has one (PVH, no decompression), else the bzImage. */
  kernel: string;
  initrd?: string;
  /** The image's own kernel command line. */
  cmdline: string;
  /** The kernel version the image says it carries, if it says. */
  version?: string;
  /** sha256 of a UKI file (what its extracted parts are cached under). */
  sha256?: string;
}

const MZ = 0x5a4d;

/** A file name inside an image directory: a plain name, never a path out of it. */
function member(dir: string, name: unknown, what: string): string {
  if (typeof name !== 'string' || name === '' || name.includes('/') || name === '.' || name === '..') {
    throw new ImageError(`${dir}/manifest.json: ${what} must be a file name in the image directory`);
  }
  return path.join(dir, name);
}

async function openDir(dir: string): Promise<BootableImage> {
  const manifestFile = path.join(dir, 'manifest.json');
  let manifest: ImageManifest;
  try {
    manifest = JSON.parse(await fs.readFile(manifestFile, 'utf8')) as ImageManifest;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ImageError(
      code === 'ENOENT'
        ? `${dir} is a directory without manifest.json: not an image made by "skiff build --format dir"`
        : `${manifestFile}: ${(err as Error).message}`,
    );
  }
  if (manifest === null || typeof manifest !== 'object' || manifest.format !== DIR_MANIFEST || manifest.version !== 1) {
    throw new ImageError(`${manifestFile}: not a skiff image manifest (format ${DIR_MANIFEST}, version 1)`);
  }
  const k = manifest.kernel ?? {};
  const kernelName = k.vmlinux ?? k.vmlinuz;
  if (kernelName === undefined) throw new ImageError(`${manifestFile}: names no kernel`);
  if (typeof manifest.cmdline !== 'string') throw new ImageError(`${manifestFile}: cmdline must be a string`);
  return {
    format: 'dir',
    source: dir,
    kernel: member(dir, kernelName, 'kernel'),
    initrd: manifest.initrd === undefined ? undefined : member(dir, manifest.initrd.file, 'initrd.file'),
    cmdline: manifest.cmdline,
    version: typeof k.version === 'string' ? k.version : undefined,
  };
}

async function openUki(file: string): Promise<BootableImage> {
  const digest = await fileSha256(file);
  const dir = path.join(cacheDir(), 'images', 'extracted', digest.slice(0, 24));
  const infoFile = path.join(dir, 'image.json');
  if (await exists(infoFile)) {
    const info = JSON.parse(await fs.readFile(infoFile, 'utf8')) as Omit<BootableImage, 'source'>;
    return { ...info, source: file, sha256: digest };
  }
  const { parseUki } = await import('./uki.js');
  const uki = parseUki(await fs.readFile(file));
  const kernel = path.join(dir, 'linux');
  await atomicWrite(kernel, uki.linux);
  let initrd: string | undefined;
  if (uki.initrd) {
    initrd = path.join(dir, 'initrd');
    await atomicWrite(initrd, uki.initrd);
  }
  const info: Omit<BootableImage, 'source'> = { format: 'uki', kernel, initrd, cmdline: (uki.cmdline ?? '').replace(/\0+$/, '').trim(), version: uki.uname?.trim() };
  await atomicWrite(infoFile, JSON.stringify(info));
  return { ...info, source: file, sha256: digest };
}

/** Reads a boot image: a UKI (.efi) file or an image directory. */
export async function openImage(image: string): Promise<BootableImage> {
  const abs = path.resolve(image);
  const st = await fs.stat(abs).catch((err: NodeJS.ErrnoException) => {
    throw new ImageError(`image ${image}: ${err.code === 'ENOENT' ? 'no such file or directory' : err.message}`);
  });
  if (st.isDirectory()) return openDir(abs);
  const head = Buffer.alloc(2);
  const fh = await fs.open(abs, 'r');
  try {
    await fh.read(head, 0, 2, 0);
  } finally {
    await fh.close();
  }
  if (head.readUInt16LE(0) !== MZ) {
    throw new ImageError(`image ${image} is neither a UKI (a PE/EFI file) nor an image directory`);
  }
  return openUki(abs);
}

/** True if `arg` names something that is a boot image rather than a guest command. */
export async function looksLikeImage(arg: string): Promise<boolean> {
  if (arg.endsWith('.efi')) return true;
  const st = await fs.stat(arg).catch(() => undefined);
  return st !== undefined && st.isDirectory() && (await exists(path.join(arg, 'manifest.json')));
}
