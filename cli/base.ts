// What every skiff command shares: --debug, one-line errors, exit codes.
import { Command, Option } from 'clipanion';

/** docker's convention: 125 when skiff itself fails, so a guest's own status stays unambiguous. */
export const EXIT_SKIFF_ERROR = 125;
export const EXIT_TIMEOUT = 124;

export abstract class SkiffCommand extends Command {
  debug = Option.Boolean('--debug', false, { description: 'On an error, print its whole chain of causes and stacks' });

  abstract run(): Promise<number | void>;

  async execute(): Promise<number> {
    try {
      return (await this.run()) ?? 0;
    } catch (err) {
      this.context.stderr.write(`skiff: ${errorLine(err)}\n`);
      if (this.debug) this.context.stderr.write(errorChain(err));
      return EXIT_SKIFF_ERROR;
    }
  }
}

function errorLine(err: unknown): string {
  if (err instanceof Error) return err.message.split('\n')[0];
  return String(err);
}

function errorChain(err: unknown): string {
  let out = '';
  for (let e: unknown = err; e; e = e instanceof Error ? e.cause : undefined) {
    out += e instanceof Error ? `${e.stack ?? e.message}\n` : `${String(e)}\n`;
    if (e instanceof Error && e.cause) out += 'caused by: ';
  }
  return out;
}
