/**
 * The whole contract between the session core and a backend. A node knows keys and bytes, nothing of sessions.
 * Every method settles within the node's operation timeout: it resolves, or rejects with OperationTimeoutError /
 * NodeOperationError. A miss is not an error (null / false).
 */
export interface SessionNode {
  /** The id from the configuration; it is also the node part of every session id stored here. */
  readonly id: string
  /** Human-readable address for logs and health output, e.g. `memcached 10.0.0.1:11211`. */
  readonly address: string
  /**
   * Whether operations on different keys take effect in the order they were issued (one connection to one
   * server): a read issued right after an add sees what the add did. False for a Redis Cluster, whose keys live
   * on several shards. It lets a lock's add and the session's read leave together.
   */
  readonly ordered: boolean
  get(key: string): Promise<Buffer | null>
  set(key: string, value: Buffer, ttlSeconds: number): Promise<void>
  /** Stores only if the key is absent; false when it was present. */
  add(key: string, value: Buffer, ttlSeconds: number): Promise<boolean>
  /**
   * add() of a value only its writer deletes (a lock), answering with what deleteOwned() needs; null when the
   * key was present.
   */
  addOwned(key: string, value: Buffer, ttlSeconds: number): Promise<OwnedToken | null>
  /**
   * Deletes what addOwned() stored, only if it is still there: after it expired, another writer's value under the
   * same key is never deleted. In one operation where the backend can tell the value apart in one.
   */
  deleteOwned(key: string, token: OwnedToken): Promise<void>
  /** False when the key was absent. */
  delete(key: string): Promise<boolean>
  /** Moves the expiry without rewriting the value; false when the key was absent. */
  touch(key: string, ttlSeconds: number): Promise<boolean>
  /** Reads a value with its compare-and-set token (memcached's CAS unique). */
  gets(key: string): Promise<{ readonly value: Buffer; readonly cas: CasToken } | null>
  /**
   * Writes only if the value is unchanged since `cas` was read: 'stored', 'conflict' (written by someone else
   * since), or 'missing' (deleted or expired since).
   */
  setIfUnchanged(key: string, value: Buffer, ttlSeconds: number, cas: CasToken): Promise<CasOutcome>
  /** Deletes only if the value is unchanged since `cas` was read. */
  deleteIfUnchanged(key: string, cas: CasToken): Promise<CasOutcome>
  /**
   * The largest value the node has said it stores under a key of `keyBytes` bytes (memcached's item size, -I);
   * undefined while it has not said, or when it sets no limit below maxSessionBytes' range.
   */
  largestValue?(keyBytes: number): number | undefined
  /** A cheap round trip used to decide whether a dead node is back. */
  ping(): Promise<void>
  close(): Promise<void>
}

/** What addOwned() answers: opaque, valid only for the node that issued it. */
export type OwnedToken = { readonly __owned: unique symbol }

/** An opaque compare-and-set token, valid only for the node that issued it. */
export type CasToken = { readonly __cas: unique symbol }

export type CasOutcome = 'stored' | 'conflict' | 'missing'

/** memcached reads an expiry above 30 days as an absolute unix time, so long TTLs must be sent as one. */
const MEMCACHED_RELATIVE_EXPIRY_LIMIT = 60 * 60 * 24 * 30

/** memcached's expiry has 32 bits: an absolute time is at most early 2106. */
const MEMCACHED_LAST_EXPIRY = 0xffff_ffff

export function memcachedExpiry(ttlSeconds: number, nowMs = Date.now()): number {
  const ttl = Math.max(1, Math.ceil(ttlSeconds))
  if (ttl <= MEMCACHED_RELATIVE_EXPIRY_LIMIT) return ttl
  // A cookie that lives for a century is kept as long as memcached can keep anything, not refused.
  return Math.min(Math.floor(nowMs / 1000) + ttl, MEMCACHED_LAST_EXPIRY)
}
