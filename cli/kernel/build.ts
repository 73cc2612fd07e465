import { Command, Option } from 'clipanion';
import * as t from 'typanion';
import { KERNEL_FLAVORS } from '../../src/kernel/flavors.js';
import { SkiffCommand } from '../base.js';
import { makeProgress } from '../progress.js';
import { kernelProgress } from './progress.js';

export class KernelBuildCommand extends SkiffCommand {
  static override paths = [['kernel', 'build']];
  static override usage = Command.Usage({
    category: 'Kernel',
    description: "build skiff's guest kernel from its config fragment",
    details: `
      Builds Linux from Debian's \`linux-source-6.1\` with \`make tinyconfig\` plus the fragment
      (default: \`kernel-config/6.1/x86_64.config\`), and caches vmlinux, bzImage and .config under a key
      made from the fragment, the source version and the compiler. A second call with the same inputs
      returns at once. A cold build takes about 8 minutes on 2 cores.

      The build fails, naming each one, if \`make olddefconfig\` drops or changes an option the fragment asks for.

      \`--flavor pvm-native\` builds the kernel flavor for KVM on PVM (\`/sys/module/kvm_pvm\`), whose
      instruction emulator needs small kernel changes (\`kernel-config/6.1/pvm-native/\`: patches and a
      config fragment applied on top of the default one). It is built from a copy of the default
      kernel's build tree (the default kernel is built first if missing): its first build takes about
      9 minutes on 2 cores (its CONFIG_HZ changes nearly every object), a later change to its patches
      about 30 seconds.
    `,
    examples: [
      ['Build (or find) the default kernel', '$0 kernel build'],
      ['Print where the artifacts are, as JSON', '$0 kernel build --json'],
      ['Build another fragment with 4 jobs', '$0 kernel build --fragment my.config --jobs 4'],
      ['Build the flavor for KVM on PVM', '$0 kernel build --flavor pvm-native --json'],
    ],
  });

  jobs = Option.String('--jobs,-j', { description: 'Parallel compile jobs (default: number of CPUs)', validator: t.cascade(t.isNumber(), [t.isInteger(), t.isInInclusiveRange(1, 256)]) });
  json = Option.Boolean('--json', false, { description: 'Print {vmlinux, bzImage, config, version} as JSON' });
  fragment = Option.String('--fragment', { description: 'Config fragment to build (default: kernel-config/6.1/x86_64.config)' });
  flavor = Option.String('--flavor', { description: `Kernel flavor to build on top of the fragment (${KERNEL_FLAVORS.join(', ')})`, validator: t.isEnum(KERNEL_FLAVORS) });
  quiet = Option.Boolean('--quiet,-q', false, { description: 'No progress output' });

  async run() {
    const { buildKernel, defaultFragment } = await import('../../src/kernel/build.js');
    const progress = await makeProgress(this.context.stderr, this.quiet);
    const kernel = await buildKernel({ fragment: this.fragment ?? defaultFragment(), flavor: this.flavor, jobs: this.jobs, onProgress: kernelProgress(progress) });
    progress.done();
    if (this.json) {
      this.context.stdout.write(`${JSON.stringify({ vmlinux: kernel.vmlinux, bzImage: kernel.bzImage, config: kernel.config, version: kernel.version }, null, 2)}\n`);
    } else {
      this.context.stdout.write(`kernel ${kernel.version}\n  vmlinux: ${kernel.vmlinux}\n  bzImage: ${kernel.bzImage}\n  config:  ${kernel.config}\n`);
    }
  }
}
