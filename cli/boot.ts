import { Command, Option } from 'clipanion';
import * as t from 'typanion';
import { EXIT_SKIFF_ERROR, EXIT_TIMEOUT, SkiffCommand } from './base.js';
import { makeProgress } from './progress.js';
import { kernelProgress } from './kernel/progress.js';

export class BootCommand extends SkiffCommand {
  static override paths = [['boot']];
  static override usage = Command.Usage({
    description: 'boot a Linux guest and run one command in it',
    details: `
      Boots a kernel and initrd in a microVM, streams its console, and exits with the status of the
      command that skiff-init ran in the guest. With no --kernel, the default kernel is built (once,
      about 8 minutes) and cached; with no --initrd, a default initrd of skiff-init and busybox is used.
      With no command, an interactive shell runs on the console (Ctrl-] ends the VM).

      Exit status: the guest command's own; 124 if --timeout expired; 125 if skiff or the guest
      failed (a kernel panic, a file that is not a kernel, QEMU missing...), with a one-line reason.
    `,
    examples: [
      ['Print the guest kernel version', '$0 boot -- uname -r'],
      ['A guest command exit status comes back', "$0 boot -- sh -c 'exit 7'; echo $?"],
      ['Two vCPUs and 512 MiB', '$0 boot --cpus 2 --memory 512 -- nproc'],
      ['Your own kernel and initrd', '$0 boot --kernel ./bzImage --initrd ./initrd.cpio --cmdline "loglevel=7"'],
    ],
  });

  engine = Option.String('--engine', 'auto', { description: 'auto | qemu | native', validator: t.isEnum(['auto', 'qemu', 'native'] as const) });
  kernel = Option.String('--kernel', { description: 'Kernel: ELF vmlinux with a PVH note, or bzImage (default: the cached skiff kernel)' });
  initrd = Option.String('--initrd', { description: 'Initial ramdisk, cpio (default: skiff-init + busybox)' });
  cmdline = Option.String('--cmdline', { description: "Extra kernel command line, appended to skiff's" });
  cpus = Option.String('--cpus', { description: 'vCPUs (1-64, default 1)', validator: t.isNumber() });
  memory = Option.String('--memory,-m', { description: 'Memory in MiB (default 256)', validator: t.isNumber() });
  timeout = Option.String('--timeout', { description: 'Stop the guest after this many seconds (exit 124)', validator: t.isNumber() });
  verbose = Option.Boolean('--verbose,-v', false, { description: "Show the kernel's boot messages and skiff's engine choice" });
  quiet = Option.Boolean('--quiet,-q', false, { description: 'No progress output' });
  command = Option.Rest({ name: 'command' });

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

    const kernel = this.kernel ?? (await this.defaultKernel());
    const initrd = this.initrd ?? (await (await import('../src/initrd/default.js')).defaultInitrd());
    const config = await makeVmConfig({
      kernel,
      initrd,
      cmdline: this.cmdline,
      command: this.command.length > 0 ? this.command : undefined,
      cpus: this.cpus,
      memoryMiB: this.memory,
      timeoutSec: this.timeout,
      verbose: this.verbose,
    });

    const machine = await startMachine(config, selection);
    if (this.verbose) stderr.write(`skiff: ${machine.description}, ${config.cpus} vCPU, ${config.memoryMiB} MiB\nskiff: cmdline: ${config.cmdline}\n`);
    machine.output.pipe(this.context.stdout, { end: false });
    // skiff's own last words must start on a line of their own, even if the guest's did not end one.
    let midLine = false;
    machine.output.on('data', (chunk: Buffer) => (midLine = chunk.length > 0 && chunk[chunk.length - 1] !== 0x0a));
    const detach = this.attachInput(machine, this.command.length === 0);
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

  private async defaultKernel(): Promise<string> {
    const { buildKernel, cachedKernel, defaultFragment } = await import('../src/kernel/build.js');
    const cached = await cachedKernel();
    if (cached) return cached.vmlinux;
    const progress = await makeProgress(this.context.stderr, this.quiet);
    progress.step('skiff: building the default guest kernel (first use only, about 8 minutes on 2 cores)');
    const built = await buildKernel({ fragment: defaultFragment(), onProgress: kernelProgress(progress) });
    progress.done();
    return built.vmlinux;
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
