// The kernel build and inspection, on the real cached kernel and real Debian source.
import test from 'ava';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { buildKernel, cachedKernel, defaultFragment } from '../src/kernel/build.js';
import { KernelConfigError } from '../src/kernel/config.js';
import { inspectKernel } from '../src/kernel/inspect.js';
import { skiff } from './helpers.js';

const execFileP = promisify(execFile);

test('a second build of the same fragment is a cache hit, and --json names the artifacts', async (t) => {
  const kernel = await cachedKernel();
  if (!kernel) return t.fail('the default kernel is not built');
  const manifest = path.join(path.dirname(kernel.vmlinux), 'manifest.json');
  const before = await fs.readFile(manifest, 'utf8');
  const r = await skiff(['kernel', 'build', '--json']);
  t.is(r.code, 0, r.stderr);
  const json = JSON.parse(r.stdout);
  t.deepEqual(json, { vmlinux: kernel.vmlinux, bzImage: kernel.bzImage, config: kernel.config, version: kernel.version });
  t.is(await fs.readFile(manifest, 'utf8'), before, 'nothing was rebuilt');
  t.regex(kernel.version, /^6\.1\.\d+-skiff$/);
});

test('kernel info reads the vmlinux: ELF, version, PVH entry as readelf sees it', async (t) => {
  const kernel = (await cachedKernel())!;
  const info = await inspectKernel(kernel.vmlinux);
  t.is(info.format, 'elf');
  t.is(info.version, kernel.version);
  // readelf -n prints the Xen PHYS32_ENTRY note's descriptor as a little-endian hex dump.
  const { stdout } = await execFileP('readelf', ['-n', '--wide', kernel.vmlinux]);
  const dump = /^\s*Xen\s+0x[0-9a-f]+\s+Unknown note type: \(0x00000012\)\s+description data: ([0-9a-f ]+)$/m.exec(stdout);
  t.truthy(dump, stdout.slice(0, 2000));
  const bytes = Buffer.from(dump![1].replace(/\s+/g, ''), 'hex');
  const expected = bytes.length === 8 ? bytes.readBigUInt64LE() : BigInt(bytes.readUInt32LE());
  t.is(info.pvhEntry, expected);
  const r = await skiff(['kernel', 'info', kernel.vmlinux]);
  t.is(r.code, 0);
  t.regex(r.stdout, new RegExp(`^format: +ELF vmlinux\\nversion: +${kernel.version}\\nPVH entry: +0x${expected.toString(16)}\\n`));
});

test('kernel info reads the bzImage: version and boot protocol', async (t) => {
  const kernel = (await cachedKernel())!;
  const r = await skiff(['kernel', 'info', '--json', kernel.bzImage]);
  t.is(r.code, 0, r.stderr);
  const json = JSON.parse(r.stdout);
  t.is(json.format, 'bzimage');
  t.is(json.version, kernel.version);
  t.is(json.pvhEntry, null);
  t.regex(json.bootProtocol, /^2\.\d\d$/);
});

test('kernel info on something else: one line, exit 125', async (t) => {
  const r = await skiff(['kernel', 'info', '/etc/passwd']);
  t.is(r.code, 125);
  t.is(r.stderr, 'skiff: /etc/passwd is not a Linux kernel (neither an ELF vmlinux nor a bzImage)\n');
  const missing = await skiff(['kernel', 'info', '/nonexistent']);
  t.is(missing.stderr, 'skiff: cannot read kernel /nonexistent: no such file\n');
});

test('a fragment whose options olddefconfig drops fails naming each of them', async (t) => {
  // EROFS lives under MISC_FILESYSTEMS, and NFT_MASQ needs NF_TABLES: both are lost without them.
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-frag-'));
  const fragment = path.join(dir, 'bad.config');
  await fs.writeFile(fragment, '# a fragment with unmet dependencies\nCONFIG_64BIT=y\n# CONFIG_MISC_FILESYSTEMS is not set\nCONFIG_EROFS_FS=y\nCONFIG_NFT_MASQ=y\n');
  const err = await t.throwsAsync(buildKernel({ fragment }), { instanceOf: KernelConfigError });
  t.is(err?.message, `olddefconfig dropped or changed 2 requested option(s) from ${fragment}: CONFIG_EROFS_FS=y (got not set), CONFIG_NFT_MASQ=y (got not set)`);
});

test('a malformed fragment is refused before anything is built', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-frag-'));
  const fragment = path.join(dir, 'typo.config');
  await fs.writeFile(fragment, 'CONFIG_64BIT=y\nCONFIG_PVH y\n');
  const r = await skiff(['kernel', 'build', '--fragment', fragment]);
  t.is(r.code, 125);
  t.is(r.stderr, `skiff: ${fragment}:2: expected CONFIG_NAME=value or "# CONFIG_NAME is not set", got "CONFIG_PVH y"\n`);
});

test('the default fragment path points into the package', (t) => {
  t.true(defaultFragment().endsWith(path.join('kernel-config', '6.1', 'x86_64.config')));
});
