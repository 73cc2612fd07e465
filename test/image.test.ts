// The image builder end to end, through the CLI as users run it: specs become UKIs and image
// directories that boot on the QEMU engine (TCG here) with what the spec promised inside.
import test from 'ava';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { packageRoot } from '../src/paths.js';
import { fnv1a, guestSaid, skiff } from './helpers.js';

const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-image-'));
const defaultSpec = path.join(packageRoot(), 'images', 'default.yml');
const sha = async (file: string) => createHash('sha256').update(await fs.readFile(file)).digest('hex');

await fs.writeFile(path.join(dir, 'app'), '#!/bin/sh\necho "app ran with $# args"\n', { mode: 0o755 });
const appSpec = path.join(dir, 'app.yml');
await fs.writeFile(
  appSpec,
  `name: app-test
cmdline: "console=ttyS0"
packages: [hello]
binaries: [/bin/busybox, /usr/bin/crun]
applets: [/bin/busybox]
files:
  - { path: /etc/motd, contents: "hello from the spec\\n" }
  - { path: /srv/app, source: ./app }
  - { path: /srv/data, directory: true, mode: "0700" }
onboot:
  - ["/bin/sh", "-c", "echo onboot-one > /run/onboot"]
  - ["/bin/sh", "-c", "echo onboot-two >> /run/onboot"]
services:
  - ["/bin/sh", "-c", "echo started >> /run/svc"]
`,
);

// What the guest runs to show what the image holds; the service exits at once, so skiff-init has to
// restart it for a second line to appear.
const probe = [
  'sh',
  '-c',
  [
    'cat /etc/motd',
    '/srv/app a b',
    'cat /run/onboot',
    'stat -c "data %a" /srv/data',
    'crun --version | head -n 1',
    'hello',
    'i=0; while [ "$(wc -l < /run/svc)" -lt 2 ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done',
    'echo "service starts: $(wc -l < /run/svc)"',
    'exit 3',
  ].join('; '),
];

function checkProbe(t: import('ava').ExecutionContext, r: { code: number | null; stdout: string; stderr: string }) {
  t.is(r.code, 3, r.stderr);
  t.regex(r.stdout, /hello from the spec/);
  t.regex(r.stdout, /app ran with 2 args/);
  t.regex(r.stdout, /onboot-one\r?\nonboot-two/);
  t.regex(r.stdout, /data 700/);
  t.regex(r.stdout, /crun version \d+\.\d+/);
  t.regex(r.stdout, /Hello, world!/);
  t.regex(r.stdout, /service starts: [2-9]/);
  t.regex(r.stdout, /skiff-init: service \/bin\/sh ended with status 0; restarting it/);
}

test.serial('a spec builds to a UKI that boots directly: a Debian package, a host binary with its libraries, files, onboot, services', async (t) => {
  const out = path.join(dir, 'app.efi');
  const built = await skiff(['build', appSpec, '-o', out, '--quiet']);
  t.is(built.code, 0, built.stderr);
  t.regex(built.stdout, /format: {2}uki/);
  const r = await skiff(['boot', out, '--engine', 'qemu', '--timeout', '240', '--', ...probe]);
  checkProbe(t, r);
});

test.serial('the same spec as a directory image boots the same way (through the vmlinux)', async (t) => {
  const out = path.join(dir, 'app-dir');
  const built = await skiff(['build', appSpec, '-o', out, '--format', 'dir', '--quiet']);
  t.is(built.code, 0, built.stderr);
  const manifest = JSON.parse(await fs.readFile(path.join(out, 'manifest.json'), 'utf8'));
  t.is(manifest.format, 'skiff-image-dir');
  t.is(manifest.kernel.vmlinux, 'vmlinux');
  t.is(manifest.initrd.sha256, await sha(path.join(out, 'initrd.cpio')));
  t.is(manifest.kernel.vmlinuzSha256, await sha(path.join(out, 'vmlinuz')));
  const r = await skiff(['boot', out, '--engine', 'qemu', '--timeout', '240', '--', ...probe]);
  checkProbe(t, r);
});

test.serial('same spec, same bytes: two UKI builds and the directory hold identical parts', async (t) => {
  const a = path.join(dir, 'repro-a.efi');
  const b = path.join(dir, 'repro-b.efi');
  for (const out of [a, b]) t.is((await skiff(['build', defaultSpec, '-o', out, '--quiet'])).code, 0);
  t.is(await sha(a), await sha(b));
  const d = path.join(dir, 'repro-dir');
  t.is((await skiff(['build', defaultSpec, '-o', d, '--format', 'dir', '--quiet'])).code, 0);
  const { parseUki } = await import('../src/image/uki.js');
  const uki = parseUki(await fs.readFile(a));
  t.true(Buffer.from(uki.linux).equals(await fs.readFile(path.join(d, 'vmlinuz'))), 'the UKI .linux is the directory vmlinuz');
  t.true(Buffer.from(uki.initrd!).equals(await fs.readFile(path.join(d, 'initrd.cpio'))), 'the UKI .initrd is the directory initrd');
  t.is(uki.cmdline, (await fs.readFile(path.join(d, 'cmdline'), 'utf8')).trim());
});

