import { execFileSync, spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { connect, createServer, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { freePort, installed, type ServerProcess, startServerProcess, stopAll } from './process.js'

/** A real redis-server on a free loopback port, killed, frozen and restarted empty like the memcached ones. */
export interface RedisServer extends ServerProcess {
  readonly kind: 'redis'
  has(key: string): Promise<boolean>
  get(key: string): Promise<Buffer | null>
  put(key: string, value: Buffer): Promise<void>
  /** Write commands served so far (SET, DEL, PEXPIRE, scripts). */
  writes(): Promise<number>
}

const tempDirs = new Set<string>()

export function redisBinary(): string {
  return installed('redis-server')
}

function spawnRedis(port: number, extra: readonly string[] = [], cwd?: string) {
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...extra]
  return spawn('redis-server', args, { stdio: 'ignore', cwd })
}

/** CLUSTER INFO of one cluster node. */
export function clusterInfo(port: number): Promise<string> {
  return command(port, async (client) => String(await client.cluster('INFO')))
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
  const server = await startServerProcess('redis', (port) => spawnRedis(port, extra, cwd))
  const { port } = server
  return Object.assign(server, {
    kind: 'redis' as const,
    has: (key: string) => command(port, async (client) => (await client.exists(key)) === 1),
    get: (key: string) => command(port, (client) => client.getBuffer(key)),
    put: (key: string, value: Buffer) => command(port, async (client) => void (await client.set(key, value))),
    writes: () =>
      command(port, async (client) => {
        const info = await client.info('commandstats')
        let total = 0
        for (const match of info.matchAll(/cmdstat_(set|del|pexpire|evalsha|eval):calls=(\d+)/g)) {
          total += Number(match[2])
        }
        return total
      }),
  })
}

export async function stopAllRedis(): Promise<void> {
  await stopAll('redis')
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true })
  tempDirs.clear()
}

/**
 * A Redis Cluster of `masters` masters (no replicas) on free ports, created with redis-cli, ready when every
 * master reports cluster_state:ok. Its files live in a temporary directory.
 */
export async function startRedisCluster(
  masters: number,
): Promise<{ servers: RedisServer[]; urls: string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'sf-redis-cluster-'))
  tempDirs.add(dir)
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
    while (!(await clusterInfo(server.port)).includes('cluster_state:ok')) {
      if (Date.now() > deadline) throw new Error('the Redis Cluster did not become ready within 15 s')
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  return { servers, urls: servers.map((s) => `redis://127.0.0.1:${s.port}`) }
}

/**
 * A master with one replica, watched by `sentinelCount` sentinels (quorum 1, down after 1 s), for Sentinel-managed
 * nodes. Resolves once the replica is in sync. The sentinels can be frozen and killed like the servers.
 */
export async function startRedisSentinel(
  name: string,
  sentinelCount = 1,
): Promise<{
  master: RedisServer
  replica: RedisServer
  sentinelUrl: string
  sentinels: ServerProcess[]
  sentinelUrls: string[]
}> {
  const dir = mkdtempSync(join(tmpdir(), 'sf-redis-sentinel-'))
  tempDirs.add(dir)
  // Diskless sync without its default 5 s wait for more replicas to join: the replica is in sync at once.
  const master = await startRedis(['--repl-diskless-sync-delay', '0'], dir)
  const replica = await startRedis(['--replicaof', '127.0.0.1', String(master.port)], dir)
  const deadline = Date.now() + 15_000
  while (
    !(await command(replica.port, (client) => client.info('replication'))).includes('master_link_status:up')
  ) {
    if (Date.now() > deadline) throw new Error('the replica did not sync within 15 s')
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  const sentinels = await Promise.all(
    Array.from({ length: sentinelCount }, () =>
      startServerProcess('redis', (port) => {
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
        return spawn('redis-server', [conf, '--sentinel'], { stdio: 'ignore', cwd: dir })
      }),
    ),
  )
  const sentinelUrls = sentinels.map((sentinel) => `redis://127.0.0.1:${sentinel.port}`)
  return { master, replica, sentinelUrl: sentinelUrls[0] as string, sentinels, sentinelUrls }
}

/**
 * A loopback address whose server can be changed, as a DNS name or a virtual IP that a managed failover moves to
 * the new master: connections made after moveTo() reach the new server, those already open stay with the old one.
 * It only forwards bytes between the client and a real redis-server.
 */
export async function startMovableAddress(
  targetPort: number,
): Promise<{ port: number; moveTo(port: number): void; close(): Promise<void> }> {
  let target = targetPort
  const sockets = new Set<Socket>()
  const keep = (socket: Socket) => {
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
    socket.on('error', () => {})
  }
  const server = createServer((client) => {
    keep(client)
    const upstream = connect(target, '127.0.0.1')
    keep(upstream)
    client.pipe(upstream).pipe(client)
    client.once('close', () => upstream.destroy())
    upstream.once('close', () => client.destroy())
  })
  const port = await freePort()
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve))
  return {
    port,
    moveTo(port: number) {
      target = port
    },
    close() {
      for (const socket of sockets) socket.destroy()
      return new Promise<void>((resolve) => server.close(() => resolve()))
    },
  }
}
