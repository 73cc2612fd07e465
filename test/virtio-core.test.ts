// The virtio device core (hypervisor/devices/virtio/) as plain C++ without a VM: its test program
// (a Linux-like driver over fake guest memory, blk on real sparse files, net through a real libslirp
// to host loopback) built with ASan and UBSan,
// and a short bounded run of each libFuzzer target (queue walker, blk requests, mmio registers, vsock
// packets, net frames).
// SKIFF_FUZZ_SECONDS sets the fuzzing time per target (default 10 here; `npm run fuzz` uses 60).
import test from 'ava';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { packageRoot } from '../src/paths.js';

const execFileP = promisify(execFile);
const root = packageRoot();
const virtio = path.join(root, 'hypervisor', 'devices', 'virtio');

test.serial('virtio core: queue, mmio, rng, blk, vsock and net (with libslirp) tests pass under ASan/UBSan', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-virtio-'));
  try {
    const sources = (await fs.readdir(virtio)).filter((f) => f.endsWith('.cc')).map((f) => path.join(virtio, f));
    const bin = path.join(dir, 'virtio-test');
    await execFileP(
      'g++',
      ['-std=c++17', '-g', '-O1', '-Wall', '-Wextra', '-Werror', '-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fno-omit-frame-pointer',
        // virtio-net's libslirp backend and the event loop it runs on (Debian libslirp-dev).
        '-DSKIFF_SLIRP', `-I${path.join(root, 'hypervisor')}`, ...sources, path.join(root, 'hypervisor', 'loop', 'epoll.cc'),
        path.join(virtio, 'test', 'virtio-test.cc'), '-lslirp', '-o', bin],
      { maxBuffer: 1 << 24 },
    );
    // The scratch directory holds the sparse disk images (SEEK_HOLE and st_blocks are checked there).
    const { stdout, stderr } = await execFileP(bin, [dir], { maxBuffer: 1 << 24 }).catch((e) => e);
    t.log(stdout.trim().split('\n').pop());
    t.notRegex(stderr, /AddressSanitizer|runtime error|LeakSanitizer/, stderr);
    t.regex(stdout, /^\d+ passed, 0 failed$/m, stdout + stderr);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test.serial('virtio fuzz targets: a bounded run of each finds nothing', async (t) => {
  const seconds = process.env.SKIFF_FUZZ_SECONDS ?? '10';
  const r = await execFileP('bash', [path.join(virtio, 'fuzz', 'run.sh')], {
    cwd: root,
    env: { ...process.env, SKIFF_FUZZ_SECONDS: seconds },
    maxBuffer: 1 << 24,
  }).then(
    (ok) => ({ code: 0, out: ok.stdout + ok.stderr }),
    (e) => ({ code: e.code as number, out: String(e.stdout) + String(e.stderr) }),
  );
  t.log(r.out.split('\n').filter((l) => /exec|Done/.test(l)).join('\n'));
  t.is(r.code, 0, r.out);
  for (const target of ['queue', 'blk', 'mmio', 'vsock', 'net']) t.regex(r.out, new RegExp(`fuzz: ${target}: Done \\d+ runs`), r.out);
});
