// The image spec: YAML in, one validated, immutable ImageSpec out. Every error names the spec's
// file:line:col and what was expected there; nothing after this module re-checks the spec.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { isMap, isScalar, isSeq, LineCounter, parseDocument, type Node, type Pair, type YAMLMap } from 'yaml';
import { KERNEL_FLAVORS, type KernelFlavor } from '../kernel/flavors.js';

export class SpecError extends Error {}

export type SpecKernel =
  | { readonly kind: 'config'; readonly fragment: string; readonly flavor?: KernelFlavor }
  | { readonly kind: 'path'; readonly path: string };

export type SpecFile =
  | { readonly path: string; readonly mode: number; readonly contents: string }
  | { readonly path: string; readonly mode: number; readonly source: string }
  | { readonly path: string; readonly symlink: string }
  | { readonly path: string; readonly mode: number; readonly directory: true };

export interface ImageSpec {
  /** The spec file (absolute), for messages and the manifest. */
  readonly file: string;
  /** PRETTY_NAME in the image's os-release; default: the spec file's name. */
  readonly name: string;
  readonly kernel: SpecKernel;
  /** The image's own kernel command line (a UKI's .cmdline). */
  readonly cmdline: string;
  /** 'skiff' (skiff-init as /init) or the absolute guest path of another init. */
  readonly init: string;
  readonly packages: readonly string[];
  /** Host ELF programs (absolute host paths), each with its shared-library closure. */
  readonly binaries: readonly string[];
  /** Multi-call binaries (guest paths, e.g. /bin/busybox) that get a symlink per applet. */
  readonly applets: readonly string[];
  readonly files: readonly SpecFile[];
  readonly onboot: readonly (readonly string[])[];
  readonly services: readonly (readonly string[])[];
}

const TOP_KEYS = ['name', 'kernel', 'cmdline', 'init', 'packages', 'binaries', 'applets', 'files', 'onboot', 'services'] as const;
/** Debian policy §5.6.1: lower case letters, digits, + - . ; at least two characters, starting alphanumeric. */
const PACKAGE_NAME = /^[a-z0-9][a-z0-9+.-]+$/;

/** Maps YAML nodes back to file:line:col. */
class Locator {
  constructor(
    readonly file: string,
    private readonly lines: LineCounter,
  ) {}

  at(node: Node | null | undefined, message: string): SpecError {
    const offset = node?.range?.[0];
    if (offset === undefined) return new SpecError(`${this.file}: ${message}`);
    const { line, col } = this.lines.linePos(offset);
    return new SpecError(`${this.file}:${line}:${col}: ${message}`);
  }
}

function describe(node: Node | null | undefined): string {
  if (node === null || node === undefined) return 'nothing';
  if (isMap(node)) return 'a mapping';
  if (isSeq(node)) return 'a list';
  if (isScalar(node)) {
    const v = node.value;
    if (v === null) return 'nothing';
    if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)}`;
    return `${typeof v} ${String(v)}`;
  }
  return 'an alias or tag';
}

interface Ctx {
  loc: Locator;
  /** Directory relative paths in the spec are resolved against. */
  dir: string;
}

function str(ctx: Ctx, node: Node | null | undefined, what: string): string {
  if (!isScalar(node) || typeof node.value !== 'string') throw ctx.loc.at(node, `${what} must be a string, got ${describe(node)}`);
  return node.value;
}

function nonEmpty(ctx: Ctx, node: Node | null | undefined, what: string): string {
  const value = str(ctx, node, what);
  if (value.length === 0) throw ctx.loc.at(node, `${what} must not be empty`);
  if (value.includes('\0')) throw ctx.loc.at(node, `${what} contains a NUL byte`);
  return value;
}

function seq(ctx: Ctx, node: Node | null | undefined, what: string): Node[] {
  if (!isSeq(node)) throw ctx.loc.at(node, `${what} must be a list, got ${describe(node)}`);
  return node.items as Node[];
}

/** The pairs of a mapping, with unknown keys rejected by name. */
function mapping(ctx: Ctx, node: Node | null | undefined, what: string, allowed: readonly string[]): Map<string, { key: Node; value: Node | null }> {
  if (!isMap(node)) throw ctx.loc.at(node, `${what} must be a mapping, got ${describe(node)}`);
  const out = new Map<string, { key: Node; value: Node | null }>();
  for (const pair of (node as YAMLMap).items as Pair<Node, Node | null>[]) {
    const key = pair.key;
    if (!isScalar(key) || typeof key.value !== 'string') throw ctx.loc.at(key, `${what}: keys must be strings, got ${describe(key)}`);
    if (!allowed.includes(key.value)) {
      const where = what === 'the spec' ? 'unknown top-level key' : `${what}: unknown key`;
      throw ctx.loc.at(key, `${where} "${key.value}" (expected one of: ${allowed.join(', ')})`);
    }
    out.set(key.value, { key, value: pair.value });
  }
  return out;
}

function guestPath(ctx: Ctx, node: Node | null | undefined, what: string): string {
  const value = nonEmpty(ctx, node, what);
  if (!value.startsWith('/')) throw ctx.loc.at(node, `${what} must be an absolute guest path, got ${JSON.stringify(value)}`);
  const normal = path.posix.normalize(value);
  if (normal === '/') throw ctx.loc.at(node, `${what} must name something below /`);
  return normal.replace(/\/+$/, '');
}

/** A host path, resolved against the spec's directory; it must exist (checked here, with the location). */
async function hostPath(ctx: Ctx, node: Node | null | undefined, what: string, kind: 'file' | 'any' = 'file'): Promise<string> {
  const value = nonEmpty(ctx, node, what);
  const abs = path.resolve(ctx.dir, value);
  let st;
  try {
    st = await fs.stat(abs);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw ctx.loc.at(node, `${what} ${value}: ${code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
  }
  if (kind === 'file' && !st.isFile()) throw ctx.loc.at(node, `${what} ${value} is not a regular file`);
  return abs;
}

