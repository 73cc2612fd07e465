// skiff's own hypervisor (hypervisor/, KVM backend) on the real /dev/kvm, driven by the test-guest
// kit (test/guests): tiny PVH guests that check from inside what the VMM promised.
// On this machine /dev/kvm is KVM on PVM: guest ring 0 is emulated, so guests stay small.
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { packageRoot } from '../src/paths.js';
import { makeVmConfig } from '../src/vm/config.js';
import { startNative } from '../src/vm/native.js';
import { fnv1a, guestSaid, skiff } from './helpers.js';

const GUEST = path.join(packageRoot(), 'test', 'guests', 'out', 'skiff-test-guest.elf');
/** The same guest as a bzImage, booted through the Linux 64-bit boot protocol. */
const GUEST_BZIMAGE = path.join(packageRoot(), 'test', 'guests', 'out', 'skiff-test-guest.bzImage');
const BUILDS: [string, string][] = [['PVH', GUEST], ['bzImage', GUEST_BZIMAGE]];
const MiB = 1024 * 1024;

test.before(() => {
  if (!existsSync('/dev/kvm')) throw new Error('/dev/kvm is missing: the native engine tests need it');
  for (const [, file] of BUILDS) if (!existsSync(file)) throw new Error(`${file} is not built: run "npm run build:guests"`);
});

function guest(testName: string, extra: string[] = [], kernel = GUEST) {
  return skiff(['boot', '--engine', 'native', '--kernel', kernel, '--memory', '64', '--timeout', '60', '--cmdline', `skiff.test=${testName}`, ...extra]);
}


test('facts: PVH entry state, start_info, command line, memory map and the initrd as promised', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-native-'));
  const initrd = path.join(dir, 'initrd.bin');
  const bytes = randomBytes(3000);
  await fs.writeFile(initrd, bytes);
  const r = await guest('facts', ['--initrd', initrd]);
  t.is(r.code, 0, r.stdout + r.stderr);
  const lines = guestSaid(r.stdout);
  // 32-bit protected mode, paging off, flat segments at 0x10/0x18, %ebx -> start_info (layout.h).
  t.regex(lines.find((l) => l.startsWith('entry '))!, /cr0=0x11 cr4=0x0 eflags=0x2 cs=0x10 ds=0x18 es=0x18 ss=0x18 ebx=0x6000$/);
  t.regex(lines.find((l) => l.startsWith('start_info '))!, /^start_info magic=0x336ec578 version=1 flags=0x0 /);
  t.regex(lines.find((l) => l.startsWith('cmdline '))!, /^cmdline console=ttyS0 .*skiff\.test=facts virtio_mmio\.device=0x200@0xd0000000:16 virtio_mmio\.device=0x200@0xd0000200:17$/); // the engine adds rng and vsock
  const memmap = lines.filter((l) => l.startsWith('memmap addr=')).map((l) => l.slice(7));
  t.deepEqual(memmap, ['addr=0x0 size=0x9fc00 type=0x1', 'addr=0x9fc00 size=0x60400 type=0x2', `addr=0x100000 size=${(64 * MiB - 0x100000).toString(16).replace(/^/, '0x')} type=0x1`]);
  const mod = /^module index=0 paddr=0x([0-9a-f]+) size=0x([0-9a-f]+) fnv1a=0x([0-9a-f]+)$/.exec(lines.find((l) => l.startsWith('module '))!)!;
  t.truthy(mod);
  const paddr = Number.parseInt(mod[1], 16);
  t.is(paddr % 4096, 0, 'initrd is page-aligned');
  t.true(paddr + bytes.length <= 64 * MiB, 'initrd lies inside guest RAM');
  t.is(Number.parseInt(mod[2], 16), bytes.length);
  t.is(Number.parseInt(mod[3], 16), fnv1a(bytes), 'the guest read the exact initrd bytes');
  t.true(lines.includes('facts ok'));
});

