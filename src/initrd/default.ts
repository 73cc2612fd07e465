// The default initrd of `skiff boot`: skiff-init as /init and busybox-static for a shell and the
// usual tools. Built once per (skiff-init, busybox) content and cached.
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { skiffInitBinary } from '../paths.js';
import { cacheDir, exists, sha256 } from '../store/store.js';
import { CpioWriter } from './cpio.js';

const execFileP = promisify(execFile);
const RECIPE = 'skiff-default-initrd-1';
export const BUSYBOX = '/bin/busybox';

export class InitrdError extends Error {}

async function readInput(file: string, missing: string): Promise<Buffer> {
  try {
    return await fs.readFile(file);
  } catch {
    throw new InitrdError(`${file} not found: ${missing}`);
  }
}

/** Every directory above each path, parents first. */
function parentsOf(paths: string[]): string[] {
  const dirs = new Set<string>();
  for (const p of paths) {
    const parts = p.split('/').filter(Boolean);
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
  }
  return [...dirs].sort((a, b) => a.split('/').length - b.split('/').length || a.localeCompare(b));
}

export async function defaultInitrd(): Promise<string> {
  const init = await readInput(skiffInitBinary(), 'build skiff-init with "npm run build:init"');
  const busybox = await readInput(BUSYBOX, 'install it with "apt-get install busybox-static"');
  const file = path.join(cacheDir(), 'initrd', `default-${sha256(RECIPE, init, busybox).slice(0, 16)}.cpio`);
  if (await exists(file)) return file;

  const { stdout } = await execFileP(BUSYBOX, ['--list-full']);
  const applets = stdout.split('\n').map((l) => l.trim()).filter((l) => l && !l.includes('..'));
  const cpio = new CpioWriter();
  const fixedDirs = ['bin', 'sbin', 'usr', 'usr/bin', 'usr/sbin', 'dev', 'etc', 'proc', 'sys', 'run', 'tmp', 'root'];
  const dirs = new Set([...fixedDirs, ...parentsOf(applets)]);
  for (const dir of [...dirs].sort((a, b) => a.split('/').length - b.split('/').length || a.localeCompare(b))) {
    cpio.dir(dir, { mode: dir === 'tmp' ? 0o1777 : dir === 'root' ? 0o700 : 0o755 });
  }
  // The kernel opens /dev/console for PID 1's stdio before devtmpfs is mounted.
  cpio.charDevice('dev/console', 5, 1, { mode: 0o600 });
  cpio.file('init', init, { mode: 0o755 });
  cpio.file('bin/busybox', busybox, { mode: 0o755 });
  for (const applet of applets) {
    if (applet === 'bin/busybox') continue;
    cpio.symlink(applet, '/bin/busybox');
  }
  cpio.file('etc/passwd', 'root:x:0:0:root:/root:/bin/sh\n');
  cpio.file('etc/group', 'root:x:0:\n');
  cpio.file('etc/hostname', 'skiff\n');
  await fs.mkdir(path.dirname(file), { recursive: true });
  await cpio.writeTo(file);
  return file;
}