function mode(ctx: Ctx, node: Node | null | undefined): number {
  if (isScalar(node) && typeof node.value === 'number') {
    // YAML 1.2 reads 0755 as the decimal 755; only 0o755 is an octal number there.
    const source = (node as { source?: string }).source;
    if (Number.isInteger(node.value) && node.value >= 0 && node.value <= 0o7777 && typeof source === 'string' && /^0o/i.test(source)) return node.value;
    throw ctx.loc.at(node, `mode must be an octal string such as "0755" (quoted: YAML reads 0755 as the number 755)`);
  }
  const value = str(ctx, node, 'mode');
  if (!/^0?[0-7]{3,4}$/.test(value)) throw ctx.loc.at(node, `mode must be octal permission bits such as "0755", got ${JSON.stringify(value)}`);
  return parseInt(value, 8);
}

function argv(ctx: Ctx, node: Node | null | undefined, what: string): string[] {
  if (!isSeq(node)) {
    throw ctx.loc.at(node, `${what} must be a command as a list of strings, e.g. ["/bin/sh", "-c", "echo hi"], got ${describe(node)}`);
  }
  const items = (node.items as Node[]).map((item, i) => nonEmpty(ctx, item, `${what} argument ${i + 1}`));
  if (items.length === 0) throw ctx.loc.at(node, `${what} is an empty command`);
  return items;
}

async function parseKernel(ctx: Ctx, node: Node | null): Promise<SpecKernel> {
  const m = mapping(ctx, node, 'kernel', ['config', 'path', 'flavor']);
  const config = m.get('config');
  const file = m.get('path');
  if (config && file) throw ctx.loc.at(file.key, 'kernel: give either config (build one) or path (use this file), not both');
  if (file) {
    if (m.has('flavor')) throw ctx.loc.at(m.get('flavor')!.key, 'kernel: flavor applies only to a kernel built from config');
    return { kind: 'path', path: await hostPath(ctx, file.value, 'kernel path') };
  }
  if (!config) throw ctx.loc.at(node, 'kernel must have config (a fragment under kernel-config/) or path (a vmlinux or bzImage)');
  const fragment = await hostPath(ctx, config.value, 'kernel config');
  const flavorNode = m.get('flavor')?.value;
  if (flavorNode === undefined) return { kind: 'config', fragment };
  const flavor = str(ctx, flavorNode, 'kernel flavor');
  if (!(KERNEL_FLAVORS as readonly string[]).includes(flavor)) {
    throw ctx.loc.at(flavorNode, `kernel flavor must be one of: ${KERNEL_FLAVORS.join(', ')}; got ${JSON.stringify(flavor)}`);
  }
  return { kind: 'config', fragment, flavor: flavor as KernelFlavor };
}

