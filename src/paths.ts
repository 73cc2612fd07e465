// Where skiff's own shipped files are, whether it runs from dist/ (the installed CLI) or from
// sources (tests, through tsx).
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The directory holding skiff's package.json. */
export function packageRoot(): string {
  // This file is src/paths.ts, or dist/src/paths.js once compiled.
  return path.basename(path.dirname(here)) === 'dist' ? path.resolve(here, '..', '..') : path.resolve(here, '..');
}

/** The static skiff-init binary built by `npm run build:init`. */
export function skiffInitBinary(): string {
  return path.join(packageRoot(), 'initrd', 'out', 'skiff-init');
}
