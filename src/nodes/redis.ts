import { TLSSocket } from 'node:tls'
import { Cluster, Redis, ReplyError } from 'ioredis'
import { ClosedError, NodeOperationError, NodeRejectedError, OperationTimeoutError } from '../errors.js'
import type { CasOutcome, CasToken, OwnedToken, SessionNode } from './node.js'
import { type RedisNodeConfig, redisClientSettings, withoutCredentials } from './redis-settings.js'
import { withTimeout } from './timeout.js'

export type { RedisNodeConfig } from './redis-settings.js'

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

/** What ioredis's own `commandTimeout` rejects a command with. */
const IOREDIS_COMMAND_TIMEOUT = 'Command timed out'

/**
 * One ioredis client (or Cluster) as one node. Redis's own primitives stand in for memcached's: SET PX for
 * expiry, SET NX PX for add, PEXPIRE for touch, and Lua scripts for compare-and-set and compare-and-delete,
 * where the compare-and-set token is the value read.
 *
 * ioredis would queue commands while disconnected and retry them without end, so a request could wait on a
 * dead server and a stale write could run long after it was given up on. The offline queue is off (a command on
 * a down server fails at once) and no command is retried; ioredis keeps reconnecting in the background, and
 * the ring's probe notices when the server is back. A command that times out resets the connection, as the
 * memcached connection does (see #reset).
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
  /**
   * Commands waiting for the connection; one 'ready' listener wakes them, close() fails them, a timed-out one
   * removes itself.
   */
  readonly #waiting = new Set<(closed?: ClosedError) => void>()
  /**
   * Why the client cannot connect (a refused password, a TLS failure, no sentinel answering): ioredis reports it
   * only as an event, and a command waiting for the connection would otherwise say no more than that it timed out.
   */
  #connectionError: string | undefined

  constructor(config: RedisNodeConfig) {
    this.id = config.id
    this.#timeoutMs = config.operationTimeoutMs
    this.#probeKey = config.probeKey
    this.ordered = !config.cluster
    const settings = redisClientSettings(config)
    if (settings.kind === 'cluster') {
      this.address = `redis cluster ${(config.cluster ?? []).map(withoutCredentials).join(',')}`
      this.#client = new Cluster(settings.seeds, settings.options) as ScriptedClient
    } else {
      this.address = config.sentinel
        ? `redis sentinel ${config.sentinel.name} via ${config.sentinel.sentinels.map(withoutCredentials).join(',')}`
        : `redis ${withoutCredentials(config.url ?? '')}`
      this.#client = new Redis(settings.options) as ScriptedClient
    }
    this.#client.defineCommand('compareAndSet', { numberOfKeys: 1, lua: COMPARE_AND_SET })
    this.#client.defineCommand('compareAndDelete', { numberOfKeys: 1, lua: COMPARE_AND_DELETE })
    // The ring learns of trouble from failed commands; these say why a command could not even be sent.
    const remember = (error: unknown): void => {
      this.#connectionError = error instanceof Error ? error.message : String(error)
    }
    this.#client.on('error', remember)
    this.#client.on('sentinelError', remember)
    this.#client.on('node error', remember)
    this.#client.on('ready', () => {
      this.#connectionError = undefined
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

  /** Fails at once the commands waiting for the connection: their timers would hold the process until they fire. */
  async close(): Promise<void> {
    this.#closed = true
    const closed = new ClosedError(`${this.address} was closed`)
    for (const wake of this.#waiting) wake(closed)
    this.#waiting.clear()
    this.#client.disconnect()
  }

  #run<T>(operation: string, start: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new ClosedError(`${this.address} was closed`))
    // While (re)connecting, a command waits for the connection, within the timeout: a server that just restarted
    // is back in milliseconds. A command whose request gave up is dropped; it must not run (a stale write)
    // whenever the server comes back.
    let abandoned = false
    let wake: ((closed?: ClosedError) => void) | undefined
    const begin =
      this.#client.status === 'ready'
        ? start()
        : new Promise<void>((resolve, reject) => {
            wake = (closed) => (closed ? reject(closed) : resolve())
            this.#waiting.add(wake)
          }).then(() => {
            if (abandoned) throw new Error('abandoned before the connection was ready')
            return start()
          })
    const describe = () => this.#describe(operation)
    const pending = begin.catch((cause: unknown) => {
      if (cause instanceof ClosedError) throw cause
      const message = cause instanceof Error ? cause.message : String(cause)
      if (message === IOREDIS_COMMAND_TIMEOUT) {
        this.#reset()
        throw new OperationTimeoutError(`${describe()} did not answer within ${this.#timeoutMs} ms`)
      }
      const failed = `${this.address} failed ${operation}: ${message}`
      if (cause instanceof ReplyError && !isUnavailableReply(message)) {
        throw new NodeRejectedError(failed, { cause })
      }
      throw new NodeOperationError(failed, { cause })
    })
    return withTimeout(pending, this.#timeoutMs, describe, () => {
      abandoned = true
      if (wake) this.#waiting.delete(wake)
      this.#reset()
    })
  }

  /** The node and operation, with why it is not connected when it is not: a timeout alone would hide that. */
  #describe(operation: string): string {
    const why = this.#connectionError
    return why === undefined ? `${this.address} (${operation})` : `${this.address} (${operation}; ${why})`
  }

  /**
   * Drops a connection on which a command went unanswered, as the memcached connection does: ioredis's command
   * timeout only fails the command, and the socket would stay open to a frozen server, or to a Sentinel master
   * that froze while a replica was promoted (ioredis asks Sentinel again only when the connection closes).
   * Reset, not closed: a close lets the kernel go on sending what is still queued, and waits for the frozen server
   * to answer it. Only a ready connection: one being made is bounded by ioredis's connect and command timeouts.
   */
  #reset(): void {
    const client = this.#client
    if (this.#closed || client.status !== 'ready') return
    if (client instanceof Cluster) {
      client.disconnect(true)
      return
    }
    // resetAndDestroy() sends a TCP RST; a TLS socket's handle cannot, so it is destroyed (FIN) instead.
    if (client.stream instanceof TLSSocket) client.stream.destroy()
    else client.stream.resetAndDestroy()
  }
}

/** Redis takes milliseconds; a session's TTL is whole seconds. */
function toMs(ttlSeconds: number): number {
  return Math.max(1, Math.ceil(ttlSeconds)) * 1000
}
