import { Command, Option } from 'clipanion';
import { SkiffCommand } from '../base.js';

export class KernelInfoCommand extends SkiffCommand {
  static override paths = [['kernel', 'info']];
  static override usage = Command.Usage({
    category: 'Kernel',
    description: 'tell what a kernel file is: format, version, PVH entry',
    examples: [
      ['Inspect the cached default kernel', '$0 kernel info "$(skiff kernel build --json | jq -r .vmlinux)"'],
      ['Inspect a distribution kernel', '$0 kernel info /boot/vmlinuz-6.1.0-13-cloud-amd64'],
    ],
  });

  file = Option.String({ name: 'FILE' });
  json = Option.Boolean('--json', false, { description: 'Print as JSON' });

  async run() {
    const { inspectKernel } = await import('../../src/kernel/inspect.js');
    const info = await inspectKernel(this.file);
    const pvh = info.pvhEntry === undefined ? undefined : `0x${info.pvhEntry.toString(16)}`;
    if (this.json) {
      this.context.stdout.write(`${JSON.stringify({ path: info.path, format: info.format, version: info.version ?? null, pvhEntry: pvh ?? null, bootProtocol: info.bootProtocol ?? null, size: info.size }, null, 2)}\n`);
      return;
    }
    const format = info.format === 'elf' ? 'ELF vmlinux' : `bzImage (boot protocol ${info.bootProtocol})`;
    const lines = [
      `format:    ${format}`,
      `version:   ${info.version ?? 'unknown'}`,
      `PVH entry: ${pvh ?? (info.format === 'elf' ? 'none (no Xen PVH note)' : 'n/a (boots through the Linux boot protocol)')}`,
      `size:      ${info.size} bytes`,
    ];
    this.context.stdout.write(`${lines.join('\n')}\n`);
  }
}
