// Kernel config fragments: parse what a fragment asks for, and find what `make olddefconfig` lost.

export class KernelConfigError extends Error {}

/** One requested option: value is "y", "m", a number, a quoted string, or "n" for "is not set". */
export interface ConfigOption {
  name: string;
  value: string;
  line: number;
}

const SET = /^(CONFIG_[A-Za-z0-9_]+)=(.*)$/;
const UNSET = /^# (CONFIG_[A-Za-z0-9_]+) is not set$/;

/** Parses a fragment or a whole .config. Comments and blank lines are skipped; anything else is an error. */
export function parseConfig(text: string, file = 'config'): ConfigOption[] {
  const options: ConfigOption[] = [];
  const seen = new Map<string, number>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    const lineNo = i + 1;
    let m = SET.exec(line);
    const option = m ? { name: m[1], value: m[2], line: lineNo } : (m = UNSET.exec(line)) ? { name: m[1], value: 'n', line: lineNo } : undefined;
    if (!option) {
      if (line === '' || line.startsWith('#')) return;
      throw new KernelConfigError(`${file}:${lineNo}: expected CONFIG_NAME=value or "# CONFIG_NAME is not set", got "${line}"`);
    }
    if (option.value === '') throw new KernelConfigError(`${file}:${lineNo}: ${option.name} has an empty value`);
    const previous = seen.get(option.name);
    if (previous !== undefined) throw new KernelConfigError(`${file}:${lineNo}: ${option.name} is already set on line ${previous}`);
    seen.set(option.name, lineNo);
    options.push(option);
  });
  return options;
}

/** The options a fragment asks for, one per line, without comments: what a cache key is made of, so
 *  editing a comment does not rebuild the kernel. */
export function canonicalConfig(text: string, file = 'config'): string {
  return parseConfig(text, file)
    .map((o) => `${o.name}=${o.value}`)
    .join('\n');
}

/** What the fragment requested that the final .config does not have, as "NAME=wanted (got X)". */
export function lostOptions(requested: ConfigOption[], finalConfig: ConfigOption[]): string[] {
  const final = new Map(finalConfig.map((o) => [o.name, o.value]));
  const lost: string[] = [];
  for (const want of requested) {
    const got = final.get(want.name) ?? 'n';
    if (got !== want.value) lost.push(`${want.name}=${want.value} (got ${got === 'n' ? 'not set' : got})`);
  }
  return lost;
}
