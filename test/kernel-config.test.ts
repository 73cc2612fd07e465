import test from 'ava';
import { promises as fs } from 'node:fs';
import { KernelConfigError, lostOptions, parseConfig } from '../src/kernel/config.js';
import { defaultFragment } from '../src/kernel/build.js';

test('parses set, unset, strings and numbers; skips comments', (t) => {
  const opts = parseConfig('# a comment\nCONFIG_A=y\n\n# CONFIG_B is not set\nCONFIG_C="text"\nCONFIG_D=64\n');
  t.deepEqual(
    opts.map((o) => [o.name, o.value, o.line]),
    [
      ['CONFIG_A', 'y', 2],
      ['CONFIG_B', 'n', 4],
      ['CONFIG_C', '"text"', 5],
      ['CONFIG_D', '64', 6],
    ],
  );
});

test('a malformed line names file:line and what was expected', (t) => {
  const err = t.throws(() => parseConfig('CONFIG_A=y\nCONFIG_B y\n', 'frag.config'), { instanceOf: KernelConfigError });
  t.is(err?.message, 'frag.config:2: expected CONFIG_NAME=value or "# CONFIG_NAME is not set", got "CONFIG_B y"');
});

test('an option set twice is an error naming both lines', (t) => {
  const err = t.throws(() => parseConfig('CONFIG_A=y\nCONFIG_A=n\n', 'f'), { instanceOf: KernelConfigError });
  t.is(err?.message, 'f:2: CONFIG_A is already set on line 1');
});

test('an empty value is an error', (t) => {
  t.throws(() => parseConfig('CONFIG_A=\n', 'f'), { instanceOf: KernelConfigError, message: 'f:1: CONFIG_A has an empty value' });
});

test('lostOptions names every option olddefconfig dropped or changed', (t) => {
  const wanted = parseConfig('CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=64\nCONFIG_E=y\n');
  const final = parseConfig('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D=8\nCONFIG_F=y\n');
  t.deepEqual(lostOptions(wanted, final), ['CONFIG_B=y (got not set)', 'CONFIG_C=n (got y)', 'CONFIG_D=64 (got 8)', 'CONFIG_E=y (got not set)']);
});

test('the committed x86_64 fragment parses and asks for what later work needs', async (t) => {
  const fragment = parseConfig(await fs.readFile(defaultFragment(), 'utf8'), 'x86_64.config');
  const names = new Set(fragment.filter((o) => o.value !== 'n').map((o) => o.name));
  for (const needed of [
    'CONFIG_PVH', 'CONFIG_KVM_GUEST', 'CONFIG_SMP', 'CONFIG_SERIAL_8250_CONSOLE', 'CONFIG_BLK_DEV_INITRD', 'CONFIG_RD_GZIP',
    'CONFIG_VIRTIO_MMIO', 'CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES', 'CONFIG_VIRTIO_PCI', 'CONFIG_VIRTIO_BLK', 'CONFIG_VIRTIO_NET',
    'CONFIG_VIRTIO_CONSOLE', 'CONFIG_VIRTIO_VSOCKETS', 'CONFIG_HW_RANDOM_VIRTIO', 'CONFIG_FUSE_FS', 'CONFIG_VIRTIO_FS',
    'CONFIG_9P_FS', 'CONFIG_EXT4_FS', 'CONFIG_EROFS_FS', 'CONFIG_OVERLAY_FS', 'CONFIG_TMPFS', 'CONFIG_DEVTMPFS',
    'CONFIG_NAMESPACES', 'CONFIG_CGROUPS', 'CONFIG_MEMCG', 'CONFIG_CGROUP_PIDS', 'CONFIG_CGROUP_SCHED', 'CONFIG_SECCOMP_FILTER',
    'CONFIG_NF_NAT', 'CONFIG_UNIX', 'CONFIG_INET',
  ]) {
    t.true(names.has(needed), `${needed} is requested`);
  }
});

test('the cache key text ignores comments and blank lines, not values', async (t) => {
  const { canonicalConfig } = await import('../src/kernel/config.js');
  const a = canonicalConfig('# why\nCONFIG_A=y\n\n# CONFIG_B is not set\n');
  t.is(a, 'CONFIG_A=y\nCONFIG_B=n');
  t.is(canonicalConfig('## other words\nCONFIG_A=y\n# CONFIG_B is not set'), a);
  t.not(canonicalConfig('CONFIG_A=m\n# CONFIG_B is not set\n'), a);
});