test('the exit device carries the full 32-bit status (library API)', async (t) => {
  for (const status of [0, 7, 200, 4294967295]) {
    const config = await makeVmConfig({ kernel: GUEST, memoryMiB: 32, timeoutSec: 60, cmdline: `skiff.test=exit=${status}` });
    const machine = await startNative(config);
    machine.output.resume();
    t.deepEqual(await machine.wait(), { kind: 'exited', status });
  }
});

for (const [build, kernel] of BUILDS) {
  test(`${build}: the CLI exits with the guest status`, async (t) => {
    const r = await guest('exit=7', [], kernel);
    t.is(r.code, 7, r.stderr);
    t.regex(r.stdout, /guest: exit 7/);
  });

  test(`${build}: serial input reaches the guest`, async (t) => {
    const r = await skiff(['boot', '--engine', 'native', '--kernel', kernel, '--memory', '32', '--timeout', '60', '--cmdline', 'skiff.test=echo'], { input: 'hello from the host\n' });
    t.is(r.code, 0, r.stdout + r.stderr);
    t.true(guestSaid(r.stdout).includes('echo hello from the host'));
  });

  test(`${build}: code in guest ring 3 runs, and traps back to ring 0`, async (t) => {
    const r = await guest('ring3', [], kernel);
    t.is(r.code, 0, r.stdout + r.stderr);
    t.true(guestSaid(r.stdout).includes('ring3 sum=50000005000000'));
    t.regex(r.stdout, /guest: ring3 trap vector=6 cs=0x23 ss=0x1b/);
  });

  test(`${build}: an i8042 reset ends the VM with a clear message`, async (t) => {
    const r = await guest('reset', [], kernel);
    t.is(r.code, 125);
    t.is(r.stderr, 'skiff: guest ended without reporting an exit status (it reset the machine)\n');
  });

  test(`${build}: a triple fault ends the VM with a clear message`, async (t) => {
    const r = await guest('triplefault', [], kernel);
    t.is(r.code, 125);
    t.regex(r.stderr, /^skiff: guest ended without reporting an exit status \(it shut down \(triple fault/);
  });
}

for (const [build, kernel] of BUILDS) {
  for (const cpus of [1, 2, 4]) {
    test(`${build}: --cpus ${cpus}: the MP table lists ${cpus} CPU(s), the bootstrap processor and the IO-APIC`, async (t) => {
      const r = await guest('cpus', ['--cpus', String(cpus)], kernel);
      t.is(r.code, 0, r.stdout + r.stderr);
      const lines = guestSaid(r.stdout);
      // mptable.cc: processors (20 bytes each), then an ISA bus, one IO-APIC, 24 IO and 2 local
      // interrupt entries (8 bytes each) after the 44-byte header. The guest walks the entries by
      // the table's length, as Linux does, and checks both checksums.
      const entries = cpus + 1 + 1 + 24 + 2;
      t.true(lines.includes(`mptable floating=0xf0000 spec_rev=4 table=0xf0010 table_spec_rev=4 length=${44 + 20 * cpus + 8 * 28} count_field=${entries} lapic=0xfee00000 oem=SKIFF product=MICROVM`), lines.join('\n'));
      const ids = Array.from({ length: cpus }, (_, i) => i).join(',');
      t.true(lines.includes(`mptable processors=${ids} buses=1 ioapics=1 io_ints=24 local_ints=2`), lines.join('\n'));
      t.true(lines.includes(`mptable cpus=${cpus} bsp=0 ioapic=0xfec00000 ioapic_id=${cpus} entries=${entries}`), lines.join('\n'));
      t.true(lines.includes('mptable ok'));
    });
  }

  test(`${build}: --cpus 4: the guest starts every AP with INIT-SIPI-SIPI, into long mode`, async (t) => {
    const r = await guest('smp', ['--cpus', '4'], kernel);
    t.is(r.code, 0, r.stdout + r.stderr);
    const lines = guestSaid(r.stdout);
    // IA32_APIC_BASE: 0xfee00000, globally enabled (bit 11), this is the BSP (bit 8).
    t.regex(lines.find((l) => l.startsWith('smp '))!, /^smp apic_base_msr=0xfee00900 lapic_id=0 lapic_version=0x[0-9a-f]+$/);
    // Each AP went real mode -> 32-bit -> long mode on its own vCPU thread (stage bytes) and added
    // 1 to a counter with a locked add; the BSP saw all three.
    for (const id of [1, 2, 3]) t.true(lines.some((l) => new RegExp(`^ap apic_id=${id} sipis=[12] spins=\\d+ stage=long-mode$`).test(l)), lines.join('\n'));
    t.true(lines.includes('aps started=3 of 3'));
  });
}

test('bzImage facts: long mode entry, boot_params, command line, e820 and the initrd as promised', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-native-'));
  const initrd = path.join(dir, 'initrd.bin');
  const bytes = randomBytes(2500);
  await fs.writeFile(initrd, bytes);
  const r = await guest('facts', ['--initrd', initrd], GUEST_BZIMAGE);
  t.is(r.code, 0, r.stdout + r.stderr);
  const lines = guestSaid(r.stdout);
  // Long mode with paging (CR0.PG|ET|PE, CR4.PAE, EFER.LME|LMA), the boot GDT's selectors, and
  // %rsi -> the zero page (layout.h kZeroPage).
  t.true(lines.includes('entry64 cs=0x10 ds=0x18 ss=0x18 cr0=0x80000011 cr4=0x20 efer=0x500 rsi=0x3000'), lines.join('\n'));
  t.true(lines.includes('boot_params hdr_magic=0x53726448 version=0x20f type_of_loader=0xff loadflags=0x1'));
  t.regex(lines.find((l) => l.startsWith('cmdline '))!, /^cmdline console=ttyS0 .*skiff\.test=facts virtio_mmio\.device=0x200@0xd0000000:16 virtio_mmio\.device=0x200@0xd0000200:17$/); // the engine adds rng and vsock
  t.deepEqual(
    lines.filter((l) => l.startsWith('e820 addr=')),
    ['e820 addr=0x0 size=0x9fc00 type=0x1', 'e820 addr=0x9fc00 size=0x60400 type=0x2', `e820 addr=0x100000 size=0x${(64 * MiB - 0x100000).toString(16)} type=0x1`],
  );
  const rd = /^ramdisk paddr=0x([0-9a-f]+) size=0x([0-9a-f]+) fnv1a=0x([0-9a-f]+)$/.exec(lines.find((l) => l.startsWith('ramdisk '))!)!;
  t.is(Number.parseInt(rd[1], 16) % 4096, 0);
  t.is(Number.parseInt(rd[2], 16), bytes.length);
  t.is(Number.parseInt(rd[3], 16), fnv1a(bytes));
  t.true(lines.includes('facts ok'));
});

test('a guest that never ends is stopped by --timeout: 124', async (t) => {
  // echo polls the UART for a line that never comes (the CLI's stdin is empty).
  const r = await skiff(['boot', '--engine', 'native', '--kernel', GUEST, '--memory', '32', '--timeout', '2', '--cmdline', 'skiff.test=echo']);
  t.is(r.code, 124);
  t.regex(r.stderr, /guest still running after 2 s/);
});

test('kill() ends a running machine', async (t) => {
  const config = await makeVmConfig({ kernel: GUEST, memoryMiB: 32, cmdline: 'skiff.test=echo' });
  const machine = await startNative(config);
  machine.output.resume();
  await new Promise((r) => setTimeout(r, 300));
  machine.kill();
  t.deepEqual(await machine.wait(), { kind: 'killed' });
});

test('guest memory too small for the kernel and initrd: one-line error', async (t) => {
  // skiff's vmlinux loads at 16 MiB; with the default initrd it cannot fit in 32 MiB of RAM.
  const { cachedKernel } = await import('../src/kernel/build.js');
  const kernel = (await cachedKernel())!;
  const r = await skiff(['boot', '--engine', 'native', '--kernel', kernel.vmlinux, '--memory', '32', '--', 'true']);
  t.is(r.code, 125);
  t.regex(r.stderr.split('\n').filter(Boolean).pop()!, /^skiff: native engine: (kernel segment at 0x[0-9a-f]+|initrd) \(\d+ KiB\) does not fit in guest memory( above the kernel)?; give more memory$/);
});

// The device plumbing (hypervisor/vmm/device_host.h) end to end, through the doorbell test device:
// ring 3 writes an MMIO doorbell; the machine's event loop writes guest memory and raises an
// interrupt line; the guest sees both, three rounds. Each path is forced and then checked twice:
// by what the machine says it did, and by what the device register tells the guest.
async function doorbell(kernel: string, test: string, opts: { emulateDoorbells?: boolean; emulateInterruptLines?: boolean; doorbellTest?: boolean } = {}) {
  const { loadAddon } = await import('../src/vm/addon.js');
  let out = '';
  const machine = new (loadAddon().Machine)({ kernel, cmdline: `skiff.test=${test}`, cpus: 1, memoryMiB: 32, doorbellTest: true, ...opts });
  const timer = setTimeout(() => machine.kill(), 30_000);
  const result = await machine.start((chunk) => (out += chunk.toString('latin1')));
  clearTimeout(timer);
  return { result, lines: guestSaid(out), out };
}

for (const [build, kernel] of BUILDS) {
  for (const [bell, irq] of [[false, false], [true, true], [true, false], [false, true]] as const) {
    const name = (emulated: boolean) => (emulated ? 'emulated' : 'backend');
    test(`${build}: doorbell rung from ring 3 → event loop writes guest memory and raises IRQ 23 (doorbell ${name(bell)}, interrupt ${name(irq)})`, async (t) => {
      const { result, lines, out } = await doorbell(kernel, 'doorbell', { emulateDoorbells: bell, emulateInterruptLines: irq });
      t.is(result.kind, 'exited', `${result.detail}\n${out}`);
      t.is(result.status, 0, out);
      const bells = bell ? 'backend=0 emulated=1' : 'backend=1 emulated=0';
      const lines_ = irq ? 'backend=0 emulated=1' : 'backend=1 emulated=0';
      t.true(result.events.startsWith(`doorbells ${bells}; interrupt lines ${lines_}`), result.events);
      t.true(lines.includes(`doorbell device at 0xd0000e00 irq=23 doorbell=${name(bell)} interrupt=${name(irq)}`), lines.join('\n'));
      t.true(lines.includes('doorbell rounds=3 reply=3 irqs=3 host_rings=3 lost_replies=0'), lines.join('\n'));
    });
  }
}

test('doorbell: a reply address outside guest RAM is refused and counted; the interrupt still comes (both paths)', async (t) => {
  for (const emulated of [false, true]) {
    const { result, lines, out } = await doorbell(GUEST, 'doorbell-lost', { emulateDoorbells: emulated, emulateInterruptLines: emulated });
    t.deepEqual([result.kind, result.status], ['exited', 0], out);
    t.true(lines.includes('doorbell rounds=3 reply=0 irqs=3 host_rings=3 lost_replies=3'), lines.join('\n'));
  }
});

test('doorbell: without the device the guest finds nothing there (unclaimed MMIO reads all ones)', async (t) => {
  const { result, lines } = await doorbell(GUEST, 'doorbell', { doorbellTest: false });
  t.deepEqual([result.kind, result.status, result.events], ['exited', 1, '']);
  t.true(lines.includes('doorbell device not found: magic=0xffffffff at 0xd0000e00'), lines.join('\n'));
});

test('doorbell test device: the machine adds its word to the kernel command line (DeviceHost::appendCmdline)', async (t) => {
  const { result, lines } = await doorbell(GUEST, 'facts');
  t.deepEqual([result.kind, result.status], ['exited', 0]);
  t.regex(lines.find((l) => l.startsWith('cmdline '))!, / skiff\.doorbell_test=0x200@0xd0000e00:23$/);
});
