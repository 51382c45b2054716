import { LRUCache } from 'lru-cache'
import { AllNodesDownError } from '../errors.js'
import type { Logger } from '../logger.js'
import type { NodeRing } from '../nodes/ring.js'
import { formatSessionId, type ParsedSessionId, parseSessionId } from '../session-id.js'
import type { SessionBackend } from './backend.js'
import { type BackupJob, BackupQueue, recordBytes } from './backup-queue.js'
import type { SessionRecord } from './codec.js'
import { logIdOf } from './keys.js'
import type { Metrics } from './metrics.js'
import { flushOnSignals } from './shutdown.js'
import { isNewer, type LoadedSession, type ReplicatedStore } from './store.js'

export interface StickyOptions {
  /** This instance's name, carried in the ids of the sessions it owns. */
  readonly route: string
  readonly backupAsync: boolean
  readonly localMaxSessions: number
  readonly localMaxBytes: number
  /** How long close() (and SIGTERM or SIGINT) wait for queued backups. */
  readonly flushTimeoutMs: number
  /** Idle lifetime given to a session taken over from the nodes, until its request sets the exact one. */
  readonly defaultTtlSeconds: number
  /** How often an owner checks the stored copies of a session it serves from memory. */
  readonly backupCheckIntervalMs: number
  readonly retryDelayMs: number
  readonly logger: Logger
  readonly metrics: Metrics
}

interface LocalSession {
  /** The session's current id; it changes when a backup relocated it to another node. */
  id: string
  readonly record: SessionRecord
  /** Epoch ms after which the session has been idle for its whole TTL: expired, as it is in memcached. */
  expiresAt: number
  /** False when no backup of this version could even be queued (queue full while no node was alive). */
  backedUp: boolean
}

/** Sessions this instance destroyed, remembered so that a request that loaded one before cannot store it again. */
const REMEMBERED_DESTROYS = 10_000

/**
 * Sticky mode: sessions live in this instance's memory and are served from it without a remote read while this
 * instance owns them (the route in their id is this instance's). Every modified session is backed up to its
 * primary and backup nodes, before the response by default or after it (`backupAsync`); all writes of one
 * session go through one queue, so they land in order. A session that names another route is taken over: read
 * from the nodes (the local copy may be stale), owned from then on, and its cookie reissued with this route.
 */
export class StickyStore implements SessionBackend {
  readonly #remote: ReplicatedStore
  readonly #ring: NodeRing
  readonly #options: StickyOptions
  readonly #local: LRUCache<string, LocalSession>
  readonly #queue: BackupQueue
  readonly #unregisterSignals: (() => void) | undefined
  /**
   * Keys of sessions destroyed here, oldest first. A destroyed key is never issued again (a new session, or a
   * regenerated one, gets a new random part), so a save of one comes from a request that loaded the session before
   * its logout: it must not bring the session back, as a merge onto nothing does not in non-sticky mode.
   */
  readonly #destroyed = new Set<string>()

