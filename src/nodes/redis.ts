import { Cluster, Redis, type RedisOptions, ReplyError } from 'ioredis'
import { NodeOperationError, NodeRejectedError } from '../errors.js'
import type { CasOutcome, CasToken, OwnedToken, SessionNode } from './node.js'
import { withTimeout } from './timeout.js'

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

/** Compare-and-set on a value: 0 missing, 1 changed since it was read, 2 stored. */
const COMPARE_AND_SET = `
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if current ~= ARGV[1] then return 1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 2`

/** Compare-and-delete: 0 missing, 1 changed since it was read, 2 deleted. */
const COMPARE_AND_DELETE = `
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if current ~= ARGV[1] then return 1 end
redis.call('DEL', KEYS[1])
return 2`

const OUTCOMES: readonly CasOutcome[] = ['missing', 'conflict', 'stored']

/**
 * Error codes that mean the server cannot serve now (the node is down for us), not that it refused the command:
 * a replica (READONLY), a master short of the replicas it must write to (NOREPLICAS), no memory (OOM), a failed
 * snapshot (MISCONF), a cluster or a sentinel-managed master in transition, credentials refused.
 */
const UNAVAILABLE_CODES =
  'CLUSTERDOWN|TRYAGAIN|LOADING|MASTERDOWN|READONLY|NOREPLICAS|BUSY|MOVED|ASK|NOAUTH|WRONGPASS|NOPERM|OOM|MISCONF'
/**
 * A reply with one of those codes. Before Redis 7 an error inside a script (our compare-and-set) came back
 * wrapped: "ERR Error running script (call to f_…): @user_script:1: -OOM command not allowed …".
 */
const UNAVAILABLE_REPLY = new RegExp(
  `^(?:(?:${UNAVAILABLE_CODES})\\b|ERR Error running script\\b.*?-(?:${UNAVAILABLE_CODES})\\b)`,
)

/** True for a reply that marks the node down rather than refusing this one command. */
export function isUnavailableReply(message: string): boolean {
  return UNAVAILABLE_REPLY.test(message)
}

type ScriptedClient = (Redis | Cluster) & {
  compareAndSet(key: string, expected: Buffer, value: Buffer, ttlMs: number): Promise<number>
  compareAndDelete(key: string, expected: Buffer): Promise<number>
}

/**
 * One ioredis client (or Cluster) as one node. Redis's own primitives stand in for memcached's: SET PX for
 * expiry, SET NX PX for add, PEXPIRE for touch, and Lua scripts for compare-and-set and compare-and-delete,
 * where the compare-and-set token is the value read.
 *
 * ioredis would queue commands while disconnected and retry them without end, so a request could wait on a
 * dead server and a stale write could run long after it was given up on. The offline queue is off (a command on
 * a down server fails at once) and no command is retried; ioredis keeps reconnecting in the background, and
 * the ring's probe notices when the server is back.
 */
export class RedisNode implements SessionNode {
  readonly id: string
  readonly address: string
  /** One connection to one server, except a cluster's: its keys live on several shards, each on its own. */
  readonly ordered: boolean
  readonly #client: ScriptedClient
  readonly #timeoutMs: number
  readonly #probeKey: string
  #closed = false
  /** Commands waiting for the connection; one 'ready' listener wakes them, a timed-out one removes itself. */
  readonly #waiting = new Set<() => void>()

