// What `skiff inspect` reports of a boot image: format, kernel, cmdline, initrd contents, sha256.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { inspectKernel } from '../kernel/inspect.js';
import { listCpio, type CpioListing } from '../initrd/cpio.js';
import { fileSha256 } from './build.js';
import { openImage } from './open.js';

export interface ImageReport {
  image: string;
  format: 'uki' | 'dir';
  /** sha256 of the UKI file, or of the directory's manifest.json. */
  sha256: string;
  bytes: number;
  kernel: { format: string; version?: string; bytes: number; pvhEntry?: string };
  cmdline: string;
  osrel?: string;
  sections?: { name: string; bytes: number }[];
  initrd?: {
    bytes: number;
    entries: number;
    files: number;
    dirs: number;
    symlinks: number;
    other: number;
    /** Bytes of regular files under each top-level directory. */
    topLevel: { path: string; bytes: number }[];
    largest: { path: string; bytes: number }[];
  };
}

function summarize(list: CpioListing[], bytes: number): NonNullable<ImageReport['initrd']> {
  const count = (kind: CpioListing['kind']) => list.filter((e) => e.kind === kind).length;
  const files = list.filter((e) => e.kind === 'file');
  const top = new Map<string, number>();
  for (const f of files) {
    const first = f.path.split('/')[0];
    const key = f.path.includes('/') ? `/${first}` : `/${f.path}`;
    top.set(key, (top.get(key) ?? 0) + f.size);
  }
  return {
    bytes,
    entries: list.length,
    files: files.length,
    dirs: count('dir'),
    symlinks: count('symlink'),
    other: list.length - files.length - count('dir') - count('symlink'),
    topLevel: [...top].map(([p, b]) => ({ path: p, bytes: b })).sort((a, b) => b.bytes - a.bytes),
    largest: [...files].sort((a, b) => b.size - a.size).slice(0, 5).map((f) => ({ path: `/${f.path}`, bytes: f.size })),
  };
}

export async function inspectImage(image: string): Promise<ImageReport> {
  const opened = await openImage(image);
  const kernelInfo = await inspectKernel(opened.kernel);
  const kernelBytes = (await fs.stat(opened.kernel)).size;
  let sha256: string;
  let bytes: number;
  let osrel: string | undefined;
  let sections: ImageReport['sections'];
  if (opened.format === 'uki') {
    const { parseUki } = await import('./uki.js');
    const data = await fs.readFile(opened.source);
    const uki = parseUki(data);
    sha256 = opened.sha256!;
    bytes = data.length;
    osrel = uki.osrel;
    sections = uki.sections.map((s: { name: string; virtualSize: number }) => ({ name: s.name, bytes: s.virtualSize }));
  } else {
    const manifest = path.join(opened.source, 'manifest.json');
    sha256 = await fileSha256(manifest);
    bytes = 0;
    for (const name of await fs.readdir(opened.source)) bytes += (await fs.stat(path.join(opened.source, name))).size;
    osrel = (JSON.parse(await fs.readFile(manifest, 'utf8')) as { osrel?: string }).osrel;
  }
  let initrd: ImageReport['initrd'];
  if (opened.initrd) {
    const data = await fs.readFile(opened.initrd);
    initrd = summarize(listCpio(data), data.length);
  }
  return {
    image: opened.source,
    format: opened.format,
    sha256,
    bytes,
    kernel: {
      format: kernelInfo.format,
      version: kernelInfo.version ?? opened.version,
      bytes: kernelBytes,
      pvhEntry: kernelInfo.pvhEntry === undefined ? undefined : `0x${kernelInfo.pvhEntry.toString(16)}`,
    },
    cmdline: opened.cmdline,
    osrel,
    sections,
    initrd,
  };
}
