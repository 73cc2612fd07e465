// Shared by the tests that run the real CLI and boot real guests.
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { CpioWriter } from '../src/initrd/cpio.js';
import { packageRoot } from '../src/paths.js';

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the built CLI (dist/, as users run it) to completion. */
export function skiff(args: string[], options: { input?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return startSkiff(args, options).result;
}

/**
 * Starts the built CLI and returns at once, for tests that talk to the guest while it runs:
 * `result` settles when it ends, `ended()` says whether it has, `out()` is its stdout so far.
 */
export function startSkiff(args: string[], options: { input?: string; env?: NodeJS.ProcessEnv } = {}): { child: ChildProcess; result: Promise<RunResult>; ended: () => boolean; out: () => string } {
  const child = spawn(process.execPath, [path.join(packageRoot(), 'dist', 'bundle', 'skiff.js'), ...args], {
    env: { ...process.env, ...options.env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  let done = false;
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const result = new Promise<RunResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  }).finally(() => (done = true));
  child.stdin!.end(options.input ?? '');
  return { child, result, ended: () => done, out: () => stdout };
}

/** FNV-1a (32-bit), the hash the ring-3 test guests (test/guests/) print over what they read. */
export function fnv1a(bytes: Uint8Array): number {
  let h = 0x811c9dc5;
  for (const b of bytes) h = Math.imul(h ^ b, 0x01000193) >>> 0;
  return h;
}

/** The lines a ring-3 test guest printed, without their "guest: " prefix. */
export function guestSaid(stdout: string): string[] {
  return stdout.split(/\r?\n/).filter((l) => l.startsWith('guest: ')).map((l) => l.slice(7));
}

/**
 * `baseInitrd` (the default image's: skiff-init, busybox) with /bin/vsock-tool (test/guests/vsock-tool.c,
 * the guest half of the vsock tests, built static) and the guest's test script /bin/check appended,
 * written into `dir`. The kernel unpacks concatenated archives; the script is too long for the
 * kernel command line.
 */
export async function initrdWithVsockTool(dir: string, baseInitrd: string, script: string): Promise<string> {
  const bin = path.join(dir, 'vsock-tool');
  await promisify(execFile)('gcc', ['-static', '-O2', '-Wall', '-Werror', path.join(packageRoot(), 'test', 'guests', 'vsock-tool.c'), '-o', bin]);
  const cpio = new CpioWriter();
  cpio.file('bin/vsock-tool', await fs.readFile(bin), { mode: 0o755 });
  cpio.file('bin/check', `${script}\n`, { mode: 0o755 });
  const extra = path.join(dir, 'extra.cpio');
  await cpio.writeTo(extra);
  const out = path.join(dir, 'initrd-vsock.cpio');
  await fs.writeFile(out, Buffer.concat([await fs.readFile(baseInitrd), await fs.readFile(extra)]));
  return out;
}

/**
 * Host → guest over vsock's hybrid model: connect to the VM's `vsock` socket and send "CONNECT
 * port" until the guest's listener is up, then one echo round of `message`. Retries every
 * `retryMs` until `gaveUp()` (the VM ended, say); undefined then.
 */
export async function hostEcho(vsockPath: string, port: number, message: string, gaveUp: () => boolean, retryMs = 100): Promise<string | undefined> {
  while (!gaveUp()) {
    const got = await new Promise<string | undefined>((resolve) => {
      const sock = net.connect(vsockPath);
      let data = '';
      let sent = false;
      sock.setEncoding('utf8');
      sock.on('connect', () => sock.write(`CONNECT ${port}\n`));
      sock.on('data', (d: string) => {
        data += d;
        if (!sent && data.startsWith(`OK ${port}\n`)) {
          sent = true;
          data = data.slice(`OK ${port}\n`.length);
          sock.write(message);
        }
        if (sent && data.length >= message.length) {
          sock.destroy();
          resolve(data);
        }
      });
      sock.on('error', () => resolve(undefined));
      sock.on('close', () => resolve(undefined));
    });
    if (got !== undefined) return got;
    await new Promise((r) => setTimeout(r, retryMs));
  }
  return undefined;
}

/**
 * Guest → host over vsock: a host listener at `socketPath` (`<vm-dir>/vsock_P`) that answers each
 * stream, once the guest shut down writing, with what it sent in upper case. `got` lists what came.
 */
export async function upperCaseListener(socketPath: string): Promise<{ got: string[]; close: () => void }> {
  const got: string[] = [];
  const listener = net.createServer((c) => {
    let data = '';
    c.setEncoding('utf8');
    c.on('data', (d: string) => (data += d));
    c.on('end', () => {
      got.push(data);
      c.end(data.toUpperCase());
    });
  });
  await new Promise<void>((resolve) => listener.listen(socketPath, resolve));
  return { got, close: () => listener.close() };
}

export const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** A recognisable, position-dependent disk pattern: "<tag> <line number>\n" lines cut to `bytes`. */
export function pattern(tag: string, bytes: number): Buffer {
  let s = '';
  for (let i = 0; s.length < bytes; i++) s += `${tag} ${i}\n`;
  return Buffer.from(s.slice(0, bytes));
}

/** The same pattern, made by a guest's busybox shell (one write per line). */
export function guestPattern(tag: string, bytes: number): string {
  return `i=0; while [ $i -lt ${Math.ceil(bytes / 8)} ]; do echo "${tag} $i"; i=$((i+1)); done | head -c ${bytes}`;
}

/** A loopback port nobody listens on right now. */
export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((resolve) => s.close(resolve));
  return port;
}

/**
 * Host → guest through a --publish'ed port: connect to 127.0.0.1:`port`, send `hello`, read one
 * line and then `bytes` more, then send "ack\n" (the guest's server waits for it, so it never
 * powers off holding unsent bytes). Until the guest listens, slirp accepts and then closes the
 * connection (the guest answered its SYN with RST): connect again every `retryMs` until bytes come
 * back or `gaveUp()`. What came back, empty if nothing did.
 */
export async function publishedExchange(port: number, hello: string, bytes: number, gaveUp: () => boolean, retryMs = 200): Promise<Buffer> {
  while (!gaveUp()) {
    const got = await new Promise<Buffer>((resolve) => {
      const sock = net.connect(port, '127.0.0.1');
      const parts: Buffer[] = [];
      let acked = false;
      sock.on('connect', () => sock.write(hello));
      sock.on('data', (d: Buffer) => {
        parts.push(d);
        const all = Buffer.concat(parts);
        const nl = all.indexOf('\n');
        if (!acked && nl >= 0 && all.length >= nl + 1 + bytes) {
          acked = true;
          sock.write('ack\n');
        }
      });
      // A reset after the bytes came keeps them (the caller checks them); a connection that
      // stays silent for a minute is given up on and tried again.
      sock.setTimeout(60_000, () => sock.destroy());
      sock.on('error', () => resolve(Buffer.concat(parts)));
      sock.on('close', () => resolve(Buffer.concat(parts)));
    });
    if (got.length > 0) return got;
    await new Promise((r) => setTimeout(r, retryMs));
  }
  return Buffer.alloc(0);
}

/**
 * The HTTP server on the host's loopback that a guest behind the NAT reaches as 10.0.2.2:`port`:
 * GET /token and GET /blob answer with those bytes; POST /upload answers
 * "uploaded LENGTH SHA256" and records the body's sha256 in `uploads`. Every request is
 * recorded in `requests` ("GET /token").
 */
export async function hostHttpServer(token: string, blob: Buffer): Promise<{ port: number; uploads: string[]; requests: string[]; close: () => void }> {
  const uploads: string[] = [];
  const requests: string[] = [];
  const server = http.createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`);
    if (req.method === 'GET' && req.url === '/token') return res.end(token);
    if (req.method === 'GET' && req.url === '/blob') return res.end(blob);
    if (req.method === 'POST' && req.url === '/upload') {
      const parts: Buffer[] = [];
      req.on('data', (d: Buffer) => parts.push(d));
      req.on('end', () => {
        const body = Buffer.concat(parts);
        uploads.push(sha256(body));
        res.end(`uploaded ${body.length} ${sha256(body)}`);
      });
      return;
    }
    res.statusCode = 404;
    res.end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: (server.address() as net.AddressInfo).port, uploads, requests, close: () => server.close() };
}
