// The default boot image of `skiff boot`: built from the committed spec images/default.yml by the
// same builder as any other image, as a directory (its vmlinux boots through PVH, no decompression),
// and cached under the hash of its manifest. A memo of the inputs' stat() fingerprints lets a boot
// skip re-hashing them when nothing changed.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { cachedKernel, defaultFragment } from '../kernel/build.js';
import { packageRoot } from '../paths.js';
import { readSpec, type ImageSpec } from '../spec/spec.js';
import { atomicWrite, cacheDir, exists } from '../store/store.js';
import { buildImage, type ImageBuildProgress, type BuildResult } from './build.js';
import { openImage, type BootableImage } from './open.js';

const MEMO_VERSION = 1;

export function defaultSpecFile(): string {
  return path.join(packageRoot(), 'images', 'default.yml');
}

interface Fingerprint {
  path: string;
  size: number;
  mtimeMs: number;
  ino: number;
}

interface Memo {
  version: number;
  kernelKey: string;
  inputs: Fingerprint[];
  dir: string;
}

async function fingerprint(file: string): Promise<Fingerprint | undefined> {
  const st = await fs.stat(file).catch(() => undefined);
  return st && { path: file, size: st.size, mtimeMs: st.mtimeMs, ino: st.ino };
}

async function memoHolds(memo: Memo, kernelKey: string | undefined): Promise<boolean> {
  if (memo.version !== MEMO_VERSION || memo.kernelKey !== kernelKey || !(await exists(path.join(memo.dir, 'manifest.json')))) return false;
  const now = await Promise.all(memo.inputs.map((f) => fingerprint(f.path)));
  return now.every((f, i) => f && f.size === memo.inputs[i].size && f.mtimeMs === memo.inputs[i].mtimeMs && f.ino === memo.inputs[i].ino);
}

/** Every host file the image is made from, so that a change to any of them is noticed. */
function inputFiles(spec: ImageSpec, result: BuildResult): string[] {
  return [spec.file, spec.kernel.kind === 'config' ? spec.kernel.fragment : spec.kernel.path, ...result.sources];
}

export async function defaultImage(options: { onProgress?: (p: ImageBuildProgress) => void; jobs?: number } = {}): Promise<BootableImage> {
  const root = path.join(cacheDir(), 'images');
  const memoFile = path.join(root, 'default.memo.json');
  const kernelKey = (await cachedKernel())?.key;
  const memo = await fs.readFile(memoFile, 'utf8').then((t) => JSON.parse(t) as Memo, () => undefined);
  if (memo && (await memoHolds(memo, kernelKey))) return openImage(memo.dir);

  const spec = await readSpec(defaultSpecFile(), { fragment: defaultFragment() });
  // Built into a scratch name first; the final directory is named by the manifest's hash.
  const scratch = path.join(root, `default-build-${process.pid}`);
  const result: BuildResult = await buildImage(spec, { format: 'dir', output: scratch, jobs: options.jobs, onProgress: options.onProgress });
  const dir = path.join(root, `default-${result.sha256.slice(0, 16)}`);
  if (await exists(path.join(dir, 'manifest.json'))) await fs.rm(scratch, { recursive: true, force: true });
  else await fs.rename(scratch, dir);
  const inputs = (await Promise.all(inputFiles(spec, result).map(fingerprint))).filter((f): f is Fingerprint => f !== undefined);
  const newMemo: Memo = { version: MEMO_VERSION, kernelKey: (await cachedKernel())?.key ?? '', inputs, dir };
  await atomicWrite(memoFile, JSON.stringify(newMemo));
  return openImage(dir);
}