  constructor(config: RedisNodeConfig) {
    this.id = config.id
    this.#timeoutMs = config.operationTimeoutMs
    this.#probeKey = config.probeKey
    this.ordered = !config.cluster
    const options: RedisOptions = {
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      connectTimeout: config.operationTimeoutMs,
      commandTimeout: config.operationTimeoutMs,
      retryStrategy: (attempt: number) => Math.min(10 * attempt, 500),
    }
    if (config.cluster) {
      this.address = `redis cluster ${config.cluster.map(withoutCredentials).join(',')}`
      this.#client = new Cluster([...config.cluster], {
        enableOfflineQueue: false,
        clusterRetryStrategy: (attempt: number) => Math.min(10 * attempt, 500),
        // Its own retries would run a write after we gave up on it (a stale write landing late).
        retryDelayOnClusterDown: 0,
        retryDelayOnFailover: 0,
        retryDelayOnTryAgain: 0,
        slotsRefreshTimeout: config.operationTimeoutMs,
        // Nodes found through the slot map get only these: credentials and TLS must be here, not just in the URLs.
        redisOptions: { ...options, ...connectionSettings(config.cluster[0] ?? '') },
      }) as ScriptedClient
    } else if (config.sentinel) {
      const { sentinels, name, masterUrl } = config.sentinel
      this.address = `redis sentinel ${name} via ${sentinels.map(withoutCredentials).join(',')}`
      const sentinel = connectionSettings(sentinels[0] ?? '')
      this.#client = new Redis({
        ...options,
        ...(masterUrl ? connectionSettings(masterUrl) : {}),
        name,
        sentinels: sentinels.map((url) => {
          const parsed = new URL(url)
          return { host: parsed.hostname.replace(/^\[|\]$/g, ''), port: Number(parsed.port || 26379) }
        }),
        sentinelUsername: sentinel.username,
        sentinelPassword: sentinel.password,
        ...(sentinel.tls ? { sentinelTLS: sentinel.tls, enableTLSForSentinelMode: true } : {}),
        sentinelRetryStrategy: (attempt: number) => Math.min(10 * attempt, 500),
      }) as ScriptedClient
    } else {
      const url = config.url ?? ''
      this.address = `redis ${withoutCredentials(url)}`
      this.#client = new Redis(url, options) as ScriptedClient
    }
    this.#client.defineCommand('compareAndSet', { numberOfKeys: 1, lua: COMPARE_AND_SET })
    this.#client.defineCommand('compareAndDelete', { numberOfKeys: 1, lua: COMPARE_AND_DELETE })
    // ioredis reports connection trouble as 'error' events; the ring learns of it from failed commands.
    this.#client.on('error', () => {})
    this.#client.on('ready', () => {
      for (const wake of this.#waiting) wake()
      this.#waiting.clear()
    })
  }

  get(key: string): Promise<Buffer | null> {
    return this.#run('get', () => this.#client.getBuffer(key))
  }

  async set(key: string, value: Buffer, ttlSeconds: number): Promise<void> {
    await this.#run('set', () => this.#client.set(key, value, 'PX', toMs(ttlSeconds)))
  }

  async add(key: string, value: Buffer, ttlSeconds: number): Promise<boolean> {
    return (await this.#run('add', () => this.#client.set(key, value, 'PX', toMs(ttlSeconds), 'NX'))) === 'OK'
  }

  /** The token is the value itself: compare-and-delete compares values, in one script. */
  async addOwned(key: string, value: Buffer, ttlSeconds: number): Promise<OwnedToken | null> {
    return (await this.add(key, value, ttlSeconds)) ? (value as unknown as OwnedToken) : null
  }

  async deleteOwned(key: string, token: OwnedToken): Promise<void> {
    await this.deleteIfUnchanged(key, token as unknown as CasToken)
  }

  async delete(key: string): Promise<boolean> {
    return (await this.#run('delete', () => this.#client.del(key))) > 0
  }

  async touch(key: string, ttlSeconds: number): Promise<boolean> {
    return (await this.#run('touch', () => this.#client.pexpire(key, toMs(ttlSeconds)))) === 1
  }

  async gets(key: string): Promise<{ value: Buffer; cas: CasToken } | null> {
    const value = await this.get(key)
    return value ? { value, cas: value as unknown as CasToken } : null
  }

  async setIfUnchanged(key: string, value: Buffer, ttlSeconds: number, cas: CasToken): Promise<CasOutcome> {
    const code = await this.#run('cas', () =>
      this.#client.compareAndSet(key, cas as unknown as Buffer, value, toMs(ttlSeconds)),
    )
    return OUTCOMES[code] ?? 'conflict'
  }

  async deleteIfUnchanged(key: string, cas: CasToken): Promise<CasOutcome> {
    const code = await this.#run('cas delete', () =>
      this.#client.compareAndDelete(key, cas as unknown as Buffer),
    )
    return OUTCOMES[code] ?? 'conflict'
  }

  /**
   * A write, not a read: a server that can be read but not written (a replica, or a master short of memory or of
   * replicas) is down for sessions, and a read would bring it back at every probe, for its next write to fail.
   */
  async ping(): Promise<void> {
    await this.#run('ping', () => this.#client.set(this.#probeKey, '1', 'PX', this.#timeoutMs))
  }

  async close(): Promise<void> {
    this.#closed = true
    this.#client.disconnect()
  }

  #run<T>(operation: string, start: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new NodeOperationError(`${this.address} is closed`))
    // While (re)connecting, a command waits for the connection, within the timeout: a server that just restarted
    // is back in milliseconds. A command whose request gave up is dropped; it must not run (a stale write)
    // whenever the server comes back.
    let abandoned = false
    let wake: (() => void) | undefined
    const begin =
      this.#client.status === 'ready'
        ? start()
        : new Promise<void>((resolve) => {
            wake = resolve
            this.#waiting.add(resolve)
          }).then(() => {
            if (abandoned) throw new Error('abandoned before the connection was ready')
            return start()
          })
    const pending = begin.catch((cause: unknown) => {
      const message = `${this.address} failed ${operation}: ${cause instanceof Error ? cause.message : String(cause)}`
      if (cause instanceof ReplyError && !isUnavailableReply((cause as Error).message)) {
        throw new NodeRejectedError(message, { cause })
      }
      throw new NodeOperationError(message, { cause })
    })
    return withTimeout(
      pending,
      this.#timeoutMs,
      () => `${this.address} (${operation})`,
      () => {
        abandoned = true
        if (wake) this.#waiting.delete(wake)
      },
    )
  }
}

/** Redis takes milliseconds; a session's TTL is whole seconds. */
function toMs(ttlSeconds: number): number {
  return Math.max(1, Math.ceil(ttlSeconds)) * 1000
}

/** Never put a password in a log line or in health output: protocol, host and path only. */
function withoutCredentials(url: string): string {
  try {
    const parsed = new URL(url)
    return `${parsed.protocol}//${parsed.host}${parsed.pathname === '/' ? '' : parsed.pathname}`
  } catch {
    return 'redis (unparsable address)'
  }
}

/** Credentials, TLS and database of a redis:// or rediss:// URL, as ioredis options. */
function connectionSettings(url: string): {
  username?: string
  password?: string
  tls?: object
  db?: number
} {
  const parsed = new URL(url)
  const settings: { username?: string; password?: string; tls?: object; db?: number } = {}
  if (parsed.username) settings.username = decodeURIComponent(parsed.username)
  if (parsed.password) settings.password = decodeURIComponent(parsed.password)
  if (parsed.protocol === 'rediss:') settings.tls = {}
  const db = Number(parsed.pathname.slice(1))
  if (parsed.pathname.length > 1 && Number.isInteger(db)) settings.db = db
  return settings
}