test.serial('skiff inspect tells format, kernel version, cmdline, initrd contents and sha256', async (t) => {
  const efi = path.join(dir, 'inspect.efi');
  t.is((await skiff(['build', defaultSpec, '-o', efi, '--quiet'])).code, 0);
  const r = await skiff(['inspect', efi, '--json']);
  t.is(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  t.is(report.format, 'uki');
  t.is(report.sha256, await sha(efi));
  t.regex(report.kernel.version, /^6\.1\.\d+-skiff$/);
  t.is(report.kernel.format, 'bzimage');
  t.is(report.cmdline, 'console=ttyS0');
  t.deepEqual(report.sections.map((s: { name: string }) => s.name).filter((n: string) => ['.osrel', '.cmdline', '.uname', '.initrd', '.linux'].includes(n)).sort(), ['.cmdline', '.initrd', '.linux', '.osrel', '.uname']);
  t.true(report.initrd.files >= 2 && report.initrd.symlinks > 100, JSON.stringify(report.initrd));
  t.true(report.initrd.largest.some((f: { path: string }) => f.path === '/bin/busybox' || f.path === '/usr/bin/busybox'));
  const text = await skiff(['inspect', efi]);
  t.regex(text.stdout, /format: {2}UKI/);
  t.regex(text.stdout, /initrd: {2}[\d.]+ MiB, \d+ entries/);
});

test('build errors are one line with a non-zero exit: malformed spec, missing file, missing package, ELF kernel for a UKI', async (t) => {
  const bad = path.join(dir, 'bad.yml');
  await fs.writeFile(bad, 'files:\n  - { path: /x, source: ./missing }\n');
  const r = await skiff(['build', bad, '-o', path.join(dir, 'bad.efi')]);
  t.is(r.code, 125);
  t.regex(r.stderr, /^skiff: .*bad\.yml:2:25: files\[0\]\.source \.\/missing: no such file\n$/);

  const { cachedKernel } = await import('../src/kernel/build.js');
  const kernel = await cachedKernel();
  t.truthy(kernel, 'the default kernel is built before the tests');
  const elf = path.join(dir, 'elf.yml');
  await fs.writeFile(elf, `kernel: { path: ${kernel!.vmlinux} }\n`);
  const e = await skiff(['build', elf, '-o', path.join(dir, 'elf.efi'), '--quiet']);
  t.is(e.code, 125);
  t.regex(e.stderr, /^skiff: a UKI needs a bzImage kernel \(with the EFI stub\); .*vmlinux is an ELF vmlinux: use --format dir\n$/);

  const nopkg = path.join(dir, 'nopkg.yml');
  await fs.writeFile(nopkg, 'packages: [nosuchpkg-skiff]\n');
  const p = await skiff(['build', nopkg, '-o', path.join(dir, 'nopkg.efi'), '--quiet']);
  t.is(p.code, 125);
  t.is(p.stderr, `skiff: package "nosuchpkg-skiff" not found in apt's package lists for amd64 (check the name, or run apt-get update)\n`);

  const notImage = await skiff(['inspect', bad]);
  t.is(notImage.code, 125);
  t.regex(notImage.stderr, /^skiff: image .*bad\.yml is neither a UKI \(a PE\/EFI file\) nor an image directory\n$/);
});

test('a directory that is not an image is never overwritten', async (t) => {
  const precious = path.join(dir, 'precious');
  await fs.mkdir(precious);
  await fs.writeFile(path.join(precious, 'keep'), 'data');
  const r = await skiff(['build', defaultSpec, '-o', precious, '--format', 'dir', '--quiet']);
  t.is(r.code, 125);
  t.regex(r.stderr, /exists and is not a skiff image directory; not overwriting it/);
  t.is(await fs.readFile(path.join(precious, 'keep'), 'utf8'), 'data');
});

test('an image directory boots on the native engine too: the test guest (bzImage) sees the image cmdline and initrd', async (t) => {
  const guestKernel = path.join(packageRoot(), 'test', 'guests', 'out', 'skiff-test-guest.bzImage');
  const spec = path.join(dir, 'native.yml');
  await fs.writeFile(spec, `kernel: { path: ${guestKernel} }\ncmdline: "skiff.test=facts image.marker=42"\nfiles: [{ path: /hello, contents: "hi" }]\n`);
  const out = path.join(dir, 'native-dir');
  const built = await skiff(['build', spec, '-o', out, '--format', 'dir', '--quiet']);
  t.is(built.code, 0, built.stderr);
  const r = await skiff(['boot', out, '--engine', 'native', '--memory', '64', '--timeout', '60']);
  t.is(r.code, 0, r.stdout + r.stderr);
  const lines = guestSaid(r.stdout);
  t.regex(lines.find((l) => l.startsWith('cmdline '))!, / skiff\.test=facts image\.marker=42( |$)/);
  const initrd = await fs.readFile(path.join(out, 'initrd.cpio'));
  const rd = /^ramdisk paddr=0x[0-9a-f]+ size=0x([0-9a-f]+) fnv1a=0x([0-9a-f]+)$/.exec(lines.find((l) => l.startsWith('ramdisk '))!)!;
  t.is(Number.parseInt(rd[1], 16), initrd.length);
  t.is(Number.parseInt(rd[2], 16), fnv1a(initrd), 'the guest read the image initrd byte for byte');
});
