// binaryClosure against the references that matter: ldd (glibc's own resolution, run on the
// host) must find exactly the libraries the closure holds, and the closure written into a cpio and
// unpacked into an empty directory must run the program under chroot.
import test from 'ava';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { binaryClosure, ClosureError, parseLdSoCache } from '../src/initrd/closure.js';
import { CpioWriter } from '../src/initrd/cpio.js';
import { FileSet } from '../src/initrd/fileset.js';

const dir = mkdtempSync(path.join(tmpdir(), 'skiff-closure-test-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

const sh = (cmd: string, args: string[], cwd = dir): string =>
  execFileSync(cmd, args, { cwd, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });

/** ldd's answer: every object it loads (name → path as ld.so opened it), the vDSO left out. */
function ldd(program: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of sh('ldd', [program]).split('\n')) {
    const arrow = /^\s*(\S+) => (\S+) \(0x/.exec(line);
    const bare = /^\s*(\/\S+) \(0x/.exec(line);
    if (arrow) out.set(arrow[1], arrow[2]);
    else if (bare) out.set(bare[1], bare[1]);
    else if (line.trim() && !line.includes('linux-vdso')) throw new Error(`unexpected ldd line: ${line}`);
  }
  return out;
}

/** Follows symlinks inside the set, as the guest kernel would; the real path of a file or undefined. */
function resolveInSet(set: FileSet, p: string): string | undefined {
  let pending = p.split('/');
  let done: string[] = [];
  for (let hops = 0; pending.length > 0 && hops < 100; ) {
    const c = pending.shift()!;
    if (c === '' || c === '.') continue;
    if (c === '..') { done.pop(); continue; }
    const e = set.get([...done, c].join('/'));
    if (e?.kind === 'symlink') {
      hops++;
      if (e.target.startsWith('/')) done = [];
      pending = [...e.target.split('/'), ...pending];
      continue;
    }
    if (!e && pending.some((x) => x !== '')) { done.push(c); continue; } // a directory the set implies
    if (!e) return undefined;
    done.push(c);
  }
  const e = set.get(done.join('/'));
  return e?.kind === 'file' ? done.join('/') : undefined;
}

const realFiles = (set: FileSet): string[] => set.list().filter((e) => e.kind === 'file').map((e) => e.path).sort();

/** The closure of `program` equals what ldd says: same objects, each at the same real file, nothing else. */
async function matchesLdd(t: import('ava').ExecutionContext, program: string): Promise<FileSet> {
  const set = await binaryClosure(program);
  const expected = new Set([realpathSync(program).slice(1)]);
  for (const [name, opened] of ldd(program)) {
    const inSet = resolveInSet(set, opened);
    t.is(inSet, realpathSync(opened).slice(1), `${name}: ldd opened ${opened}`);
    expected.add(realpathSync(opened).slice(1));
  }
  t.deepEqual(realFiles(set), [...expected].sort());
  // The program is reachable at its own path too.
  t.is(resolveInSet(set, program), realpathSync(program).slice(1));
  return set;
}

/** Writes the set as a cpio, unpacks it with GNU cpio into a fresh directory, returns the directory. */
async function unpackCpio(set: FileSet, name: string): Promise<string> {
  const cpio = new CpioWriter();
  set.writeInto(cpio);
  const archive = path.join(dir, `${name}.cpio`);
  await cpio.writeTo(archive);
  const root = path.join(dir, name);
  mkdirSync(root);
  execFileSync('cpio', ['-idm', '--quiet', '-F', archive], { cwd: root });
  return root;
}

/**
 * Runs a program inside an unpacked tree with /proc mounted, as the guest has it: ld.so reads
 * /proc/self/exe for a program's $ORIGIN and crun re-executes itself through it. Without root, a
 * user namespace gives the right to do both.
 */
function chroot(root: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  mkdirSync(path.join(root, 'proc'), { recursive: true });
  const userns = process.getuid?.() === 0 ? [] : ['-r'];
  const r = spawnSync('unshare', [...userns, '--fork', '--pid', `--mount-proc=${root}/proc`, 'chroot', root, ...args], {
    encoding: 'utf8',
    env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LC_ALL: 'C' },
  });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('crun: the closure is exactly what ldd loads, and crun runs from it under chroot', async (t) => {
  const set = await matchesLdd(t, '/usr/bin/crun');
  t.log(`crun: ${set.size} entries, ${realFiles(set).length} files`);
  // Symlinks are kept as symlinks, the real file beside them.
  t.deepEqual(set.get('usr/lib64/ld-linux-x86-64.so.2'), {
    kind: 'symlink', path: 'usr/lib64/ld-linux-x86-64.so.2', target: readlinkOf('/usr/lib64/ld-linux-x86-64.so.2'), origin: 'host (for /usr/bin/crun)',
  });
  const root = await unpackCpio(set, 'crun');
  const r = chroot(root, ['/usr/bin/crun', '--version']);
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /^crun version \d/);
});

function readlinkOf(p: string): string {
  return execFileSync('readlink', [p], { encoding: 'utf8' }).trim();
}

test('/bin/ls through the /bin → usr/bin link: matches ldd and runs under chroot', async (t) => {
  const set = await matchesLdd(t, '/bin/ls');
  if (realpathSync('/bin') !== '/bin') t.is(set.get('bin')?.kind, 'symlink');
  const root = await unpackCpio(set, 'ls');
  const r = chroot(root, ['/bin/ls', '/usr/bin']);
  t.is(r.status, 0, r.stderr);
  t.is(r.stdout.trim(), 'ls');
});

test('qemu-system-x86_64 (dozens of libraries) matches ldd', async (t) => {
  const qemu = '/usr/bin/qemu-system-x86_64';
  if (!existsSync(qemu)) return t.fail(`${qemu} is not installed (scripts/setup.sh installs it)`);
  const started = Date.now();
  const set = await matchesLdd(t, qemu);
  t.log(`qemu-system-x86_64: ${realFiles(set).length} files, ${set.size} entries, ${Date.now() - started} ms`);
  t.true(realFiles(set).length > 40);
});

// A program and libraries in a private tree: prog needs libgreet (in lib/ via $ORIGIN/../lib),
// libgreet needs libinner (in inner/), which only the program's DT_RPATH names. ld.so applies a
// program's DT_RPATH to its libraries' needs too, but a DT_RUNPATH only to the program's own.
function buildTree(name: string, dtags: 'old' | 'new'): { base: string; prog: string } {
  const base = path.join(dir, name);
  for (const d of ['bin', 'lib', 'inner', 'src']) mkdirSync(path.join(base, d), { recursive: true });
  const src = (f: string, text: string) => (writeFileSync(path.join(base, 'src', f), text), path.join(base, 'src', f));
  sh('gcc', ['-shared', '-fPIC', '-Wl,-soname,libinner.so', '-o', path.join(base, 'inner/libinner.so'), src('inner.c', 'int inner(void) { return 40; }\n')]);
  sh('gcc', ['-shared', '-fPIC', '-Wl,-soname,libgreet.so.1', '-o', path.join(base, 'lib/libgreet.so.1.0'),
    src('greet.c', 'int inner(void);\nint greet(void) { return inner() + 2; }\n'), `-L${base}/inner`, '-linner']);
  symlinkSync('libgreet.so.1.0', path.join(base, 'lib/libgreet.so.1'));
  const prog = path.join(base, 'bin/prog');
  sh('gcc', ['-o', prog, src('prog.c', '#include <stdio.h>\nint greet(void);\nint main(void) { printf("%d\\n", greet()); return 0; }\n'),
    `-L${base}/lib`, '-l:libgreet.so.1', `-Wl,-rpath,$ORIGIN/../lib:${base}/inner`, `-Wl,--${dtags === 'new' ? 'enable' : 'disable'}-new-dtags`,
    `-Wl,-rpath-link,${base}/inner`]);
  return { base, prog };
}

test('DT_RPATH with $ORIGIN reaches the libraries\' needs: matches ldd and runs under chroot', async (t) => {
  const { base, prog } = buildTree('rpath', 'old');
  t.regex(sh('readelf', ['-d', prog]), /\(RPATH\)/);
  const set = await matchesLdd(t, prog);
  t.truthy(set.get(`${base.slice(1)}/inner/libinner.so`));
  t.deepEqual(set.get(`${base.slice(1)}/lib/libgreet.so.1`), { kind: 'symlink', path: `${base.slice(1)}/lib/libgreet.so.1`, target: 'libgreet.so.1.0', origin: `host (for ${prog})` });
  const r = chroot(await unpackCpio(set, 'rpath-root'), [prog]);
  t.is(r.status, 0, r.stderr);
  t.is(r.stdout, '42\n');
});

test('DT_RUNPATH applies only to the object that has it: the same tree fails, as it does in ld.so', async (t) => {
  const { prog } = buildTree('runpath', 'new');
  t.regex(sh('readelf', ['-d', prog]), /\(RUNPATH\)/);
  const real = spawnSync(prog, { encoding: 'utf8' });
  t.not(real.status, 0); // glibc agrees: libinner.so is not found for libgreet
  t.regex(real.stderr, /libinner\.so: cannot open shared object file/);
  const err = await t.throwsAsync(binaryClosure(prog), { instanceOf: ClosureError });
  t.is(err!.message, `/${path.relative('/', path.dirname(prog))}/../lib/libgreet.so.1 (loaded by ${prog}) needs libinner.so, not found in ld.so.cache, /lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu, /lib, /usr/lib`);
});

test('a missing library is one line naming the program and the library', async (t) => {
  const base = path.join(dir, 'missing');
  mkdirSync(path.join(base, 'lib'), { recursive: true });
  writeFileSync(path.join(base, 'gone.c'), 'int gone(void) { return 1; }\n');
  writeFileSync(path.join(base, 'main.c'), 'int gone(void);\nint main(void) { return gone(); }\n');
  sh('gcc', ['-shared', '-fPIC', '-o', path.join(base, 'lib/libgone.so'), path.join(base, 'gone.c')]);
  const prog = path.join(base, 'prog');
  sh('gcc', ['-o', prog, path.join(base, 'main.c'), `-L${base}/lib`, '-lgone', `-Wl,-rpath,${base}/lib`, '-Wl,--enable-new-dtags']);
  await binaryClosure(prog); // found while it exists
  rmSync(path.join(base, 'lib/libgone.so'));
  const err = await t.throwsAsync(binaryClosure(prog), { instanceOf: ClosureError });
  t.is(err!.message, `${prog} needs libgone.so, not found in ${base}/lib, ld.so.cache, /lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu, /lib, /usr/lib`);
  t.false(err!.message.includes('\n'));
});

test('a library of the wrong ELF class is passed over, as ld.so does', async (t) => {
  const { base, prog } = buildTree('class', 'old');
  // A 32-bit libgreet.so.1 in a directory searched before lib/: ld.so skips it and goes on.
  const first = path.join(base, 'first');
  mkdirSync(first);
  writeFileSync(path.join(base, 'src/g32.c'), 'int greet(void) { return 0; }\n');
  sh('gcc', ['-m32', '-shared', '-nostdlib', '-fPIC', '-Wl,-soname,libgreet.so.1', '-o', path.join(first, 'libgreet.so.1'), path.join(base, 'src/g32.c')]);
  const prog2 = path.join(base, 'bin/prog2');
  sh('gcc', ['-o', prog2, path.join(base, 'src/prog.c'), `-L${base}/lib`, '-l:libgreet.so.1', `-Wl,-rpath,${first}:$ORIGIN/../lib:${base}/inner`, '-Wl,--disable-new-dtags', `-Wl,-rpath-link,${base}/inner`]);
  t.is(spawnSync(prog2, { encoding: 'utf8' }).stdout, '42\n');
  const set = await matchesLdd(t, prog2);
  t.is(set.get(`${first.slice(1)}/libgreet.so.1`), undefined);
  t.truthy(prog);
});

test('a script is included alone; a missing program is one line', async (t) => {
  const script = path.join(dir, 'hello.sh');
  writeFileSync(script, '#!/bin/sh\necho hi\n', { mode: 0o755 });
  const set = await binaryClosure(script);
  t.deepEqual(set.list(), [{ kind: 'file', path: script.slice(1), mode: 0o755, source: script, origin: `host (for ${script})` }]);
  const err = await t.throwsAsync(binaryClosure('/no/such/program'), { instanceOf: ClosureError });
  t.is(err!.message, '/no/such/program: no such file');
});

test('closures of several programs merge into one set (shared libraries once)', async (t) => {
  const set = new FileSet();
  await binaryClosure('/bin/ls', { into: set });
  const before = set.size;
  await binaryClosure('/usr/bin/crun', { into: set });
  t.true(set.size > before);
  t.is(set.list().filter((e) => e.path === 'usr/lib/x86_64-linux-gnu/libc.so.6').length, 1);
});

test('ld.so.cache parser agrees with ldconfig -p', (t) => {
  const entries = parseLdSoCache(readFileSync('/etc/ld.so.cache'));
  const listed = sh('ldconfig', ['-p']).split('\n').filter((l) => l.includes(' => '));
  t.is(entries.length, listed.length);
  const pairs = listed.map((l) => /^\s*(\S+) .* => (\S+)$/.exec(l)!.slice(1, 3).join(' '));
  t.deepEqual(entries.map((e) => `${e.key} ${e.value}`), pairs);
  t.throws(() => parseLdSoCache(Buffer.from('not a cache at all, just some bytes here........')), { instanceOf: ClosureError });
  const truncated = readFileSync('/etc/ld.so.cache').subarray(0, 200);
  t.throws(() => parseLdSoCache(truncated), { instanceOf: ClosureError });
});

test('a library the host finds only through ld.so.cache gets a link in a default directory', async (t) => {
  const defaults = ['/lib/x86_64-linux-gnu', '/usr/lib/x86_64-linux-gnu', '/lib', '/usr/lib'];
  const entry = parseLdSoCache(readFileSync('/etc/ld.so.cache')).find(
    (e) => e.flags === 0x0303 && e.hwcap === 0n && /\.so\.\d+$/.test(e.key) && !defaults.includes(path.dirname(e.value)) &&
      !defaults.includes(path.dirname(realpathSync(e.value))) && existsSync(e.value),
  );
  if (!entry) return t.pass('no library outside the default directories in this host\'s ld.so.cache');
  const prog = path.join(dir, 'cached-lib-prog');
  writeFileSync(path.join(dir, 'cached.c'), 'int main(void) { return 0; }\n');
  sh('gcc', ['-o', prog, path.join(dir, 'cached.c'), '-Wl,--no-as-needed', `-L${path.dirname(entry.value)}`, `-l:${entry.key}`]);
  t.is(ldd(prog).get(entry.key), entry.value);
  const set = await binaryClosure(prog);
  t.deepEqual(set.get(`usr/lib/x86_64-linux-gnu/${entry.key}`), {
    kind: 'symlink', path: `usr/lib/x86_64-linux-gnu/${entry.key}`, target: entry.value, origin: `host (for ${prog})`,
  });
  // The guest has no ld.so.cache; its ld.so must still find the library (--list loads, runs nothing).
  const r = chroot(await unpackCpio(set, 'cached-root'), ['/lib64/ld-linux-x86-64.so.2', '--list', prog]);
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, new RegExp(`${entry.key.replace(/[.+]/g, '\\$&')} => /lib/x86_64-linux-gnu/${entry.key.replace(/[.+]/g, '\\$&')}`));
});
