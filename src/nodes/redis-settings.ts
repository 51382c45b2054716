import { isIP } from 'node:net'
import type { ClusterOptions, RedisOptions } from 'ioredis'

export interface RedisNodeConfig {
  readonly id: string
  /** `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS. */
  readonly url?: string
  /** The seed URLs of a Redis Cluster, which counts as one node. */
  readonly cluster?: readonly string[]
  /**
   * Sentinels (`redis://[user:password@]host:port`, credentials for the sentinels) watching the master `name`,
   * which counts as one node; `masterUrl` credentials, TLS and database apply to the master.
   */
  readonly sentinel?: {
    readonly sentinels: readonly string[]
    readonly name: string
    readonly masterUrl?: string
  }
  readonly operationTimeoutMs: number
  readonly probeKey: string
}

/** What to construct: a Cluster from its seeds, or one Redis (a server, or a master found through Sentinel). */
export type RedisClientSettings =
  | {
      readonly kind: 'cluster'
      readonly seeds: { host: string; port: number }[]
      readonly options: ClusterOptions
    }
  | { readonly kind: 'redis'; readonly options: RedisOptions }

/** A READONLY reply, bare or wrapped by Redis before 7 when raised inside a script. */
const READONLY_REPLY = /^(?:READONLY\b|ERR Error running script\b.*?-READONLY\b)/

const backoff = (attempt: number): number => Math.min(10 * attempt, 500)

/**
 * The ioredis options of a node, built from our own reading of its URLs: ioredis would read a URL's query string
 * as options that override these (the options refuse one at start-up; this keeps it so for any caller).
 */
export function redisClientSettings(config: RedisNodeConfig): RedisClientSettings {
  const timeoutMs = config.operationTimeoutMs
  const connection: RedisOptions = {
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    // A command in flight when a connection dropped must not run again on the next one (a late, stale write).
    autoResendUnfulfilledCommands: false,
    connectTimeout: timeoutMs,
    // Our own timeout (RedisNode) decides for every command we send: it waits, after a stall of this process's
    // loop, until the loop has read what came in time; this one fires in the timers phase, and would fail a
    // command already answered, so it comes later. It bounds what runs before the connection is ready (AUTH, the
    // ready check) on a server that froze.
    commandTimeout: 2 * timeoutMs,
    retryStrategy: backoff,
    // A server turned replica behind the same address (a DNS name or virtual IP moved by a failover) keeps our
    // connection, and so the node dead, until it is made again. Reconnect only; a resend (2) would be a retry.
    reconnectOnError: (error: Error) => READONLY_REPLY.test(error.message),
  }
  if (config.cluster) {
    return {
      kind: 'cluster',
      // Hosts and ports only: the first URL's credentials, TLS and database apply to every member.
      seeds: config.cluster.map((url) => endpoint(url, 6379)),
      options: {
        enableOfflineQueue: false,
        clusterRetryStrategy: backoff,
        // Its own retries would run a write after we gave up on it (a stale write landing late).
        retryDelayOnClusterDown: 0,
        retryDelayOnFailover: 0,
        retryDelayOnTryAgain: 0,
        slotsRefreshTimeout: timeoutMs,
        // Nodes found through the slot map get only these: credentials and TLS must be here, not just in the URLs.
        redisOptions: { ...connection, ...connectionSettings(config.cluster[0] ?? '') },
      },
    }
  }
  if (config.sentinel) {
    const { sentinels, name, masterUrl } = config.sentinel
    const sentinel = connectionSettings(sentinels[0] ?? '')
    const master = masterUrl ? connectionSettings(masterUrl) : {}
    // Sentinel names the master by address; the certificate is checked against masterUrl's host instead (an IP
    // there is checked as given: Node takes no IP as a TLS server name).
    const host = masterUrl ? endpoint(masterUrl, 6379).host : ''
    if (master.tls && host && isIP(host) === 0) master.tls = { servername: host }
    return {
      kind: 'redis',
      options: {
        ...connection,
        ...master,
        name,
        sentinels: sentinels.map((url) => endpoint(url, 26379)),
        sentinelUsername: sentinel.username,
        sentinelPassword: sentinel.password,
        sentinelTLS: sentinel.tls,
        // ioredis uses `tls` for the master only with this set: it must follow masterUrl, not the sentinels'
        // scheme, or a rediss:// master behind plain sentinels gets its password in cleartext.
        enableTLSForSentinelMode: master.tls !== undefined,
        // A frozen sentinel would hold the master lookup forever; past this the next sentinel is asked.
        sentinelCommandTimeout: timeoutMs,
        sentinelRetryStrategy: backoff,
      },
    }
  }
  const url = config.url ?? ''
  return { kind: 'redis', options: { ...endpoint(url, 6379), ...connectionSettings(url), ...connection } }
}

/** Never put a password in a log line or in health output: protocol, host and path only. */
export function withoutCredentials(url: string): string {
  try {
    const parsed = new URL(url)
    return `${parsed.protocol}//${parsed.host}${parsed.pathname === '/' ? '' : parsed.pathname}`
  } catch {
    return 'redis (unparsable address)'
  }
}

function endpoint(url: string, defaultPort: number): { host: string; port: number } {
  const parsed = new URL(url)
  return { host: parsed.hostname.replace(/^\[|\]$/g, ''), port: Number(parsed.port || defaultPort) }
}

/** Credentials, TLS, database and address family of a redis:// or rediss:// URL, as ioredis options. */
function connectionSettings(url: string): {
  username?: string
  password?: string
  tls?: object
  db?: number
  family?: number
} {
  const parsed = new URL(url)
  const settings: { username?: string; password?: string; tls?: object; db?: number; family?: number } = {}
  if (parsed.username) settings.username = decodeURIComponent(parsed.username)
  if (parsed.password) settings.password = decodeURIComponent(parsed.password)
  if (parsed.protocol === 'rediss:') settings.tls = {}
  const db = Number(parsed.pathname.slice(1))
  if (parsed.pathname.length > 1 && Number.isInteger(db)) settings.db = db
  // The only query parameter the options let through (0, 4 or 6): how the host name resolves.
  const family = parsed.searchParams.get('family')
  if (family !== null) settings.family = Number(family)
  return settings
}
