// The image spec parser: valid specs become frozen ImageSpecs; malformed ones give one exact
// file:line:col message each.
import test from 'ava';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseSpec, readSpec, SpecError } from '../src/spec/spec.js';

const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-spec-'));
const fragment = path.join(dir, 'x86_64.config');
await fs.writeFile(fragment, 'CONFIG_64BIT=y\n');
await fs.writeFile(path.join(dir, 'app'), '#!/bin/sh\necho app\n', { mode: 0o755 });
await fs.mkdir(path.join(dir, 'adir'));
const specFile = path.join(dir, 'image.yml');
const display = path.relative(process.cwd(), specFile);
const defaults = { fragment };

const parse = (text: string) => parseSpec(text, specFile, defaults);

test('the example spec of the issue parses into a frozen ImageSpec with resolved paths', async (t) => {
  const spec = await parse(`
kernel:   { config: x86_64.config }
cmdline:  "console=ttyS0 quiet"
init:     skiff
packages: [busybox-static, crun]
binaries: [/bin/busybox]
files:
  - { path: /etc/motd, contents: "hello\\n" }
  - { path: /srv/app, source: ./app, mode: "0755" }
  - { path: /srv/data, directory: true, mode: "0700" }
  - { path: /bin/sh, symlink: busybox }
onboot:   [["/bin/sh", "-c", "echo booted"]]
services: [["/bin/httpd", "-f", "-p", "80"]]
`);
  t.deepEqual(spec.kernel, { kind: 'config', fragment });
  t.is(spec.cmdline, 'console=ttyS0 quiet');
  t.is(spec.init, 'skiff');
  t.is(spec.name, 'image');
  t.deepEqual(spec.packages, ['busybox-static', 'crun']);
  t.deepEqual(spec.binaries, ['/bin/busybox']);
  t.deepEqual(spec.files, [
    { path: '/etc/motd', mode: 0o644, contents: 'hello\n' },
    { path: '/srv/app', mode: 0o755, source: path.join(dir, 'app') },
    { path: '/srv/data', mode: 0o700, directory: true },
    { path: '/bin/sh', symlink: 'busybox' },
  ]);
  t.deepEqual(spec.onboot, [['/bin/sh', '-c', 'echo booted']]);
  t.deepEqual(spec.services, [['/bin/httpd', '-f', '-p', '80']]);
  t.true(Object.isFrozen(spec) && Object.isFrozen(spec.files[0]) && Object.isFrozen(spec.onboot[0]));
});

test('defaults: skiff kernel from the default fragment, skiff-init, nothing else', async (t) => {
  const spec = await parse('name: tiny\n');
  t.deepEqual(spec.kernel, { kind: 'config', fragment });
  t.is(spec.init, 'skiff');
  t.is(spec.cmdline, '');
  t.deepEqual([spec.packages, spec.binaries, spec.files, spec.onboot, spec.services], [[], [], [], [], []]);
});

test('kernel path, flavor, a source file keeps its host mode, 0o octal mode', async (t) => {
  const a = await parse('kernel: { path: app }\n');
  t.deepEqual(a.kernel, { kind: 'path', path: path.join(dir, 'app') });
  const b = await parse('kernel: { config: x86_64.config, flavor: pvm-native }\nfiles: [{ path: /a, source: app }, { path: /b, contents: x, mode: 0o600 }]\n');
  t.deepEqual(b.kernel, { kind: 'config', fragment, flavor: 'pvm-native' });
  t.is((b.files[0] as { mode: number }).mode, 0o755);
  t.is((b.files[1] as { mode: number }).mode, 0o600);
});

