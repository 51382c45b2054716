import { type MemcachedServer, startMemcached, stopAllMemcached } from './memcached.js'
import { type RedisServer, startRedis, stopAllRedis } from './redis.js'

/** A cache server the tests start, kill, freeze and inspect, whatever its kind. */
export type CacheServer = MemcachedServer | RedisServer

/** The rings the behavioural suites run on: memcached only, Redis only, and both mixed in one ring. */
export const backends = ['memcached', 'redis', 'mixed'] as const
export type Backend = (typeof backends)[number]

/** `count` servers in node order n1, n2, ...; a mixed ring alternates memcached and Redis. */
export function startBackend(backend: Backend, count: number): Promise<CacheServer[]> {
  return Promise.all(
    Array.from({ length: count }, (_, index) =>
      backend === 'redis' || (backend === 'mixed' && index % 2 === 1) ? startRedis() : startMemcached(),
    ),
  )
}

export function nodesFor(servers: readonly CacheServer[]): string {
  return servers
    .map((server, index) =>
      server.kind === 'redis'
        ? `n${index + 1}:redis://127.0.0.1:${server.port}`
        : `n${index + 1}:127.0.0.1:${server.port}`,
    )
    .join(' ')
}

export async function stopAllServers(): Promise<void> {
  await Promise.all([stopAllMemcached(), stopAllRedis()])
}
