import test from 'ava';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildCmdline, encodeCommand, makeVmConfig, VmConfigError } from '../src/vm/config.js';
import { selectEngine, EngineUnavailableError } from '../src/vm/host.js';

test('the command is hex-encoded NUL-separated argv, so quotes and spaces survive', (t) => {
  t.is(encodeCommand(['sh', '-c', 'exit 7']), Buffer.from('sh\0-c\0exit 7\0').toString('hex'));
  t.throws(() => encodeCommand([]), { instanceOf: VmConfigError });
  t.throws(() => encodeCommand(['a\0b']), { instanceOf: VmConfigError, message: /NUL/ });
});

test('the command line carries skiff settings, then user text, then the command', (t) => {
  const line = buildCmdline({ cmdline: 'loglevel=3', command: ['true'] });
  t.regex(line, /^console=ttyS0 reboot=t panic=-1 .*quiet loglevel=2 loglevel=3 skiff\.cmd=7472756500$/);
  t.false(buildCmdline({ verbose: true }).includes('quiet'));
});

test('a command line over the kernel limit is a clear error', (t) => {
  t.throws(() => buildCmdline({ command: ['echo', 'x'.repeat(1100)] }), { instanceOf: VmConfigError, message: /kernel command line is \d+ bytes, the limit is 1791/ });
});

async function tempFile(name: string, content: Uint8Array | string): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'skiff-test-'));
  const file = path.join(dir, name);
  await fs.writeFile(file, content);
  return file;
}

test('a file that is not a kernel is refused with its name', async (t) => {
  const file = await tempFile('notakernel', 'hello world, definitely not a kernel\n'.repeat(40));
  await t.throwsAsync(makeVmConfig({ kernel: file }), { instanceOf: VmConfigError, message: `${file} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)` });
});

test('a missing kernel or initrd is named', async (t) => {
  await t.throwsAsync(makeVmConfig({ kernel: '/nonexistent/vmlinux' }), { instanceOf: VmConfigError, message: 'kernel /nonexistent/vmlinux: no such file' });
});

test('an ELF without a PVH note is refused with what to do', async (t) => {
  await t.throwsAsync(makeVmConfig({ kernel: '/bin/ls' }), { instanceOf: VmConfigError, message: /without a PVH entry note/ });
});

test('resources are range-checked', async (t) => {
  const kernelPath = await tempFile('bz', bzImageHeader());
  await t.throwsAsync(makeVmConfig({ kernel: kernelPath, cpus: 0 }), { message: '--cpus must be a whole number from 1 to 64, got 0' });
  await t.throwsAsync(makeVmConfig({ kernel: kernelPath, cpus: 1.5 }), { message: /--cpus must be a whole number/ });
  await t.throwsAsync(makeVmConfig({ kernel: kernelPath, memoryMiB: 8 }), { message: '--memory (MiB) must be a whole number from 32 to 65536, got 8' });
  await t.throwsAsync(makeVmConfig({ kernel: kernelPath, timeoutSec: -1 }), { message: /--timeout \(seconds\) must be from/ });
  const ok = await makeVmConfig({ kernel: kernelPath, cpus: 2, memoryMiB: 128, timeoutSec: 1.5 });
  t.is(ok.kernel.format, 'bzimage');
  t.is(ok.kernel.version, '6.1.0-test');
  t.is(ok.timeoutMs, 1500);
  t.true(Object.isFrozen(ok));
});