const malformed: [string, string, string][] = [
  ['unknown top-level key', 'kernal: {}\n', `${display}:1:1: unknown top-level key "kernal" (expected one of: name, kernel, cmdline, init, packages, binaries, applets, files, onboot, services)`],
  ['YAML syntax', 'packages: [a,\n', `${display}:2:1: Flow sequence in block collection must be sufficiently indented and end with a ]`],
  ['duplicate key', 'cmdline: a\ncmdline: b\n', `${display}:2:1: Map keys must be unique`],
  ['not a mapping', '- a\n', `${display}:1:1: the spec must be a mapping, got a list`],
  ['empty', '', `${display}: the spec is empty (expected a mapping with kernel, packages, files, ...)`],
  ['packages not a list', 'packages: crun\n', `${display}:1:11: packages must be a list, got the string "crun"`],
  ['bad package name', 'packages: [Crun]\n', `${display}:1:12: packages[0]: "Crun" is not a Debian package name`],
  ['missing binary', 'binaries: [/no/such/prog]\n', `${display}:1:12: binaries[0] /no/such/prog: no such file`],
  ['binary is a directory', 'binaries: [adir]\n', `${display}:1:12: binaries[0] adir is not a regular file`],
  ['missing source', 'files:\n  - { path: /x, source: ./nope }\n', `${display}:2:25: files[0].source ./nope: no such file`],
  ['relative guest path', 'files: [{ path: etc/motd, contents: hi }]\n', `${display}:1:17: files[0].path must be an absolute guest path, got "etc/motd"`],
  ['two kinds in one file', 'files: [{ path: /a, contents: x, symlink: y }]\n', `${display}:1:34: files[0] needs exactly one of contents, source, symlink, directory`],
  ['unknown file key', 'files: [{ path: /a, contents: x, owner: root }]\n', `${display}:1:34: files[0]: unknown key "owner" (expected one of: path, contents, source, symlink, directory, mode)`],
  ['YAML 1.2 decimal mode', 'files: [{ path: /a, contents: x, mode: 0755 }]\n', `${display}:1:40: mode must be an octal string such as "0755" (quoted: YAML reads 0755 as the number 755)`],
  ['bad mode string', 'files: [{ path: /a, contents: x, mode: "rwx" }]\n', `${display}:1:40: mode must be octal permission bits such as "0755", got "rwx"`],
  ['same path twice', 'files:\n  - { path: /a, contents: x }\n  - { path: /a/, contents: y }\n', `${display}:3:5: files[1]: /a is already given by files[0]`],
  ['onboot as a string', 'onboot: ["echo hi"]\n', `${display}:1:10: onboot[0] must be a command as a list of strings, e.g. ["/bin/sh", "-c", "echo hi"], got the string "echo hi"`],
  ['empty service', 'services: [[]]\n', `${display}:1:12: services[0] is an empty command`],
  ['service argument not a string', 'services: [["/bin/x", 80]]\n', `${display}:1:23: services[0] argument 2 must be a string, got number 80`],
  ['kernel with both', 'kernel: { config: x86_64.config, path: app }\n', `${display}:1:34: kernel: give either config (build one) or path (use this file), not both`],
  ['kernel with neither', 'kernel: {}\n', `${display}:1:9: kernel must have config (a fragment under kernel-config/) or path (a vmlinux or bzImage)`],
  ['unknown flavor', 'kernel: { config: x86_64.config, flavor: fast }\n', `${display}:1:42: kernel flavor must be one of: pvm-native; got "fast"`],
  ['relative init', 'init: bin/sh\n', `${display}:1:7: init (skiff, or an absolute guest path) must be an absolute guest path, got "bin/sh"`],
  ['cmdline not a string', 'cmdline: [a]\n', `${display}:1:10: cmdline must be a string, got a list`],
];

for (const [name, text, message] of malformed) {
  test(`malformed: ${name}`, async (t) => {
    const err = await t.throwsAsync(parse(text), { instanceOf: SpecError });
    t.is(err?.message, message);
  });
}

test('a spec file that is missing or a directory is a one-line error', async (t) => {
  await t.throwsAsync(readSpec(path.join(dir, 'nope.yml'), defaults), { instanceOf: SpecError, message: `spec ${path.join(dir, 'nope.yml')}: no such file` });
  await t.throwsAsync(readSpec(dir, defaults), { instanceOf: SpecError, message: `spec ${dir}: is a directory` });
});

test('the committed default spec parses', async (t) => {
  const { defaultSpecFile } = await import('../src/image/default.js');
  const spec = await readSpec(defaultSpecFile(), defaults);
  t.is(spec.init, 'skiff');
  t.true(spec.binaries.includes('/bin/busybox'));
});
