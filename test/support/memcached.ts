import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { appendFileSync, readFileSync } from 'node:fs'
import { connect, createServer } from 'node:net'

/**
 * Real memcached processes on free loopback ports, which tests kill (SIGKILL), freeze (SIGSTOP) and restart
 * empty. Every pid is also appended to the run's pid file, so the global teardown can kill what a crashed
 * worker left behind.
 */
export interface MemcachedServer {
  readonly kind: 'memcached'
  readonly port: number
  readonly pid: number
  /** SIGKILL, as a crash. Resolves when the process is gone. */
  kill(): Promise<void>
  /** SIGSTOP; resolves once the kernel reports the process stopped (signals are delivered asynchronously). */
  freeze(): Promise<void>
  thaw(): void
  /** A new, empty memcached on the same port (after kill). */
  restart(): Promise<void>
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

const running = new Set<ChildProcess>()

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address ? address.port : 0
      server.close(() => resolve(port))
    })
  })
}

export function memcachedBinary(): string {
  try {
    return execFileSync('sh', ['-c', 'command -v memcached'], { encoding: 'utf8' }).trim()
  } catch {
    return ''
  }
}

function spawnMemcached(port: number): ChildProcess {
  const args = ['-l', '127.0.0.1', '-p', String(port), '-U', '0', '-m', '64', '-t', '1', '-c', '1024']
  if (process.getuid?.() === 0) args.push('-u', 'root')
  const child = spawn('memcached', args, { stdio: 'ignore' })
  running.add(child)
  child.once('exit', () => running.delete(child))
  const pidFile = process.env.SF_TEST_PID_FILE
  if (pidFile && child.pid) appendFileSync(pidFile, `${child.pid}\n`)
  return child
}

async function waitUntilListening(port: number, child: ChildProcess): Promise<void> {
  const deadline = Date.now() + 5000
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`memcached on port ${port} exited with ${child.exitCode}`)
    const ok = await new Promise<boolean>((resolve) => {
      const socket = connect(port, '127.0.0.1')
      socket.once('connect', () => {
        socket.destroy()
        resolve(true)
      })
      socket.once('error', () => resolve(false))
    })
    if (ok) return
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  throw new Error(`memcached on port ${port} did not start within 5 s`)
}

/** Polls /proc/<pid>/stat until the process is in `state` (e.g. 'T' for stopped). */
async function waitForState(child: ChildProcess, state: string): Promise<void> {
  const deadline = Date.now() + 5000
  while (Date.now() < deadline) {
    const stat = readFileSync(`/proc/${child.pid}/stat`, 'utf8')
    // The state follows the command name, which is in parentheses.
    if (stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === state) return
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
  throw new Error(`memcached pid ${child.pid} did not reach state ${state}`)
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
  return new Promise((resolve) => child.once('exit', () => resolve()))
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

export async function startMemcached(): Promise<MemcachedServer> {
  const port = await freePort()
  let child = spawnMemcached(port)
  await waitUntilListening(port, child)
  const server: MemcachedServer = {
    kind: 'memcached',
    port,
    get pid() {
      return child.pid ?? -1
    },
    async kill() {
      child.kill('SIGKILL')
      await exited(child)
    },
    async freeze() {
      child.kill('SIGSTOP')
      await waitForState(child, 'T')
    },
    thaw() {
      child.kill('SIGCONT')
    },
    async restart() {
      child.kill('SIGKILL')
      await exited(child)
      child = spawnMemcached(port)
      await waitUntilListening(port, child)
    },
    async stats() {
      const reply = await ask(port, 'stats\r\n', /END\r\n$/)
      const stats: Record<string, number> = {}
      for (const line of reply.split('\r\n')) {
        const [tag, name, value] = line.split(' ')
        if (tag === 'STAT' && name && value !== undefined) stats[name] = Number(value)
      }
      return stats
    },
    async has(key: string) {
      const reply = await ask(port, `get ${key}\r\n`, /END\r\n$/)
      return reply.startsWith('VALUE ')
    },
    async get(key: string) {
      const reply = await ask(port, `get ${key}\r\n`, /END\r\n$/)
      const header = /^VALUE \S+ \d+ (\d+)\r\n/.exec(reply)
      if (!header) return null
      const start = header[0].length
      return Buffer.from(reply.slice(start, start + Number(header[1])), 'latin1')
    },
    async ttl(key: string) {
      const reply = await ask(port, `mg ${key} t\r\n`, /\r\n$/)
      const match = /^HD t(-?\d+)/.exec(reply)
      return match ? Number(match[1]) : null
    },
    async writes() {
      const stats = await server.stats()
      return (
        (stats.cmd_set ?? 0) + (stats.cmd_touch ?? 0) + (stats.delete_hits ?? 0) + (stats.delete_misses ?? 0)
      )
    },
    async put(key: string, value: Buffer) {
      const header = Buffer.from(`set ${key} 0 0 ${value.length}\r\n`)
      await ask(port, Buffer.concat([header, value, Buffer.from('\r\n')]), /\r\n$/)
    },
  }
  return server
}

/** Starts `count` servers; the list is in node order n1, n2, ... */
export async function startCluster(count: number): Promise<MemcachedServer[]> {
  return Promise.all(Array.from({ length: count }, () => startMemcached()))
}

export function nodesOption(servers: readonly MemcachedServer[]): string {
  return servers.map((server, index) => `n${index + 1}:127.0.0.1:${server.port}`).join(' ')
}

/** Kills every memcached this process started; thaws first so SIGKILL is not left pending on a stopped one. */
export async function stopAllMemcached(): Promise<void> {
  const children = [...running]
  for (const child of children) {
    child.kill('SIGCONT')
    child.kill('SIGKILL')
  }
  await Promise.all(children.map(exited))
}
