import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { appendFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { freePort } from './memcached.js'

/** A real redis-server on a free loopback port, killed, frozen and restarted empty like the memcached ones. */
export interface RedisServer {
  readonly kind: 'redis'
  readonly port: number
  readonly pid: number
  kill(): Promise<void>
  freeze(): Promise<void>
  thaw(): void
  restart(): Promise<void>
  has(key: string): Promise<boolean>
  get(key: string): Promise<Buffer | null>
  put(key: string, value: Buffer): Promise<void>
  /** Write commands served so far (SET, DEL, PEXPIRE, scripts). */
  writes(): Promise<number>
}

const running = new Set<ChildProcess>()
const clusterDirs = new Set<string>()

export function redisBinary(): string {
  try {
    return execFileSync('sh', ['-c', 'command -v redis-server'], { encoding: 'utf8' }).trim()
  } catch {
    return ''
  }
}

function spawnRedis(port: number, extra: readonly string[] = [], cwd?: string): ChildProcess {
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...extra]
  const child = spawn('redis-server', args, { stdio: 'ignore', cwd })
  running.add(child)
  child.once('exit', () => running.delete(child))
  const pidFile = process.env.SF_TEST_PID_FILE
  if (pidFile && child.pid) appendFileSync(pidFile, `${child.pid}\n`)
  return child
}

async function waitUntilListening(port: number, child: ChildProcess): Promise<void> {
  const deadline = Date.now() + 5000
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`redis-server on port ${port} exited with ${child.exitCode}`)
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
  throw new Error(`redis-server on port ${port} did not start within 5 s`)
}

const exited = (child: ChildProcess) =>
  child.exitCode !== null || child.signalCode !== null
    ? Promise.resolve()
    : new Promise<void>((resolve) => child.once('exit', () => resolve()))

async function stateOf(child: ChildProcess, state: string): Promise<void> {
  const deadline = Date.now() + 5000
  while (Date.now() < deadline) {
    const stat = readFileSync(`/proc/${child.pid}/stat`, 'utf8')
    if (stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === state) return
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
  throw new Error(`redis-server pid ${child.pid} did not reach state ${state}`)
}

/** One command through a short-lived real client. */
async function command<T>(port: number, run: (client: Redis) => Promise<T>): Promise<T> {
  const client = new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0 })
  client.on('error', () => {})
  try {
    await client.connect()
    return await run(client)
  } finally {
    client.disconnect()
  }
}

export async function startRedis(extra: readonly string[] = [], cwd?: string): Promise<RedisServer> {
  const port = await freePort()
  let child = spawnRedis(port, extra, cwd)
  await waitUntilListening(port, child)
  return {
    kind: 'redis',
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
      await stateOf(child, 'T')
    },
    thaw() {
      child.kill('SIGCONT')
    },
    async restart() {
      child.kill('SIGKILL')
      await exited(child)
      child = spawnRedis(port, extra, cwd)
      await waitUntilListening(port, child)
    },
    has: (key) => command(port, async (client) => (await client.exists(key)) === 1),
    get: (key) => command(port, (client) => client.getBuffer(key)),
    put: (key, value) => command(port, async (client) => void (await client.set(key, value))),
    writes: () =>
      command(port, async (client) => {
        const info = await client.info('commandstats')
        let total = 0
        for (const match of info.matchAll(/cmdstat_(set|del|pexpire|evalsha|eval):calls=(\d+)/g)) {
          total += Number(match[2])
        }
        return total
      }),
  }
}

export async function stopAllRedis(): Promise<void> {
  const children = [...running]
  for (const child of children) {
    child.kill('SIGCONT')
    child.kill('SIGKILL')
  }
  await Promise.all(children.map(exited))
  for (const dir of clusterDirs) rmSync(dir, { recursive: true, force: true })
  clusterDirs.clear()
}

/**
 * A Redis Cluster of `masters` masters (no replicas) on free ports, created with redis-cli, ready when every
 * master reports cluster_state:ok. Its files live in a temporary directory.
 */
export async function startRedisCluster(
  masters: number,
): Promise<{ servers: RedisServer[]; urls: string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'sf-redis-cluster-'))
  clusterDirs.add(dir)
  const extra = ['--cluster-enabled', 'yes', '--cluster-node-timeout', '1000']
  const servers = await Promise.all(
    Array.from({ length: masters }, () =>
      startRedis([...extra, '--cluster-config-file', `nodes-${randomUUID()}.conf`], dir),
    ),
  )
  execFileSync(
    'redis-cli',
    [
      '--cluster',
      'create',
      ...servers.map((s) => `127.0.0.1:${s.port}`),
      '--cluster-replicas',
      '0',
      '--cluster-yes',
    ],
    { stdio: 'ignore', timeout: 30_000 },
  )
  const deadline = Date.now() + 15_000
  for (const server of servers) {
    while (!(await command(server.port, (client) => client.cluster('INFO'))).includes('cluster_state:ok')) {
      if (Date.now() > deadline) throw new Error('the Redis Cluster did not become ready within 15 s')
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  return { servers, urls: servers.map((s) => `redis://127.0.0.1:${s.port}`) }
}

/**
 * A master with one replica, watched by one sentinel (quorum 1, down after 1 s), for Sentinel-managed nodes.
 * Resolves once the replica is in sync.
 */
export async function startRedisSentinel(
  name: string,
): Promise<{ master: RedisServer; replica: RedisServer; sentinelUrl: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'sf-redis-sentinel-'))
  clusterDirs.add(dir)
  const master = await startRedis([], dir)
  const replica = await startRedis(['--replicaof', '127.0.0.1', String(master.port)], dir)
  const deadline = Date.now() + 15_000
  while (
    !(await command(replica.port, (client) => client.info('replication'))).includes('master_link_status:up')
  ) {
    if (Date.now() > deadline) throw new Error('the replica did not sync within 15 s')
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  const port = await freePort()
  const conf = join(dir, `sentinel-${port}.conf`)
  writeFileSync(
    conf,
    [
      `port ${port}`,
      'bind 127.0.0.1',
      `sentinel monitor ${name} 127.0.0.1 ${master.port} 1`,
      `sentinel down-after-milliseconds ${name} 1000`,
      `sentinel failover-timeout ${name} 5000`,
      '',
    ].join('\n'),
  )
  const sentinel = spawn('redis-server', [conf, '--sentinel'], { stdio: 'ignore', cwd: dir })
  running.add(sentinel)
  sentinel.once('exit', () => running.delete(sentinel))
  const pidFile = process.env.SF_TEST_PID_FILE
  if (pidFile && sentinel.pid) appendFileSync(pidFile, `${sentinel.pid}\n`)
  await waitUntilListening(port, sentinel)
  return { master, replica, sentinelUrl: `redis://127.0.0.1:${port}` }
}
