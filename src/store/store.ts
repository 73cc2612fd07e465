// On-disk state: where skiff keeps its cache, data and runtime files, and the two primitives every
// writer uses so that concurrent skiff processes never see or leave a half-written file.
import { createHash, randomBytes } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export class StoreError extends Error {}

function xdg(envName: string, fallback: string): string {
  const value = process.env[envName];
  return value && path.isAbsolute(value) ? value : path.join(os.homedir(), fallback);
}

/** Kernels, boot images, initrds: everything that can be rebuilt. `SKIFF_CACHE_DIR` overrides. */
export function cacheDir(): string {
  return process.env.SKIFF_CACHE_DIR || path.join(xdg('XDG_CACHE_HOME', '.cache'), 'skiff');
}

/** Images and volumes: what the user put there. `SKIFF_DATA_DIR` overrides. */
export function dataDir(): string {
  return process.env.SKIFF_DATA_DIR || path.join(xdg('XDG_DATA_HOME', '.local/share'), 'skiff');
}

/** Sockets and per-VM scratch files; private to the user (0700). */
export async function runtimeDir(): Promise<string> {
  const base = process.env.XDG_RUNTIME_DIR;
  const dir = base ? path.join(base, 'skiff') : path.join(os.tmpdir(), `skiff-${process.getuid?.() ?? 'user'}`);
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const st = await fs.lstat(dir);
  if (!st.isDirectory() || (process.getuid && st.uid !== process.getuid()) || (st.mode & 0o077) !== 0) {
    throw new StoreError(`runtime directory ${dir} must be a directory owned by you with mode 0700`);
  }
  return dir;
}

/** One VM's directory for its sockets and status file, and how to let go of it when the VM ends. */
export interface VmDir {
  readonly path: string;
  /** Removes what skiff made there (and the directory, if skiff made it and nothing else is left). */
  release(): Promise<void>;
}

/**
 * The names skiff's engines create in a VM directory (DeviceServer's vhost-user sockets in
 * hypervisor/transport/device_server.cc, UnixVsockHost's `vsock`, src/vm/qemu.ts's status file); a
 * user's `vsock_PORT` listeners are not among them.
 */
const VM_DIR_ENTRIES = /^(vsock|skiff-status|(blk\d+|rng|vsock|net)\.sock)$/;
/** In a VM directory the user chose: the pid of the skiff that uses it. */
const VM_DIR_LOCK = '.skiff-vm';

/**
 * A VM's directory: by default a fresh private one under the runtime directory, removed whole when
 * the VM ends. `chosen` (`skiff boot --vm-dir`) is one the user names, so that the vsock paths are
 * known before the VM starts and host listeners (`vsock_PORT`) can be put there first. It is
 * created 0700 if missing, and must otherwise be a directory of the user's that nobody else can
 * enter. skiff claims it with a lock file holding its pid: a directory a live skiff holds is
 * refused; sockets a dead one left behind are removed. Only skiff's own entries go at the end.
 */
