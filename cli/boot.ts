import { Command, Option } from 'clipanion';
import * as t from 'typanion';
import { EXIT_SKIFF_ERROR, EXIT_TIMEOUT, SkiffCommand } from './base.js';
import { makeProgress } from './progress.js';
import { imageProgress } from './image-progress.js';

export class BootCommand extends SkiffCommand {
  static override paths = [['boot']];
  static override usage = Command.Usage({
    description: 'boot a Linux guest and run one command in it',
    details: `
      Boots a boot image in a microVM, streams its console, and exits with the status of the command
      that skiff-init ran in the guest. IMAGE is a UKI (.efi) or an image directory made by
      \`skiff build\`; its kernel and initrd are booted directly, without firmware, and its command line
      comes before skiff's own additions. With no IMAGE, the default image (images/default.yml:
      skiff's kernel, skiff-init, busybox) is built on first use (the kernel takes about 8 minutes)
      and cached. --kernel and --initrd replace the image's parts.
      With no command, an interactive shell runs on the console (Ctrl-] ends the VM).

      Exit status: the guest command's own; 124 if --timeout expired; 125 if skiff or the guest
      failed (a kernel panic, a file that is not a kernel, QEMU missing...), with a one-line reason.
    `,
    examples: [
      ['Print the guest kernel version', '$0 boot -- uname -r'],
      ['Boot a UKI made by skiff build', '$0 boot my.efi -- cat /etc/motd'],
      ['A guest command exit status comes back', "$0 boot -- sh -c 'exit 7'; echo $?"],
      ['Two vCPUs and 512 MiB', '$0 boot --cpus 2 --memory 512 -- nproc'],
      ['Your own kernel and initrd', '$0 boot --kernel ./bzImage --initrd ./initrd.cpio --cmdline "loglevel=7"'],
      ['Fetch a page from a server on the host loopback', '$0 boot --network nat -- wget -qO- http://10.0.2.2:8000/'],
      ['Serve guest port 80 on host 127.0.0.1:8080', "$0 boot -p 8080:80 -- httpd -f -p 80 -h /etc"],
    ],
  });

  engine = Option.String('--engine', 'auto', { description: 'auto | qemu | native', validator: t.isEnum(['auto', 'qemu', 'native'] as const) });
  kernel = Option.String('--kernel', { description: "Kernel: ELF vmlinux with a PVH note, or bzImage (default: the image's)" });
  initrd = Option.String('--initrd', { description: "Initial ramdisk, cpio (default: the image's)" });
  cmdline = Option.String('--cmdline', { description: "Extra kernel command line, appended to skiff's" });
  cpus = Option.String('--cpus', { description: 'vCPUs (1-64, default 1)', validator: t.isNumber() });
  memory = Option.String('--memory,-m', { description: 'Memory in MiB (default 256)', validator: t.isNumber() });
  disks = Option.Array('--disk', [], { description: 'Attach a raw disk image as virtio-blk (vda, vdb, ... in order); FILE,ro for read-only. Repeatable' });
  network = Option.String('--network', {
    description: 'nat: an eth0 behind rootless NAT (guest 10.0.2.15, host loopback reachable as 10.0.2.2, DNS 10.0.2.3); none: no NIC (default, unless --publish)',
    validator: t.isEnum(['nat', 'none'] as const),
  });
  publish = Option.Array('--publish,-p', [], { description: 'Forward host 127.0.0.1:HOSTPORT to guest port GUESTPORT (tcp, or /udp); implies --network nat. Repeatable' });
  vmDir = Option.String('--vm-dir', {
    description: "Put the VM's sockets in DIR (made 0700 if missing): DIR/vsock reaches guest ports (write \"CONNECT PORT\\n\"), guest connections to host port P reach a listener at DIR/vsock_P (default: a private temporary directory)",
  });
  timeout = Option.String('--timeout', { description: 'Stop the guest after this many seconds (exit 124)', validator: t.isNumber() });
  verbose = Option.Boolean('--verbose,-v', false, { description: "Show the kernel's boot messages and skiff's engine choice" });
  quiet = Option.Boolean('--quiet,-q', false, { description: 'No progress output' });
  rest = Option.Rest({ name: '[IMAGE] [-- command]' });

