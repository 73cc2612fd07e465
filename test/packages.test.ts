// fetchPackages with real apt and real Debian packages: the cache layout and reuse, apt's own
// answers as the reference for versions and unknown names, and the result written into a cpio and
// run under chroot. Needs apt's lists (apt-get update) and, on a cold cache, Debian's mirror.
import test from 'ava';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { CpioWriter } from '../src/initrd/cpio.js';
import { fetchPackages, PackageError, usrMergedPath, type PackageProgress } from '../src/initrd/packages.js';

const dir = mkdtempSync(path.join(tmpdir(), 'skiff-packages-test-'));
process.env.SKIFF_CACHE_DIR = path.join(dir, 'cache');
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

const sh = (cmd: string, args: string[], cwd = dir): string =>
  execFileSync(cmd, args, { cwd, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });

const arch = sh('dpkg', ['--print-architecture']).trim();
/** apt's candidate, asked independently of the code under test. */
const candidate = (name: string): string => /Candidate: (\S+)/.exec(sh('apt-cache', ['policy', name]))![1];

// Shared by the tests below: one cold fetch, measured.
const PACKAGES = ['hello', 'crun', 'busybox-static'];
let cold: { result: Awaited<ReturnType<typeof fetchPackages>>; ms: number; events: PackageProgress[] } | undefined;
async function coldFetch() {
  if (!cold) {
    const events: PackageProgress[] = [];
    const started = Date.now();
    const result = await fetchPackages(PACKAGES, { onProgress: (e) => events.push(e) });
    cold = { result, ms: Date.now() - started, events };
  }
  return cold;
}

test.serial('packages are downloaded once into a cache keyed by name, version and architecture', async (t) => {
  const { result, ms, events } = await coldFetch();
  t.log(`cold fetch of ${PACKAGES.join(', ')}: ${ms} ms`);
  t.deepEqual(result.packages.map((p) => p.name), PACKAGES);
  for (const p of result.packages) {
    t.is(p.version, candidate(p.name));
    t.true(p.downloaded);
    const key = `${p.name}_${p.version.replace(/:/g, '%3a')}_${p.arch}`;
    t.is(p.root, path.join(dir, 'cache', 'packages', key, 'root'));
    t.true(existsSync(path.join(dir, 'cache', 'packages', key, `${key}.deb`)));
    // The .deb is what apt fetched for that version: dpkg-deb agrees.
    t.is(sh('dpkg-deb', ['-f', path.join(dir, 'cache', 'packages', key, `${key}.deb`), 'Version']).trim(), p.version);
    t.true(events.some((e) => e.phase === 'download' && e.name === p.name && e.percent === 100));
    t.true(events.some((e) => e.phase === 'unpack' && e.name === p.name));
  }
  // busybox-static's version has an epoch ("1:…"), which apt writes as %3a in file names.
  t.true(result.packages.find((p) => p.name === 'busybox-static')!.root.includes('%3a'));

  const debs = result.packages.map((p) => path.join(path.dirname(p.root), `${path.basename(path.dirname(p.root))}.deb`));
  const mtimes = debs.map((d) => statSync(d).mtimeMs);
  const events2: PackageProgress[] = [];
  const started = Date.now();
  const again = await fetchPackages(PACKAGES, { onProgress: (e) => events2.push(e) });
  const warm = Date.now() - started;
  t.log(`warm fetch (cache hit): ${warm} ms`);
  t.true(again.packages.every((p) => !p.downloaded));
  t.false(events2.some((e) => e.phase === 'download' || e.phase === 'unpack'));
  t.deepEqual(events2.filter((e) => e.phase === 'cached').map((e) => (e as { name: string }).name), PACKAGES);
  t.deepEqual(debs.map((d) => statSync(d).mtimeMs), mtimes);
  t.deepEqual(again.files.list().map((e) => e.path), result.files.list().map((e) => e.path));
});

test.serial('the file set: usr-merged paths, modes and symlinks kept, docs left out, programs\' libraries added', async (t) => {
  const { result } = await coldFetch();
  const files = result.files;
  const hello = result.packages.find((p) => p.name === 'hello')!;
  // What the .deb holds, according to dpkg-deb.
  const listing = sh('dpkg-deb', ['-c', path.join(path.dirname(hello.root), `${path.basename(path.dirname(hello.root))}.deb`)]);
  t.regex(listing, /\.\/usr\/share\/doc\/hello\/copyright/);
  t.false(files.list().some((e) => /^usr\/share\/(doc|man|info|lintian)(\/|$)/.test(e.path)));
  t.like(files.get('usr/bin/hello'), { kind: 'file', mode: 0o755, origin: 'package hello' });
  t.truthy(files.get('usr/share/locale/de/LC_MESSAGES/hello.mo'));
  // busybox-static ships /bin/busybox; on a merged system that is /usr/bin/busybox.
  t.regex(sh('dpkg-deb', ['-c', path.join(path.dirname(result.packages[2].root), `${path.basename(path.dirname(result.packages[2].root))}.deb`)]), / \.\/bin\/busybox\n/);
  t.like(files.get('usr/bin/busybox'), { kind: 'file', mode: 0o755, origin: 'package busybox-static' });
  t.is(files.get('bin/busybox'), undefined);
  t.like(files.get('bin'), { kind: 'symlink', target: 'usr/bin' });
  // crun's libraries come from the host, symlinks kept.
  t.like(files.get('usr/lib/x86_64-linux-gnu/libseccomp.so.2'), { kind: 'symlink' });
  t.like(files.get('lib64'), { kind: 'symlink', target: 'usr/lib64' });
  t.is(usrMergedPath('lib/x86_64-linux-gnu/libc.so.6'), 'usr/lib/x86_64-linux-gnu/libc.so.6');
  t.is(usrMergedPath('etc/passwd'), 'etc/passwd');
  t.log(`${result.files.size} entries (${result.packages.map((p) => `${p.name} ${p.files.size}`).join(', ')})`);
});

