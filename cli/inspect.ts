import { Command, Option } from 'clipanion';
import { SkiffCommand } from './base.js';

const mib = (bytes: number) => `${(bytes / 1048576).toFixed(1)} MiB`;

export class InspectCommand extends SkiffCommand {
  static override paths = [['inspect']];
  static override usage = Command.Usage({
    category: 'Images',
    description: 'show what a boot image holds',
    details: `
      Reads a UKI (.efi) or an image directory made by \`skiff build\` and prints its format, kernel
      version, command line, initrd size and a summary of its files, and its sha256 (of the UKI file,
      or of a directory's manifest.json, which names the sha256 of every part).
    `,
    examples: [
      ['Summarize a UKI', '$0 inspect default.efi'],
      ['Everything, as JSON', '$0 inspect default.efi --json'],
    ],
  });

  image = Option.String({ name: 'IMAGE' });
  json = Option.Boolean('--json', false, { description: 'Print the report as JSON' });

  async run() {
    const { inspectImage } = await import('../src/image/inspect.js');
    const r = await inspectImage(this.image);
    const out = this.context.stdout;
    if (this.json) {
      out.write(`${JSON.stringify(r, null, 2)}\n`);
      return;
    }
    const lines = [
      `${r.image}`,
      `  format:  ${r.format === 'uki' ? 'UKI (PE/COFF, systemd stub)' : 'image directory'}, ${mib(r.bytes)}`,
      `  sha256:  ${r.sha256}`,
      `  kernel:  ${r.kernel.version ?? 'unknown version'} (${r.kernel.format === 'elf' ? 'ELF vmlinux' : 'bzImage'}, ${mib(r.kernel.bytes)})`,
      `  cmdline: ${r.cmdline || '(none)'}`,
    ];
    if (r.sections) lines.push(`  sections: ${r.sections.map((s) => `${s.name} ${s.bytes}`).join(', ')}`);
    if (r.initrd) {
      const i = r.initrd;
      lines.push(`  initrd:  ${mib(i.bytes)}, ${i.entries} entries: ${i.files} files, ${i.dirs} directories, ${i.symlinks} symlinks${i.other ? `, ${i.other} other` : ''}`);
      lines.push(`    by top-level directory: ${i.topLevel.map((t) => `${t.path} ${mib(t.bytes)}`).join(', ')}`);
      lines.push(`    largest: ${i.largest.map((f) => `${f.path} ${mib(f.bytes)}`).join(', ')}`);
    } else {
      lines.push('  initrd:  none');
    }
    out.write(`${lines.join('\n')}\n`);
  }
}
