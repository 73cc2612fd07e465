// A FileSet is the guest file tree an initrd is made of, before it is written: every entry says
// where it came from, so a clash between two sources is an error that names both. Paths are
// guest paths without a leading slash ("usr/bin/crun"). Parents are created as 0755 directories.
import { CpioWriter, normalizePath } from './cpio.js';

export type FileEntry =
  | { kind: 'file'; path: string; mode: number; source: string; origin: string }
  | { kind: 'file'; path: string; mode: number; contents: Uint8Array; origin: string }
  | { kind: 'dir'; path: string; mode: number; origin: string }
  | { kind: 'symlink'; path: string; target: string; origin: string }
  | { kind: 'char'; path: string; mode: number; major: number; minor: number; origin: string };

export class FileSetError extends Error {}

function sameEntry(a: FileEntry, b: FileEntry): boolean {
  if (a.kind !== b.kind) return false;
  switch (a.kind) {
    case 'dir':
      return true; // a directory named twice is one directory; the first mode wins
    case 'symlink':
      return a.target === (b as typeof a).target;
    case 'char': {
      const c = b as typeof a;
      return a.major === c.major && a.minor === c.minor && a.mode === c.mode;
    }
    case 'file': {
      const c = b as typeof a;
      if (a.mode !== c.mode) return false;
      if ('source' in a && 'source' in c) return a.source === c.source;
      if ('contents' in a && 'contents' in c) return Buffer.from(a.contents).equals(Buffer.from(c.contents));
      return false;
    }
  }
}

export class FileSet {
  private readonly entries = new Map<string, FileEntry>();

  /** Adds an entry; the same entry twice is kept once, two different entries at one path are an error. */
  add(entry: FileEntry): void {
    const path = normalizePath(entry.path);
    const normalized = { ...entry, path } as FileEntry;
    const existing = this.entries.get(path);
    if (existing) {
      if (sameEntry(existing, normalized)) return;
      throw new FileSetError(`/${path} comes from both ${existing.origin} and ${entry.origin}`);
    }
    this.entries.set(path, normalized);
  }

  /** Adds every entry of another set (the other set's entries keep their origins). */
  merge(other: FileSet): void {
    for (const entry of other.list()) this.add(entry);
  }

  get(path: string): FileEntry | undefined {
    return this.entries.get(normalizePath(path));
  }

  has(path: string): boolean {
    return this.entries.has(normalizePath(path));
  }

  get size(): number {
    return this.entries.size;
  }

  /** Entries sorted by path, so that output never depends on the order sources were added in. */
  list(): FileEntry[] {
    return [...this.entries.values()].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  }

  /** Writes the set into a cpio archive, parents before children. */
  writeInto(cpio: CpioWriter): void {
    const entries = this.list();
    const dirs = new Set(entries.filter((e) => e.kind === 'dir').map((e) => e.path));
    for (const entry of entries) {
      const parts = entry.path.split('/');
      for (let i = 1; i < parts.length; i++) {
        const parent = parts.slice(0, i).join('/');
        if (dirs.has(parent)) continue;
        const given = this.entries.get(parent);
        if (given && given.kind !== 'dir') {
          throw new FileSetError(`/${entry.path} (${entry.origin}) is inside /${parent}, which is not a directory (${given.origin})`);
        }
        cpio.dir(parent, { mode: 0o755 });
        dirs.add(parent);
      }
      switch (entry.kind) {
        case 'dir':
          cpio.dir(entry.path, { mode: entry.mode });
          break;
        case 'symlink':
          cpio.symlink(entry.path, entry.target);
          break;
        case 'char':
          cpio.charDevice(entry.path, entry.major, entry.minor, { mode: entry.mode });
          break;
        case 'file':
          if ('source' in entry) cpio.hostFile(entry.path, entry.source, { mode: entry.mode });
          else cpio.file(entry.path, entry.contents, { mode: entry.mode });
          break;
      }
    }
  }
}
