// The virtio device core (hypervisor/devices/virtio/) as plain C++ without a VM: its test program
// (a Linux-like driver over fake guest memory, blk on real sparse files, net through a real libslirp
// to host loopback) built with ASan and UBSan,
// and a short bounded run of each libFuzzer target (queue walker, blk requests, mmio registers, vsock
// packets, net frames).
// SKIFF_FUZZ_SECONDS sets the fuzzing time per target (default 10 here; .ci/run and `npm run fuzz` use 60).
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

// virtio-mmio's interrupt signalling alone (hypervisor/devices/virtio/test/mmio-irq-test.cc): a
// scripted device places each cause; the line must be signalled again for a cause while an earlier
// edge went unanswered (lost), and after an ACK that leaves bits set (docs/backends.md).
test.serial('virtio-mmio: a lost interrupt edge is sent again by the next cause; ACKs that leave bits signal again', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-mmio-irq-'));
  try {
    const bin = path.join(dir, 'mmio-irq-test');
    await execFileP(
      'g++',
      ['-std=c++17', '-g', '-O1', '-Wall', '-Wextra', '-Werror', '-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fno-omit-frame-pointer',
        `-I${path.join(root, 'hypervisor')}`, path.join(virtio, 'mmio.cc'), path.join(virtio, 'queue.cc'), path.join(virtio, 'test', 'mmio-irq-test.cc'), '-o', bin],
      { maxBuffer: 1 << 24 },
    );
    const { stdout, stderr } = await execFileP(bin, [], { maxBuffer: 1 << 24 }).catch((e) => e);
    t.notRegex(stderr, /AddressSanitizer|runtime error|LeakSanitizer/, stderr);
    t.regex(stdout, /^ok lost_edge_is_sent_again_by_the_next_cause$/m, stdout + stderr);
    t.regex(stdout, /^[1-9]\d* passed, 0 failed$/m, stdout + stderr);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

// One test per target, so each gets its own time limit: CI runs them 60 s each (.ci/run).
for (const target of ['queue', 'blk', 'mmio', 'vsock', 'net']) {
  test.serial(`virtio fuzz: a bounded run of the ${target} target finds nothing`, async (t) => {
    const seconds = process.env.SKIFF_FUZZ_SECONDS ?? '10';
    // The first target also compiles the device core with clang (about a minute on 2 cores).
    t.timeout((Number(seconds) + 240) * 1000);
    const r = await execFileP('bash', [path.join(virtio, 'fuzz', 'run.sh'), target], {
      cwd: root,
      env: { ...process.env, SKIFF_FUZZ_SECONDS: seconds },
      maxBuffer: 1 << 24,
    }).then(
      (ok) => ({ code: 0, out: ok.stdout + ok.stderr }),
      (e) => ({ code: e.code as number, out: String(e.stdout) + String(e.stderr) }),
    );
    t.log(r.out.split('\n').filter((l) => /exec|Done/.test(l)).join('\n'));
    t.is(r.code, 0, r.out);
    t.regex(r.out, new RegExp(`fuzz: ${target}: Done \\d+ runs`), r.out);
  });
}