test('engine selection: native needs KVM and says what PVM means; auto picks native only on real hardware, else says why not', (t) => {
  t.throws(() => selectEngine('native', { kvm: false, hardware: false, pvm: false, detail: '/dev/kvm does not exist' }), {
    instanceOf: EngineUnavailableError,
    message: 'the native engine needs KVM: /dev/kvm does not exist',
  });
  const nativePvm = selectEngine('native', { kvm: true, hardware: false, pvm: true, detail: 'KVM on PVM' });
  t.deepEqual([nativePvm.engine, nativePvm.accel], ['native', 'kvm']);
  t.regex(nativePvm.reason ?? '', /emulated/);
  const pvm = selectEngine('auto', { kvm: true, hardware: false, pvm: true, detail: 'KVM on PVM' });
  t.deepEqual([pvm.engine, pvm.accel], ['qemu', 'tcg']);
  t.regex(pvm.reason ?? '', /KVM on PVM/);
  t.regex(pvm.reason ?? '', /not the native engine/);
  const hw = selectEngine('auto', { kvm: true, hardware: true, pvm: false, detail: 'real' });
  t.deepEqual([hw.engine, hw.accel, hw.reason], ['native', 'kvm', undefined]);
  const noAddon = selectEngine('auto', { kvm: true, hardware: true, pvm: false, detail: 'real', nativeUnavailable: 'cannot load the native addon' });
  t.deepEqual([noAddon.engine, noAddon.accel, noAddon.reason], ['qemu', 'kvm', 'qemu with KVM, not the native engine: cannot load the native addon']);
  const none = selectEngine('auto', { kvm: false, hardware: false, pvm: false, detail: '/dev/kvm does not exist' });
  t.deepEqual([none.engine, none.accel, none.reason], ['qemu', 'tcg', 'qemu with TCG, not the native engine: /dev/kvm does not exist']);
});

/** The smallest file that passes as a bzImage: a setup header with its magic and a version string. */
function bzImageHeader(): Buffer {
  const b = Buffer.alloc(0x800);
  b.writeUInt16LE(0xaa55, 0x1fe);
  b.write('HdrS', 0x202, 'latin1');
  b.writeUInt16LE(0x020f, 0x206);
  b.writeUInt16LE(0x400, 0x20e);
  b.write('6.1.0-test (builder@host) #1\0', 0x600, 'latin1');
  return b;
}

test('--disk and --publish flags parse, and bad ones give one-line errors', async (t) => {
  const { parseDiskFlag, parsePublishFlag, VmConfigError } = await import('../src/vm/config.js');
  t.deepEqual(parseDiskFlag('a.img'), { path: 'a.img', readOnly: false });
  t.deepEqual(parseDiskFlag('a.img,ro'), { path: 'a.img', readOnly: true });
  t.throws(() => parseDiskFlag('a.img,rw'), { instanceOf: VmConfigError, message: '--disk a.img,rw: unknown option "rw" (expected FILE or FILE,ro)' });
  t.deepEqual(parsePublishFlag('8080:80'), { hostPort: 8080, guestPort: 80, protocol: 'tcp' });
  t.deepEqual(parsePublishFlag('5353:53/udp'), { hostPort: 5353, guestPort: 53, protocol: 'udp' });
  t.throws(() => parsePublishFlag('80'), { instanceOf: VmConfigError, message: '--publish 80: expected HOSTPORT:GUESTPORT or HOSTPORT:GUESTPORT/udp' });
  t.throws(() => parsePublishFlag('0:80'), { instanceOf: VmConfigError, message: '--publish 0:80: host port must be 1-65535' });
  t.throws(() => parsePublishFlag('80:70000'), { instanceOf: VmConfigError, message: '--publish 80:70000: guest port must be 1-65535' });
});

test('a published port turns the network on; --network none with --publish is an error', async (t) => {
  const { makeVmConfig } = await import('../src/vm/config.js');
  const { cachedKernel } = await import('../src/kernel/build.js');
  const kernel = (await cachedKernel())!.vmlinux;
  t.is((await makeVmConfig({ kernel })).network, 'none');
  t.is((await makeVmConfig({ kernel, publish: [{ hostPort: 8080, guestPort: 80, protocol: 'tcp' }] })).network, 'nat');
  await t.throwsAsync(makeVmConfig({ kernel, network: 'none', publish: [{ hostPort: 8080, guestPort: 80, protocol: 'tcp' }] }), { message: '--publish needs a network: drop --network none' });
  await t.throwsAsync(makeVmConfig({ kernel, publish: [{ hostPort: 8080, guestPort: 80, protocol: 'tcp' }, { hostPort: 8080, guestPort: 81, protocol: 'tcp' }] }), { message: '--publish: host port 8080/tcp is given twice' });
});
