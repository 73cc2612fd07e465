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
      case 'configure':
        return progress.step('kernel: configuring (tinyconfig + fragment)');
      case 'compile':
        return progress.update('kernel: compiling', p.done, p.total, p.file);
      case 'install':
        return progress.done('kernel: compiled');
    }
  };
}
