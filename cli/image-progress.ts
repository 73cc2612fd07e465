// Shows image build progress events through a Progress.
import type { ImageBuildProgress } from '../src/image/build.js';
import { kernelProgress } from './kernel/progress.js';
import type { Progress } from './progress.js';

const mib = (bytes: number) => `${(bytes / 1048576).toFixed(1)} MiB`;

export function imageProgress(progress: Progress): (p: ImageBuildProgress) => void {
  const kernel = kernelProgress(progress);
  return (p) => {
    switch (p.phase) {
      case 'kernel':
        return kernel(p.event);
      case 'packages': {
        const e = p.event;
        switch (e.phase) {
          case 'resolve':
            return progress.step(`packages: resolving ${e.names.join(', ')}`);
          case 'wait':
            return progress.step(`packages: waiting for another skiff (pid ${e.holderPid}) that is fetching ${e.name}`);
          case 'download':
            return progress.update('packages: downloading', e.percent, 100, `${e.name} ${e.version}`);
          case 'unpack':
            return progress.step(`packages: unpacking ${e.name} ${e.version}`);
          case 'cached':
            return;
        }
        return;
      }
      case 'files':
        return progress.step(`image: ${p.count} files`);
      case 'initrd':
        return progress.step(`image: initrd ${mib(p.bytes)}${p.cached ? ' (cached)' : ''}`);
      case 'image':
        return progress.step(`image: writing the ${p.format === 'uki' ? 'UKI' : 'image directory'}`);
    }
  };
}
