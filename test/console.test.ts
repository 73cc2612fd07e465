import test from 'ava';
import { ConsoleTap, findPanic, type ReadyMarker } from '../src/vm/console.js';

async function feed(chunks: string[]): Promise<{ out: string; markers: ReadyMarker[]; tail: string }> {
  const markers: ReadyMarker[] = [];
  const tap = new ConsoleTap((m) => markers.push(m));
  const out: Buffer[] = [];
  tap.on('data', (b: Buffer) => out.push(b));
  const ended = new Promise((r) => tap.on('end', r));
  for (const c of chunks) tap.write(Buffer.from(c));
  tap.end();
  await ended;
  return { out: Buffer.concat(out).toString(), markers, tail: tap.tail() };
}

test('the ready marker is taken out of the stream and reported', async (t) => {
  const r = await feed(['boot\r\nskiff-init: ready 0.812345 123456789\r\nhello\r\n']);
  t.is(r.out, 'boot\r\nhello\r\n');
  t.deepEqual(r.markers, [{ uptimeSec: 0.812345, tsc: 123456789n }]);
});

test('a marker split across chunks at every position is still found', async (t) => {
  const text = 'x\nskiff-init: ready 1.5 42\ny\n';
  for (let i = 1; i < text.length; i++) {
    const r = await feed([text.slice(0, i), text.slice(i)]);
    t.is(r.out, 'x\ny\n', `split at ${i}`);
    t.is(r.markers.length, 1);
  }
});

test('lines that only start like the marker pass through untouched', async (t) => {
  const r = await feed(['skiff-init: cannot run \'nope\': No such file\n', 'ski', 'ff rocks\n', 'prompt# ']);
  t.is(r.out, "skiff-init: cannot run 'nope': No such file\nskiff rocks\nprompt# ");
  t.deepEqual(r.markers, []);
});

test('the marker is only recognised at the start of a line', async (t) => {
  const r = await feed(['echo skiff-init: ready 1 2\n']);
  t.is(r.out, 'echo skiff-init: ready 1 2\n');
  t.deepEqual(r.markers, []);
});

test('a held partial marker is flushed at the end', async (t) => {
  const r = await feed(['skiff-init: rea']);
  t.is(r.out, 'skiff-init: rea');
});

test('the tail keeps the last bytes and finds a panic', async (t) => {
  const r = await feed(['a'.repeat(40000), '\n[    0.9] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000\r\n']);
  t.true(r.tail.length <= 16 * 1024 + 100);
  t.is(findPanic(r.tail), 'Attempted to kill init! exitcode=0x00000000');
  t.is(findPanic('all fine'), undefined);
});