test.serial('written into a cpio: cpio -it lists the files, and the programs run from it under chroot', async (t) => {
  const { result } = await coldFetch();
  const cpio = new CpioWriter();
  result.files.writeInto(cpio);
  const archive = path.join(dir, 'packages.cpio');
  const { bytes } = await cpio.writeTo(archive);
  t.log(`cpio: ${bytes} bytes`);
  const listed = new Set(sh('cpio', ['-it', '--quiet', '-F', archive]).split('\n'));
  for (const p of ['usr/bin/hello', 'usr/bin/crun', 'usr/bin/busybox', 'bin', 'lib64', 'usr/lib64/ld-linux-x86-64.so.2', 'usr/lib/x86_64-linux-gnu/libc.so.6']) {
    t.true(listed.has(p), p);
  }
  const root = path.join(dir, 'root');
  mkdirSync(path.join(root, 'proc'), { recursive: true });
  sh('cpio', ['-idm', '--quiet', '-F', archive], root);
  const inside = (args: string[]) => {
    const userns = process.getuid?.() === 0 ? [] : ['-r'];
    const r = spawnSync('unshare', [...userns, '--fork', '--pid', `--mount-proc=${root}/proc`, 'chroot', root, ...args], {
      encoding: 'utf8',
      env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LC_ALL: 'C' },
    });
    if (r.error) throw r.error;
    return r;
  };
  const hello = inside(['/usr/bin/hello']);
  t.is(hello.status, 0, hello.stderr);
  t.is(hello.stdout, 'Hello, world!\n');
  const crun = inside(['/usr/bin/crun', '--version']);
  t.is(crun.status, 0, crun.stderr);
  t.regex(crun.stdout, new RegExp(`^crun version ${candidate('crun').split('-')[0].replace(/\./g, '\\.')}`));
  const busybox = inside(['/bin/busybox', 'echo', 'merged']);
  t.is(busybox.stdout, 'merged\n');
});

test('an unknown package is one line naming it, and apt agrees it does not exist', async (t) => {
  const err = await t.throwsAsync(fetchPackages(['hello', 'nosuchpkg-skiff']), { instanceOf: PackageError });
  t.is(err!.message, `package "nosuchpkg-skiff" not found in apt's package lists for ${arch} (check the name, or run apt-get update)`);
  const apt = spawnSync('apt-get', ['download', 'nosuchpkg-skiff'], { cwd: dir, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
  t.regex(apt.stderr, /Unable to locate package nosuchpkg-skiff/);
});

test('a virtual package names its providers; a bad name never reaches apt', async (t) => {
  const err = await t.throwsAsync(fetchPackages(['mail-transport-agent']), { instanceOf: PackageError });
  t.regex(err!.message, /^package "mail-transport-agent" has no installable version for \S+ \(a virtual or obsolete package\?\); it is provided by [a-z0-9.+-]+(, [a-z0-9.+-]+)*$/);
  for (const bad of ['-o', 'Hello', 'a b', '', 'x']) {
    const e = await t.throwsAsync(fetchPackages([bad]), { instanceOf: PackageError });
    t.is(e!.message, `${JSON.stringify(bad)} is not a Debian package name (lower-case letters, digits, "+", "-", ".")`);
  }
  t.deepEqual((await fetchPackages([])).packages, []);
});

test('two processes fetching the same package at once download it once', async (t) => {
  const cache = path.join(dir, 'cache-concurrent');
  const script = `
    process.env.SKIFF_CACHE_DIR = ${JSON.stringify(cache)};
    const { fetchPackages } = await import(${JSON.stringify(new URL('../src/initrd/packages.ts', import.meta.url).href)});
    const r = await fetchPackages(['hello']);
    console.log(JSON.stringify(r.packages.map((p) => p.downloaded)));
  `;
  const runOne = () =>
    new Promise<string>((resolve, reject) => {
      const child = spawn(process.execPath, ['--import=tsx', '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let errOut = '';
      child.stdout!.on('data', (d: Buffer) => (out += d));
      child.stderr!.on('data', (d: Buffer) => (errOut += d));
      child.on('close', (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(errOut))));
    });
  const results = await Promise.all([runOne(), runOne()]);
  t.deepEqual(results.sort(), ['[false]', '[true]']);
  const entries = execFileSync('ls', ['-A', path.join(cache, 'packages')], { encoding: 'utf8' }).split('\n').filter(Boolean);
  t.deepEqual(entries, [`hello_${candidate('hello')}_${arch}`]); // no lock or temp left behind
});

test.serial('a library a listed package provides comes from the package, not the host', async (t) => {
  await coldFetch();
  const { files } = await fetchPackages(['crun', 'libyajl2']);
  const lib = files.get('usr/lib/x86_64-linux-gnu/libyajl.so.2');
  t.like(lib, { kind: 'symlink', origin: 'package libyajl2' });
  const real = files.get(`usr/lib/x86_64-linux-gnu/${(lib as { target: string }).target}`);
  t.like(real, { kind: 'file', origin: 'package libyajl2' });
  t.true((real as { source: string }).source.startsWith(path.join(dir, 'cache', 'packages')));
  // crun's other libraries still come from the host.
  t.like(files.get('usr/lib/x86_64-linux-gnu/libseccomp.so.2'), { kind: 'symlink', origin: 'host (for /usr/bin/crun)' });
});
