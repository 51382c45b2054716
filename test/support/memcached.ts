import { execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { freePort, installed, type ServerProcess, startServerProcess, stopAll } from './process.js'

export { freePort }

/** A real memcached on a free loopback port, which tests kill (SIGKILL), freeze (SIGSTOP) and restart empty. */
export interface MemcachedServer extends ServerProcess {
  readonly kind: 'memcached'
  /** The server's `stats` counters. */
  stats(): Promise<Record<string, number>>
  /** True when `key` is stored. */
  has(key: string): Promise<boolean>
  /** The bytes stored under `key`, or null. */
  get(key: string): Promise<Buffer | null>
  /** Seconds until `key` expires (memcached meta command), or null when it is absent. */
  ttl(key: string): Promise<number | null>
  /** Stores raw bytes under `key`, bypassing the library. */
  put(key: string, value: Buffer): Promise<void>
  /** Write commands served so far (set, add, cas, touch, delete). */
  writes(): Promise<number>
}

export function memcachedBinary(): string {
  return installed('memcached')
}

function spawnMemcached(port: number, extraArgs: readonly string[] = []) {
  const args = [
    '-l',
    '127.0.0.1',
    '-p',
    String(port),
    '-U',
    '0',
    '-m',
    '64',
    '-t',
    '1',
    '-c',
    '1024',
    ...extraArgs,
  ]
  if (process.getuid?.() === 0) args.push('-u', 'root')
  return spawn('memcached', args, { stdio: 'ignore' })
}

/** One text-protocol exchange with memcached; reads until `terminator` ends the reply. */
function ask(port: number, command: Buffer | string, terminator: RegExp): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1')
    let reply = ''
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error(`memcached on ${port} did not answer`))
    }, 2000)
    socket.on('data', (chunk) => {
      reply += chunk.toString('latin1')
      if (terminator.test(reply)) {
        clearTimeout(timer)
        socket.end()
        resolve(reply)
      }
    })
    socket.once('error', (error) => {
      clearTimeout(timer)
      reject(error)
    })
    socket.write(command)
  })
}

/** `extraArgs`: more memcached options, e.g. ['-C'] (no compare-and-set). */
export async function startMemcached(extraArgs: readonly string[] = []): Promise<MemcachedServer> {
  const server = await startServerProcess('memcached', (port) => spawnMemcached(port, extraArgs))
  const { port } = server
  const stats = async () => {
    const reply = await ask(port, 'stats\r\n', /END\r\n$/)
    const counters: Record<string, number> = {}
    for (const line of reply.split('\r\n')) {
      const [tag, name, value] = line.split(' ')
      if (tag === 'STAT' && name && value !== undefined) counters[name] = Number(value)
    }
    return counters
  }
  return Object.assign(server, {
    kind: 'memcached' as const,
    stats,
    async has(key: string) {
      return (await ask(port, `get ${key}\r\n`, /END\r\n$/)).startsWith('VALUE ')
    },
    async get(key: string) {
      const reply = await ask(port, `get ${key}\r\n`, /END\r\n$/)
      const header = /^VALUE \S+ \d+ (\d+)\r\n/.exec(reply)
      if (!header) return null
      const start = header[0].length
      return Buffer.from(reply.slice(start, start + Number(header[1])), 'latin1')
    },
    async ttl(key: string) {
      const match = /^HD t(-?\d+)/.exec(await ask(port, `mg ${key} t\r\n`, /\r\n$/))
      return match ? Number(match[1]) : null
    },
    async put(key: string, value: Buffer) {
      const header = Buffer.from(`set ${key} 0 0 ${value.length}\r\n`)
      await ask(port, Buffer.concat([header, value, Buffer.from('\r\n')]), /\r\n$/)
    },
    async writes() {
      const counters = await stats()
      return (
        (counters.cmd_set ?? 0) +
        (counters.cmd_touch ?? 0) +
        (counters.delete_hits ?? 0) +
        (counters.delete_misses ?? 0)
      )
    },
  })
}

/**
 * A memcached that requires SASL PLAIN authentication (binary protocol only), with one user in a Cyrus sasldb
 * made by Debian's saslpasswd2 (Debian's memcached reads no plain password file). Only the library talks to it.
 */
export async function startSaslMemcached(username: string, password: string): Promise<ServerProcess> {
  const dir = mkdtempSync(join(tmpdir(), 'sf-sasl-'))
  const sasldb = join(dir, 'sasldb2')
  execFileSync('saslpasswd2', ['-p', '-a', 'memcached', '-c', '-f', sasldb, username], { input: password })
  writeFileSync(join(dir, 'memcached.conf'), `mech_list: plain\nsasldb_path: ${sasldb}\n`)
  return startServerProcess('memcached', (port) => {
    const args = ['-S', '-l', '127.0.0.1', '-p', String(port), '-U', '0', '-m', '16', '-t', '1']
    if (process.getuid?.() === 0) args.push('-u', 'root')
    return spawn('memcached', args, { stdio: 'ignore', env: { ...process.env, SASL_CONF_PATH: dir } })
  })
}

/** Starts `count` servers; the list is in node order n1, n2, ... */
export async function startCluster(count: number): Promise<MemcachedServer[]> {
  return Promise.all(Array.from({ length: count }, () => startMemcached()))
}

export function nodesOption(servers: readonly MemcachedServer[]): string {
  return servers.map((server, index) => `n${index + 1}:127.0.0.1:${server.port}`).join(' ')
}

export function stopAllMemcached(): Promise<void> {
  return stopAll('memcached')
}
