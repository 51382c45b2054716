import { LRUCache } from 'lru-cache'
import { AllNodesDownError } from '../errors.js'
import type { Logger } from '../logger.js'
import type { NodeRing } from '../nodes/ring.js'
import { formatSessionId, type ParsedSessionId, parseSessionId } from '../session-id.js'
import type { SessionBackend } from './backend.js'
import { type BackupJob, BackupQueue } from './backup-queue.js'
import type { SessionRecord } from './codec.js'
import type { LoadedSession, ReplicatedStore } from './store.js'

export interface StickyOptions {
  /** This instance's name, carried in the ids of the sessions it owns. */
  readonly route: string
  readonly backupAsync: boolean
  readonly localMaxSessions: number
  readonly localMaxBytes: number
  /** How long close() (and SIGTERM) wait for queued backups. */
  readonly flushTimeoutMs: number
  readonly retryDelayMs: number
  readonly logger: Logger
}

interface LocalSession {
  /** The session's current id; it changes when a backup relocated it to another node. */
  id: string
  readonly record: SessionRecord
}

/** Bytes a local session is charged for in the memory bound: its JSON texts plus the entry's overhead. */
const ENTRY_OVERHEAD = 200

/**
 * Sticky mode: sessions live in this instance's memory and are served from it without a remote read while this
 * instance owns them (the route in their id is this instance's). Every modified session is backed up to its
 * primary and backup nodes, before the response by default or through a queue after it (`backupAsync`).
 * A session that names another route is taken over: read from the nodes (the local copy may be stale), owned
 * from then on, and its cookie reissued with this route.
 */
export class StickyStore implements SessionBackend {
  readonly #remote: ReplicatedStore
  readonly #ring: NodeRing
  readonly #options: StickyOptions
  readonly #local: LRUCache<string, LocalSession>
  readonly #queue: BackupQueue
  readonly #onSigterm: (() => void) | undefined

  constructor(remote: ReplicatedStore, ring: NodeRing, options: StickyOptions) {
    this.#remote = remote
    this.#ring = ring
    this.#options = options
    this.#local = new LRUCache<string, LocalSession>({
      max: options.localMaxSessions,
      maxSize: options.localMaxBytes,
      sizeCalculation: (entry) =>
        ENTRY_OVERHEAD + 2 * (entry.record.dataJson.length + entry.record.cookieJson.length),
    })
    this.#queue = new BackupQueue({
      // Bounded like the cache: at most one queued copy per session this instance can hold.
      maxPending: options.localMaxSessions,
      concurrency: 8,
      retryDelayMs: options.retryDelayMs,
      write: (job) => this.#remote.save(job.id, job.record, job.ttlSeconds),
      onWritten: (key, job, id) => this.#written(key, job.record, id),
      logger: options.logger,
    })
    if (options.backupAsync) {
      // Queued backups are acknowledged writes: a SIGTERM must not drop them. When nobody else handles the
      // signal, terminate as Node would once they are flushed.
      this.#onSigterm = () => {
        void this.#queue.flush(options.flushTimeoutMs).then(() => {
          if (process.listenerCount('SIGTERM') === 0) process.kill(process.pid, 'SIGTERM')
        })
      }
      process.once('SIGTERM', this.#onSigterm)
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

  async load(id: string): Promise<LoadedSession | null> {
    const parsed = this.recognize(id)
    if (!parsed) return null
    if (parsed.route === this.#options.route) {
      const local = this.#local.get(parsed.random)
      if (local) {
        // Owned here: no remote read. A session whose primary died is moved (and its cookie reissued) now, so
        // it has two copies again; with no node alive at all it is simply served from memory.
        const primary = parseSessionId(local.id)?.nodeId
        const relocate = primary !== undefined && !this.#ring.isAlive(primary) && this.#ring.anyAlive()
        return { id: local.id, record: local.record, mustWrite: relocate, relocatedFrom: undefined }
      }
    } else {
      // Another instance owned the session since this one last saw it: never serve that copy.
      this.#local.delete(parsed.random)
    }
    const loaded = await this.#remote.load(id)
    if (!loaded) return null
    const owned = withRoute(loaded.id, this.#options.route)
    this.#local.set(parsed.random, { id: owned, record: loaded.record })
    return { ...loaded, id: owned }
  }

  async save(id: string, record: SessionRecord, ttlSeconds: number): Promise<string> {
    const key = parseSessionId(id)?.random
    if (!key) throw new TypeError('save() needs an id issued by this store')
    const local: LocalSession = { id, record }
    this.#local.set(key, local)
    const job: BackupJob = { id, record, ttlSeconds }
    if (this.#options.backupAsync && this.#queue.offer(key, job)) return id

    // Synchronous: an older queued copy of this session must not land after this one.
    await this.#queue.withdraw(key)
    try {
      const saved = await this.#remote.save(id, record, ttlSeconds)
      local.id = saved
      return saved
    } catch (error) {
      if (!(error instanceof AllNodesDownError)) throw error
      // Degraded: the session keeps working from memory and is backed up when a node answers again.
      const queued = this.#queue.offer(key, job)
      this.#options.logger.warn(
        { queued, pending: this.#queue.size },
        queued
          ? 'session-failover: no node alive; sticky session kept in memory, backup queued'
          : 'session-failover: no node alive and the backup queue is full; sticky session kept in memory only',
      )
      return id
    }
  }

  refresh(id: string, record: SessionRecord, ttlSeconds: number): Promise<void> {
    // Served from memory, so neither copy is read: both are verified, not only the backup.
    return this.#remote.refresh(id, record, ttlSeconds, { verifyPrimary: true })
  }

  async destroy(id: string): Promise<void> {
    const key = parseSessionId(id)?.random
    if (!key) return
    this.#local.delete(key)
    // A backup still queued or in flight must not bring the session back after the delete.
    await this.#queue.withdraw(key)
    await this.#remote.destroy(id)
  }

  async close(): Promise<void> {
    if (this.#onSigterm) process.off('SIGTERM', this.#onSigterm)
    const flushed = await this.#queue.flush(this.#options.flushTimeoutMs)
    this.#queue.stop()
    if (!flushed) {
      this.#options.logger.error(
        { pending: this.#queue.size },
        'session-failover: closing with backups not written (no node reachable)',
      )
    }
    this.#local.clear()
  }

  #written(key: string, record: SessionRecord, id: string): void {
    // The write may have relocated the session; the next response carries the new id in its cookie.
    const local = this.#local.peek(key)
    if (local && local.record === record) local.id = id
  }
}

function withRoute(id: string, route: string): string {
  const parsed = parseSessionId(id)
  return parsed ? formatSessionId(parsed.random, parsed.nodeId, route) : id
}
