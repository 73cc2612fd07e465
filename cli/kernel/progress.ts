// Shows kernel build progress events through a Progress.
import type { KernelBuildProgress } from '../../src/kernel/build.js';
import type { Progress } from '../progress.js';

export function kernelProgress(progress: Progress): (p: KernelBuildProgress) => void {
  return (p) => {
    switch (p.phase) {
      case 'wait':
        return progress.step(`waiting for another skiff (pid ${p.holderPid}) that is building this kernel`);
      case 'extract':
        return progress.step('kernel: extracting Debian linux-source (once per source version)');
      case 'patch':
        return progress.step(`kernel: the ${p.flavor} flavor's source (a hard-linked copy, patched once per patch set)`);
      case 'configure':
        if (p.flavor === undefined) return progress.step('kernel: configuring (tinyconfig + fragment)');
        return progress.step(
          p.incremental
            ? `kernel: configuring (a copy of an earlier build tree + the ${p.flavor} fragment)`
            : `kernel: configuring (tinyconfig + fragment + the ${p.flavor} fragment; the default build's tree is gone, so this is a full build)`,
        );
      case 'compile':
        return progress.update('kernel: compiling', p.done, p.total, p.file);
      case 'install':
        return progress.done('kernel: compiled');
    }
  };
}
