import { Command, Option } from 'clipanion';
import * as t from 'typanion';
import { SkiffCommand } from './base.js';
import { imageProgress } from './image-progress.js';
import { makeProgress } from './progress.js';

export class BuildCommand extends SkiffCommand {
  static override paths = [['build']];
  static override usage = Command.Usage({
    category: 'Images',
    description: 'build a boot image from a spec',
    details: `
      Reads an image spec (YAML, see docs/spec.md): a kernel, Debian packages, host programs with
      their shared libraries, files, and commands to run at boot. Writes one boot image:

      - \`uki\` (default): a Unified Kernel Image, systemd's EFI stub with .linux .initrd .cmdline
        .osrel .uname sections. \`skiff boot\` reads its sections directly; any UEFI firmware boots it.
      - \`dir\`: a directory with vmlinuz, vmlinux (when the kernel is built from config), initrd.cpio,
        cmdline and manifest.json. The same bytes as the UKI's sections.

      Kernels, packages and initrds are cached by content: building an unchanged spec again takes
      well under a second. The same spec gives the same bytes.
    `,
    examples: [
      ['Build a UKI', '$0 build images/default.yml -o default.efi'],
      ['Build a directory image', '$0 build my.yml -o out/ --format dir'],
      ['Boot it', '$0 boot default.efi -- uname -a'],
    ],
  });

  spec = Option.String({ name: 'SPEC' });
  output = Option.String('--output,-o', { required: true, description: 'Where to write the image (a file for uki, a directory for dir)' });
  format = Option.String('--format', 'uki', { description: 'uki | dir', validator: t.isEnum(['uki', 'dir'] as const) });
  jobs = Option.String('--jobs,-j', { description: 'Parallel jobs for a kernel build', validator: t.cascade(t.isNumber(), [t.isInteger(), t.isInInclusiveRange(1, 256)]) });
  json = Option.Boolean('--json', false, { description: 'Print what was built as JSON' });
  quiet = Option.Boolean('--quiet,-q', false, { description: 'No progress output' });

  async run() {
    const [{ readSpec }, { buildImage }, { defaultFragment }] = await Promise.all([
      import('../src/spec/spec.js'),
      import('../src/image/build.js'),
      import('../src/kernel/build.js'),
    ]);
    const spec = await readSpec(this.spec, { fragment: defaultFragment() });
    const progress = await makeProgress(this.context.stderr, this.quiet);
    const result = await buildImage(spec, { format: this.format, output: this.output, jobs: this.jobs, onProgress: imageProgress(progress) });
    progress.done();
    const out = this.context.stdout;
    if (this.json) {
      const { sources: _sources, ...rest } = result;
      out.write(`${JSON.stringify(rest, null, 2)}\n`);
      return;
    }
    out.write(`${result.output}\n  format:  ${result.format}\n  kernel:  ${result.kernel.version}\n  initrd:  ${result.initrd.entries} entries, ${result.initrd.bytes} bytes\n  cmdline: ${result.cmdline || '(none)'}\n  sha256:  ${result.sha256}\n`);
  }
}