export async function makeVmDir(chosen?: string): Promise<VmDir> {
  if (chosen === undefined) {
    const dir = await fs.mkdtemp(path.join(await runtimeDir(), 'vm-'));
    return { path: dir, release: () => fs.rm(dir, { recursive: true, force: true }).catch(() => {}) };
  }
  const dir = path.resolve(chosen);
  const lock = path.join(dir, VM_DIR_LOCK);
  let created = false;
  let locked = false;
  // Never throws: a VM's ending must not fail on its clean-up. Entries go only while skiff holds
  // the lock: before that they may be another VM's.
  const release = async () => {
    if (locked) {
      const names = await fs.readdir(dir).catch(() => [] as string[]);
      await Promise.all(names.filter((name) => VM_DIR_ENTRIES.test(name)).map((name) => fs.rm(path.join(dir, name), { force: true }).catch(() => {})));
      await fs.rm(lock, { force: true }).catch(() => {});
      locked = false;
    }
    if (created) await fs.rmdir(dir).catch(() => {});
  };
  const fail = async (why: string) => {
    await release();
    return new StoreError(`VM directory ${chosen}: ${why}`);
  };
  try {
    await fs.mkdir(dir, { mode: 0o700 });
    created = true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'EEXIST') throw await fail(code === 'ENOENT' ? 'its parent directory does not exist' : (err as Error).message);
  }
  const st = await fs.lstat(dir);
  if (!st.isDirectory()) throw await fail('not a directory');
  if (process.getuid && st.uid !== process.getuid()) throw await fail('owned by another user');
  if ((st.mode & 0o077) !== 0) throw await fail(`mode ${(st.mode & 0o777).toString(8)} lets others reach the VM's sockets (chmod 700 it)`);
  for (let attempt = 0; !locked; attempt++) {
    try {
      await fs.writeFile(lock, `${process.pid}\n`, { flag: 'wx', mode: 0o600 });
      locked = true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw await fail((err as Error).message);
      const pid = Number.parseInt(await fs.readFile(lock, 'utf8').catch(() => ''), 10);
      if (attempt > 0 || processAlive(pid)) throw await fail(`in use by another skiff (process ${pid}; ${VM_DIR_LOCK} holds its pid)`);
      await fs.rm(lock, { force: true }); // its skiff is gone
    }
  }
  for (const name of (await fs.readdir(dir)).filter((n) => VM_DIR_ENTRIES.test(n))) {
    // Nobody uses this directory now: skiff's sockets here are a dead VM's. Anything else with
    // one of skiff's names is the user's, and skiff would have replaced it.
    if (!(await fs.lstat(path.join(dir, name))).isSocket() && name !== 'skiff-status') {
      locked = false; // the user's entry stays: release() removes skiff's names only while locked
      await fs.rm(lock, { force: true });
      throw await fail(`${name} is in the way and is not a socket skiff left (move it away)`);
    }
    await fs.rm(path.join(dir, name), { force: true });
  }
  return { path: dir, release };
}

export function sha256(...parts: (string | Uint8Array)[]): string {
  const h = createHash('sha256');
  for (const p of parts) {
    h.update(typeof p === 'string' ? Buffer.from(p) : p);
    h.update('\0');
  }
  return h.digest('hex');
}

export function tempNameFor(target: string): string {
  return `${target}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
}

/** Writes a whole file so that readers see the old content or the new, never a part. */
export async function atomicWrite(target: string, data: string | Uint8Array, mode = 0o644): Promise<void> {
  await fs.mkdir(path.dirname(target), { recursive: true });
  const tmp = tempNameFor(target);
  try {
    await fs.writeFile(tmp, data, { mode });
    await fs.rename(tmp, target);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
}

/** Copies a file into place atomically. */
export async function atomicCopy(source: string, target: string): Promise<void> {
  await fs.mkdir(path.dirname(target), { recursive: true });
  const tmp = tempNameFor(target);
  try {
    await fs.copyFile(source, tmp);
    await fs.rename(tmp, target);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
}

export async function exists(file: string): Promise<boolean> {
  try {
    await fs.access(file, constants.F_OK);
    return true;
  } catch {
    return false;
  }
}

function processAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Runs fn while holding an exclusive lock file. A lock left by a process that no longer exists is
 * taken over; a live holder is waited for, and onWait is told once who it is.
 */
export async function withLock<T>(lockPath: string, fn: () => Promise<T>, onWait?: (holderPid: number) => void): Promise<T> {
  await fs.mkdir(path.dirname(lockPath), { recursive: true });
  let told = false;
  for (;;) {
    try {
      const fh = await fs.open(lockPath, 'wx');
      await fh.writeFile(String(process.pid));
      await fh.close();
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const holder = Number.parseInt(await fs.readFile(lockPath, 'utf8').catch(() => ''), 10);
      if (Number.isInteger(holder) && holder > 0 && processAlive(holder) && holder !== process.pid) {
        if (!told) onWait?.(holder);
        told = true;
        await new Promise((r) => setTimeout(r, 250));
        continue;
      }
      // Stale (its writer died) or still being written: take it over only if it is really stale.
      if (!Number.isInteger(holder)) {
        await new Promise((r) => setTimeout(r, 50));
        const again = await fs.readFile(lockPath, 'utf8').catch(() => '');
        if (again === '') await fs.rm(lockPath, { force: true });
        continue;
      }
      await fs.rm(lockPath, { force: true });
    }
  }
  try {
    return await fn();
  } finally {
    await fs.rm(lockPath, { force: true });
  }
}