  async run() {
    const [{ selectEngine, probeHost }, { makeVmConfig }, { startMachine }, { describeExit }] = await Promise.all([
      import('../src/vm/host.js'),
      import('../src/vm/config.js'),
      import('../src/vm/index.js'),
      import('../src/vm/machine.js'),
    ]);
    const stderr = this.context.stderr;
    const host = probeHost();
    const selection = selectEngine(this.engine, host);
    if (selection.reason) await this.noteOnce(host.pvm ? 'pvm' : 'tcg', selection.reason);

    const { parseDiskFlag, parsePublishFlag } = await import('../src/vm/config.js');
    const disks = this.disks.map(parseDiskFlag);
    const publish = this.publish.map(parsePublishFlag);
    const { image, command } = await this.imageAndCommand();
    const config = await makeVmConfig({
      kernel: this.kernel ?? image.kernel,
      initrd: this.initrd ?? image.initrd,
      cmdline: [image.cmdline, this.cmdline].filter(Boolean).join(' '),
      command: command.length > 0 ? command : undefined,
      cpus: this.cpus,
      memoryMiB: this.memory,
      timeoutSec: this.timeout,
      verbose: this.verbose,
      disks,
      network: this.network,
      publish,
      vmDir: this.vmDir,
    });

    const machine = await startMachine(config, selection);
    if (this.verbose) {
      stderr.write(`skiff: ${machine.description}, ${config.cpus} vCPU, ${config.memoryMiB} MiB\nskiff: cmdline: ${config.cmdline}\n`);
      stderr.write(`skiff: vsock: ${machine.vsockPath} (guest CID 3); guest connections to CID 2 port P reach ${machine.vmDir}/vsock_P\n`);
    }
    machine.output.pipe(this.context.stdout, { end: false });
    // skiff's own last words must start on a line of their own, even if the guest's did not end one.
    let midLine = false;
    machine.output.on('data', (chunk: Buffer) => (midLine = chunk.length > 0 && chunk[chunk.length - 1] !== 0x0a));
    const detach = this.attachInput(machine, command.length === 0);
    const onSignal = () => machine.kill();
    process.on('SIGINT', onSignal).on('SIGTERM', onSignal);
    machine.ready.then((m) => {
      if (m && this.verbose) stderr.write(`skiff: guest ready at ${(m.uptimeSec * 1000).toFixed(1)} ms of guest uptime\n`);
    });

    const exit = await machine.wait();
    detach();
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
    if (exit.kind === 'exited') return exit.status;
    stderr.write(`${midLine && (this.context.stdout as NodeJS.WriteStream).isTTY && (stderr as NodeJS.WriteStream).isTTY ? '\n' : ''}skiff: ${describeExit(exit)}\n`);
    return exit.kind === 'timeout' ? EXIT_TIMEOUT : EXIT_SKIFF_ERROR;
  }

  /** A first word that names a boot image (a .efi file, an image directory) is the image; the rest is the command. */
  private async imageAndCommand(): Promise<{ image: import('../src/image/open.js').BootableImage; command: string[] }> {
    const { looksLikeImage, openImage } = await import('../src/image/open.js');
    if (this.rest.length > 0 && (await looksLikeImage(this.rest[0]))) {
      return { image: await openImage(this.rest[0]), command: this.rest.slice(1) };
    }
    const { defaultImage } = await import('../src/image/default.js');
    const progress = await makeProgress(this.context.stderr, this.quiet);
    const image = await defaultImage({ onProgress: imageProgress(progress) });
    progress.done();
    return { image, command: this.rest };
  }

  /** Console input: forwarded for an interactive shell; a terminal goes raw and Ctrl-] ends the VM. */
  private attachInput(machine: { input: NodeJS.WritableStream; kill(): void }, interactive: boolean): () => void {
    const stdin = this.context.stdin as NodeJS.ReadStream;
    if (!interactive) return () => {};
    const raw = stdin.isTTY === true;
    if (raw) stdin.setRawMode(true);
    const onData = (chunk: Buffer) => {
      if (raw && chunk.includes(0x1d)) return machine.kill();
      machine.input.write(chunk);
    };
    stdin.on('data', onData);
    return () => {
      stdin.off('data', onData);
      if (raw) stdin.setRawMode(false);
      stdin.pause();
    };
  }

  /** Engine notes (KVM on PVM, say) are said once per cache, then only with --verbose. */
  private async noteOnce(topic: string, text: string): Promise<void> {
    const [{ cacheDir, exists, atomicWrite }, path] = await Promise.all([import('../src/store/store.js'), import('node:path')]);
    const marker = path.join(cacheDir(), 'notes', topic);
    if (this.verbose || !(await exists(marker))) {
      this.context.stderr.write(`skiff: note: ${text}\n`);
      await atomicWrite(marker, `${text}\n`).catch(() => {});
    }
  }
}