  constructor(remote: ReplicatedStore, ring: NodeRing, options: StickyOptions) {
    this.#remote = remote
    this.#ring = ring
    this.#options = options
    this.#local = new LRUCache<string, LocalSession>({
      max: options.localMaxSessions,
      maxSize: options.localMaxBytes,
      sizeCalculation: (entry) => recordBytes(entry.record),
    })
    this.#queue = new BackupQueue({
      // Bounded like the cache: at most one queued copy per session this instance can hold.
      maxPending: options.localMaxSessions,
      maxPendingBytes: options.localMaxBytes,
      concurrency: 8,
      retryDelayMs: options.retryDelayMs,
      run: (job) => this.#perform(job),
      onWritten: (key, job, id) => {
        // The write may have relocated the session; the next response carries the new id in its cookie.
        const local = this.#local.peek(key)
        if (local && local.record === job.record) local.id = id
      },
      onDropped: (key, job) => {
        // Served from memory until a node is back; then its next load writes it (mustWrite), if still here.
        const local = this.#local.peek(key)
        if (local && local.record === job.record) local.backedUp = false
        options.logger.warn(
          { pending: this.#queue.size },
          'session-failover: no node alive and the backup queue is full; sticky session kept in memory only',
        )
      },
      onStale: (key, job, error) => {
        if (error.loggedOut) {
          // Logged out on another instance (which took the session over) while this write waited for a node.
          this.#local.delete(key)
          this.#forget(key)
          options.logger.warn(
            {},
            'session-failover: a delayed backup of a session logged out meanwhile was dropped',
          )
          return
        }
        // Another instance stored a newer copy while this one waited: it owns the session now.
        if (this.#local.peek(key)?.record === job.record) this.#local.delete(key)
        options.logger.warn(
          {},
          'session-failover: a delayed backup was older than the stored copy and was dropped',
        )
      },
      logger: options.logger,
    })
    if (options.backupAsync) {
      this.#unregisterSignals = flushOnSignals(() => this.#queue.flush(options.flushTimeoutMs))
    }
  }

  /** Sessions held in memory and their charged bytes, for the bound and for stats. */
  get localSize(): { readonly sessions: number; readonly bytes: number } {
    return { sessions: this.#local.size, bytes: this.#local.calculatedSize }
  }

  /** Backups waiting to be written. */
  get pendingBackups(): number {
    return this.#queue.size
  }

  newSessionId(): string {
    return this.#remote.newSessionId(this.#options.route)
  }

  recognize(id: string): ParsedSessionId | null {
    return this.#remote.recognize(id)
  }

  /** Never for a session held in memory or waiting in the backup queue: those exist whatever the nodes say. */
  knownAbsent(parsed: ParsedSessionId): boolean {
    if (this.#destroyed.has(parsed.random)) return true
    // The remote's memory first: almost always it says no, and then memory need not be searched.
    if (!this.#remote.remembersAbsent(parsed.random)) return false
    if (this.#local.has(parsed.random) || this.#queue.has(parsed.random)) return false
    return this.#remote.knownAbsent(parsed)
  }

  async load(id: string): Promise<LoadedSession | null> {
    const parsed = this.recognize(id)
    if (!parsed) return null
    const key = parsed.random
    // A destroyed key is never issued again: whoever presents it gets a new session.
    if (this.#destroyed.has(key)) return null
    const local = this.#local.get(key)
    if (local && parsed.route === this.#options.route) {
      if (local.expiresAt <= Date.now()) {
        this.#local.delete(key)
        return null
      }
      // Owned here: no remote read. A session whose primary died is moved (and its cookie reissued) now, so it
      // has two copies again; one that could not be backed up at all is written once a node is back.
      const primary = parseSessionId(local.id)?.nodeId
      const anyAlive = this.#ring.anyAlive()
      const mustWrite =
        anyAlive &&
        ((primary !== undefined && !this.#ring.isAlive(primary)) ||
          (!local.backedUp && !this.#queue.has(key)))
      return { id: local.id, record: local.record, mustWrite, relocatedFrom: undefined }
    }
    // Not in memory, or another instance owned it since this one last saw it: never serve that local copy.
    this.#local.delete(key)

    let loaded: LoadedSession | null = null
    try {
      loaded = await this.#remote.load(id)
    } catch (error) {
      if (!(error instanceof AllNodesDownError) || !this.#queue.latest(key)) throw error
    }
    // Logged out here while the copies were read (a logout waits for its mark on every node): it stays so.
    if (this.#destroyed.has(key)) return null
    // Another request of the session loaded it and saved meanwhile (backupAsync acknowledges from memory): what
    // this instance acknowledged wins over an older stored copy.
    const held = this.#local.peek(key)
    if (held && (!loaded || !isNewer(loaded.record, held.record))) {
      return { id: held.id, record: held.record, mustWrite: false, relocatedFrom: undefined }
    }
    // This instance may still hold an acknowledged copy that is not stored yet (queued, or evicted from memory
    // meanwhile): it wins over the stored one unless another instance stored something newer since.
    const queued = this.#queue.latest(key)
    if (queued && (!loaded || (queued.record !== null && isNewer(queued.record, loaded.record)))) {
      if (queued.record === null) return null // destroyed here, delete not stored yet
      return this.#own(key, {
        id: queued.id,
        record: queued.record,
        mustWrite: false,
        relocatedFrom: undefined,
      })
    }
    if (queued) await this.#queue.withdraw(key)
    return loaded && this.#own(key, loaded)
  }

  async save(id: string, record: SessionRecord, ttlSeconds: number): Promise<string> {
    const key = parseSessionId(id)?.random
    if (!key) throw new TypeError('save() needs an id issued by this store')
    // Logged out (or regenerated) meanwhile by another request on this instance: it stays destroyed.
    if (this.#destroyed.has(key)) return id
    const expiresAt = Date.now() + ttlSeconds * 1000
    // Refused now, not when the backup runs: a session that can never be stored must not be acknowledged.
    this.#remote.assertFits(record)
    if (this.#options.backupAsync) {
      // The last response wins, as in synchronous mode: a request that loaded an older version than others of
      // this instance saved meanwhile still stores over them. Its delayed write is refused only when another
      // instance stored something newer.
      const floor = Math.max(
        this.#local.peek(key)?.record.version ?? 0,
        this.#queue.latest(key)?.record?.version ?? 0,
      )
      const last = record.version > floor ? record : { ...record, version: floor + 1 }
      const job: BackupJob = { id, record: last, expiresAt, onlyIfNewer: true }
      if (this.#queue.offer(key, job)) {
        this.#local.set(key, { id, record: last, expiresAt, backedUp: true })
        return id
      }
      // Queue full: write this one synchronously.
    }
    // Synchronous; a failure other than "no node" leaves memory as it was, so a rejected save is never served.
    const outcome = await this.#queue.submit(key, { id, record, expiresAt, onlyIfNewer: false })
    // Destroyed meanwhile (a logout racing this write): it stays destroyed, in memory too.
    if (!outcome.written && outcome.withdrawn) return id
    if (outcome.written) {
      this.#local.set(key, { id: outcome.id, record, expiresAt, backedUp: true })
      return outcome.id
    }
    // Degraded: no node alive. The session keeps working from memory; the queue retries the backup.
    const backedUp = this.#queue.has(key)
    this.#local.set(key, { id, record, expiresAt, backedUp })
    // Kept nowhere (larger than localMaxBytes, and the queue full or refusing it too): not acknowledged.
    if (!backedUp && this.#local.peek(key)?.record !== record) throw this.#remote.allNodesDown()
    this.#options.logger.warn(
      { pending: this.#queue.size },
      backedUp
        ? 'session-failover: no node alive; sticky session kept in memory, backup queued'
        : 'session-failover: no node alive and the backup queue is full; sticky session kept in memory only',
    )
    return id
  }

  async refresh(id: string, record: SessionRecord, ttlSeconds: number): Promise<void> {
    const key = parseSessionId(id)?.random ?? ''
    const local = this.#local.peek(key)
    if (local) local.expiresAt = Date.now() + ttlSeconds * 1000
    // Served from memory, so neither copy is read: both are verified, not only the backup.
    if ((await this.#remote.verifyHeld(id, record, ttlSeconds)) === 'gone') {
      // Logged out on the instance that took it over from this one: no longer served from memory either.
      this.#local.delete(key)
      this.#forget(key)
    }
  }

  /** Only a session this instance serves: another instance holds its own in memory. */
  destroysEverywhere(parsed: ParsedSessionId): boolean {
    return parsed.route === this.#options.route
  }

  async destroy(id: string): Promise<void> {
    const key = parseSessionId(id)?.random
    if (!key) return
    const local = this.#local.peek(key)
    this.#local.delete(key)
    this.#forget(key)
    // A backup still queued or being written must not bring the session back after the delete.
    await this.#queue.withdraw(key)
    try {
      // Another instance that served this session before this one took it over may hold it in memory: the mark
      // keeps its checks from writing it back, for as long as its copy could live (and one check more).
      await this.#remote.destroy(id, { markGoneForSeconds: this.#markGoneFor(local?.expiresAt) })
    } catch (error) {
      if (!(error instanceof AllNodesDownError)) throw error
      // Degraded: the delete is queued like a write, so the old copies go once a node is back.
      this.#queue.offer(key, { id, record: null, expiresAt: 0, onlyIfNewer: false })
    }
  }

  /** Seconds a logout's mark must last: as long as another instance's copy in memory could, and one check more. */
  #markGoneFor(expiresAt: number | undefined): number {
    const lifetimeMs = Math.max((expiresAt ?? 0) - Date.now(), this.#options.defaultTtlSeconds * 1000)
    return Math.ceil((lifetimeMs + this.#options.backupCheckIntervalMs) / 1000)
  }

  /** A destroyed key is never issued again: a later save of it is a request's that loaded it before. */
  #forget(key: string): void {
    this.#destroyed.add(key)
    if (this.#destroyed.size > REMEMBERED_DESTROYS) {
      this.#destroyed.delete(this.#destroyed.values().next().value as string)
    }
  }

  async close(timeoutMs = this.#options.flushTimeoutMs): Promise<void> {
    this.#unregisterSignals?.()
    const flushed = await this.#queue.flush(timeoutMs)
    this.#queue.stop()
    if (!flushed) {
      this.#options.logger.error(
        { pending: this.#queue.size },
        'session-failover: closing with backups not written (no node reachable)',
      )
    }
    this.#local.clear()
  }

  #own(key: string, loaded: LoadedSession): LoadedSession {
    const route = this.#options.route
    const fromRoute = parseSessionId(loaded.id)?.route
    if (fromRoute !== route) {
      // Another instance served this session last (or none did, with an id that names no route).
      this.#options.metrics.counters.takeovers++
      this.#options.metrics.emit('takeover', { session: logIdOf(key), fromRoute, toRoute: route })
    }
    const id = withRoute(loaded.id, route)
    const expiresAt = Date.now() + this.#options.defaultTtlSeconds * 1000
    this.#local.set(key, { id, record: loaded.record, expiresAt, backedUp: true })
    return { ...loaded, id }
  }

  #perform(job: BackupJob): Promise<string> {
    if (job.record === null) {
      return this.#remote
        .destroy(job.id, { markGoneForSeconds: this.#markGoneFor(undefined) })
        .then(() => job.id)
    }
    const ttlSeconds = Math.ceil((job.expiresAt - Date.now()) / 1000)
    // Expired while it waited: storing it now would only bring it back.
    if (!(ttlSeconds > 0)) return Promise.resolve(job.id)
    return this.#remote.save(job.id, job.record, ttlSeconds, { onlyIfNewer: job.onlyIfNewer })
  }
}

function withRoute(id: string, route: string): string {
  const parsed = parseSessionId(id)
  return parsed ? formatSessionId(parsed.random, parsed.nodeId, route) : id
}