async function parseFile(ctx: Ctx, node: Node, index: number): Promise<SpecFile> {
  const what = `files[${index}]`;
  const m = mapping(ctx, node, what, ['path', 'contents', 'source', 'symlink', 'directory', 'mode']);
  const pathNode = m.get('path');
  if (!pathNode) throw ctx.loc.at(node, `${what} needs a path`);
  const p = guestPath(ctx, pathNode.value, `${what}.path`);
  const kinds = (['contents', 'source', 'symlink', 'directory'] as const).filter((k) => m.has(k));
  if (kinds.length !== 1) {
    throw ctx.loc.at(kinds.length > 1 ? m.get(kinds[1])!.key : node, `${what} needs exactly one of contents, source, symlink, directory`);
  }
  const modeNode = m.get('mode');
  switch (kinds[0]) {
    case 'contents':
      return { path: p, mode: modeNode ? mode(ctx, modeNode.value) : 0o644, contents: str(ctx, m.get('contents')!.value, `${what}.contents`) };
    case 'source': {
      const source = await hostPath(ctx, m.get('source')!.value, `${what}.source`);
      // The host file's own mode is the default, so an executable stays executable.
      const defaultMode = (await fs.stat(source)).mode & 0o7777;
      return { path: p, mode: modeNode ? mode(ctx, modeNode.value) : defaultMode, source };
    }
    case 'symlink':
      if (modeNode) throw ctx.loc.at(modeNode.key, `${what}: a symlink has no mode`);
      return { path: p, symlink: nonEmpty(ctx, m.get('symlink')!.value, `${what}.symlink`) };
    case 'directory': {
      const d = m.get('directory')!.value;
      if (!isScalar(d) || d.value !== true) throw ctx.loc.at(d, `${what}.directory must be true, got ${describe(d)}`);
      return { path: p, mode: modeNode ? mode(ctx, modeNode.value) : 0o755, directory: true };
    }
  }
}

/** Parses and validates a spec's text. `file` is used for messages and to resolve relative paths. */
export async function parseSpec(text: string, file: string, defaults: { fragment: string }): Promise<ImageSpec> {
  const abs = path.resolve(file);
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, keepSourceTokens: true });
  const display = path.relative(process.cwd(), abs) || abs;
  if (doc.errors.length > 0) {
    const err = doc.errors[0];
    const pos = lines.linePos(err.pos[0]);
    throw new SpecError(`${display}:${pos.line}:${pos.col}: ${err.message.split('\n')[0].replace(/ at line \d+, column \d+:?$/, '')}`);
  }
  const ctx: Ctx = { loc: new Locator(display, lines), dir: path.dirname(abs) };
  const root = doc.contents as Node | null;
  if (root === null || (isScalar(root) && root.value === null)) throw new SpecError(`${display}: the spec is empty (expected a mapping with kernel, packages, files, ...)`);
  const top = mapping(ctx, root, 'the spec', TOP_KEYS);
  const get = (key: (typeof TOP_KEYS)[number]) => top.get(key)?.value;
  const list = (key: (typeof TOP_KEYS)[number]): Node[] => (top.has(key) ? seq(ctx, get(key), key) : []);

  const packages = list('packages').map((n, i) => {
    const name = nonEmpty(ctx, n, `packages[${i}]`);
    if (!PACKAGE_NAME.test(name)) throw ctx.loc.at(n, `packages[${i}]: ${JSON.stringify(name)} is not a Debian package name`);
    return name;
  });
  const binaries: string[] = [];
  for (const [i, n] of list('binaries').entries()) binaries.push(await hostPath(ctx, n, `binaries[${i}]`));
  const files: SpecFile[] = [];
  for (const [i, n] of list('files').entries()) files.push(await parseFile(ctx, n, i));
  const seen = new Map<string, number>();
  for (const [i, f] of files.entries()) {
    const earlier = seen.get(f.path);
    if (earlier !== undefined) throw ctx.loc.at(list('files')[i], `files[${i}]: ${f.path} is already given by files[${earlier}]`);
    seen.set(f.path, i);
  }
  let init = 'skiff';
  if (top.has('init')) {
    const value = nonEmpty(ctx, get('init'), 'init');
    init = value === 'skiff' ? value : guestPath(ctx, get('init'), 'init (skiff, or an absolute guest path)');
  }

  const spec: ImageSpec = {
    file: abs,
    name: top.has('name') ? nonEmpty(ctx, get('name'), 'name') : path.basename(abs).replace(/\.ya?ml$/, ''),
    kernel: top.has('kernel') ? await parseKernel(ctx, get('kernel') ?? null) : { kind: 'config', fragment: defaults.fragment },
    cmdline: top.has('cmdline') ? str(ctx, get('cmdline'), 'cmdline').trim() : '',
    init,
    packages,
    binaries,
    applets: list('applets').map((n, i) => guestPath(ctx, n, `applets[${i}]`)),
    files,
    onboot: list('onboot').map((n, i) => argv(ctx, n, `onboot[${i}]`)),
    services: list('services').map((n, i) => argv(ctx, n, `services[${i}]`)),
  };
  return deepFreeze(spec);
}

export async function readSpec(file: string, defaults: { fragment: string }): Promise<ImageSpec> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new SpecError(`spec ${file}: ${code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'is a directory' : (err as Error).message}`);
  }
  return parseSpec(text, file, defaults);
}

function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object') {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}
