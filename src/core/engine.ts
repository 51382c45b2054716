import { LockTimeoutError, StaleWriteError } from '../errors.js'
import type { Logger } from '../logger.js'
import type { SessionBackend } from './backend.js'
import type { PresentedId } from './cookie-value.js'
import { KeyedQueue } from './keyed-queue.js'
import { storageKeys } from './keys.js'
import type { LockManager } from './locking.js'
import type { LockingPolicy, RequestFacts } from './locking-policy.js'
import { changesBetween } from './merge.js'
import { type LifecyclePolicy, type SessionSnapshot, SessionState } from './session-state.js'
import type { ReplicatedStore } from './store.js'

export interface OpenedSession {
  readonly state: SessionState
  /** Stored cookie and data JSON, for a session that was found; undefined for a new one. */
  readonly stored: { readonly cookieJson: string; readonly dataJson: string } | undefined
}

/** Non-sticky mode's protection of parallel requests of one session. */
export interface Concurrency {
  readonly locks: LockManager
  readonly policy: LockingPolicy
  /** The replicated store, for merged writes. */
  readonly store: ReplicatedStore
  readonly prefix: string
  /** 'proceed': a request whose lock timed out runs anyway, and its write is a merge. */
  readonly lockTimeoutAction: 'fail' | 'proceed'
  readonly logger: Logger
}

/** Counters of the concurrency machinery. */
export interface SessionCounters {
  locksAcquired: number
  lockTimeouts: number
  merges: number
  mergeConflicts: number
}

export interface CommitResult {
  /** Whether the adapter must send the session cookie (with `state.id`) in this response. */
  readonly setCookie: boolean
}

/**
 * The request lifecycle shared by every adapter: open a session from the id a client presented, and commit it
 * before the response is acknowledged. Adapters translate requests and cookies; every decision lives here.
 */
export class SessionEngine {
  readonly store: SessionBackend
  readonly policy: LifecyclePolicy
  readonly counters: SessionCounters = { locksAcquired: 0, lockTimeouts: 0, merges: 0, mergeConflicts: 0 }
  readonly #defaultTtlSeconds: number
  readonly #concurrency: Concurrency | undefined
  readonly #merges = new KeyedQueue()

  constructor(
    store: SessionBackend,
    policy: LifecyclePolicy,
    defaultTtlSeconds: number,
    concurrency?: Concurrency,
  ) {
    this.store = store
    this.policy = policy
    this.#defaultTtlSeconds = defaultTtlSeconds
    this.#concurrency = concurrency
  }

  /**
   * Loads the presented session, or starts a new one. When the locking mode says so, the session's lock is taken
   * first. Rejects with AllNodesDownError when nothing can answer, LockTimeoutError when the lock stays taken.
   */
  async open(presented: PresentedId | undefined, request?: RequestFacts): Promise<OpenedSession> {
    const cookieId = presented?.id
    const lock = cookieId === undefined || !request ? undefined : await this.#lock(cookieId, request)
    let loaded: Awaited<ReturnType<SessionBackend['load']>>
    try {
      loaded = cookieId === undefined ? null : await this.store.load(cookieId)
    } catch (error) {
      await lock?.release()
      throw error
    }
    const opened: OpenedSession =
      cookieId !== undefined && loaded
        ? { state: SessionState.loaded(cookieId, loaded, this.policy), stored: loaded.record }
        : { state: SessionState.fresh(cookieId, this.store.newSessionId()), stored: undefined }
    opened.state.lock = lock
    // A cookie signed with a rotated-out secret is re-signed, so that secret can be retired.
    opened.state.resign = presented?.resign === true && opened.stored !== undefined
    return opened
  }

  /**
   * The request is over: after any commit in flight the lock is released. Given the request (it was answered,
   * not abandoned), 'auto' mode also learns whether its route wrote the session.
   */
  async finish(state: SessionState, request?: RequestFacts): Promise<void> {
    await state.committing?.catch(() => {})
    await state.lock?.release()
    if (request && !state.finished && state.record !== undefined) {
      state.finished = true
      this.#concurrency?.policy.learn(request, state.wrote)
    }
  }

  async #lock(cookieId: string, request: RequestFacts) {
    const concurrency = this.#concurrency
    const parsed = this.store.recognize(cookieId)
    if (!concurrency || !parsed || !concurrency.policy.shouldLock(request)) return undefined
    try {
      const lock = await concurrency.locks.acquire(
        parsed.random,
        parsed.nodeId,
        storageKeys(concurrency.prefix, parsed.random).lock,
      )
      this.counters.locksAcquired++
      return lock
    } catch (error) {
      if (!(error instanceof LockTimeoutError)) throw error
      this.counters.lockTimeouts++
      concurrency.logger.warn({ path: request.path }, 'session-failover: session lock timed out')
      if (concurrency.lockTimeoutAction === 'proceed') return undefined
      throw error
    }
  }

  /**
   * Stores what must be stored, before the response goes out. `snapshot` is null when the application removed
   * the session object (express-session's `unset`).
   */
  commit(state: SessionState, snapshot: SessionSnapshot | null): Promise<CommitResult> {
    const committing = this.#commit(state, snapshot)
    state.committing = committing
    return committing
  }

  async #commit(state: SessionState, snapshot: SessionSnapshot | null): Promise<CommitResult> {
    if (snapshot === null) {
      if (this.policy.unsetDestroy && !state.destroyed) await this.destroy(state)
      return { setCookie: false }
    }
    if (state.shouldSave(snapshot.dataJson, this.policy)) {
      await this.save(state, snapshot)
    } else if (state.record && state.shouldTouch(snapshot.dataJson, this.policy)) {
      // Not awaited: an expiry refresh acknowledges no change, so the response need not wait for it.
      void this.store.refresh(state.id, state.record, this.ttlSeconds(snapshot.expires))
    }
    return { setCookie: state.shouldSetCookie(snapshot, this.policy) }
  }

  async save(state: SessionState, snapshot: SessionSnapshot): Promise<void> {
    const concurrency = this.#concurrency
    const ttlSeconds = this.ttlSeconds(snapshot.expires)
    const record = {
      version: state.version + 1,
      writtenAt: Date.now(),
      cookieJson: snapshot.cookieJson,
      dataJson: snapshot.dataJson,
    }
    // 'none', sticky mode, and sessions this request created (or regenerated): nobody else writes them.
    if (!concurrency?.policy.mergesUnlockedWrites || !state.record || state.renewed) {
      state.markSaved(await this.store.save(state.id, record, ttlSeconds), record)
      return
    }
    // Holding the lock: write only over the copy this request read (a lock can lapse, or its node die); if the
    // copy changed meanwhile, merge instead of overwriting.
    if (state.lock?.held && state.cas) {
      try {
        const id = await concurrency.store.save(state.id, record, ttlSeconds, { ifUnchanged: state.cas })
        state.markSaved(id, record)
        return
      } catch (error) {
        if (!(error instanceof StaleWriteError)) throw error
      }
    }
    // Nothing keeps other requests of this session out: apply this request's changes onto what is stored.
    // Merges of one session in this process take turns, so they contend only with other instances.
    const changes = changesBetween(state.baseJson, snapshot.dataJson)
    const key = this.store.recognize(state.id)?.random ?? state.id
    const merged = await this.#merges.run(key, () =>
      concurrency.store.merge(state.id, changes, snapshot.cookieJson, ttlSeconds),
    )
    this.counters.merges++
    if (!merged) {
      // Destroyed by another request meanwhile: it stays destroyed.
      state.destroyed = true
      return
    }
    this.counters.mergeConflicts += merged.conflicts
    // This request's own view stays the base of its next diff: keys others added are not "deleted" by it.
    state.markSaved(merged.id, merged.record, snapshot.dataJson)
  }

  async destroy(state: SessionState): Promise<void> {
    state.destroyed = true
    state.wrote = true
    await this.store.destroy(state.id)
  }

  /**
   * After destroy(), for adapters whose request keeps a session object (Fastify): a new, empty session, stored
   * only if modified. The request keeps its lock.
   */
  startOver(destroyed: SessionState): SessionState {
    const next = SessionState.fresh(destroyed.cookieId, this.store.newSessionId())
    next.lock = destroyed.lock
    next.wrote = true
    return next
  }

  /** regenerate(): both copies of the old session are removed, then a new id is issued. */
  async regenerate(state: SessionState): Promise<void> {
    state.wrote = true
    await this.store.destroy(state.id)
    state.renew(this.store.newSessionId())
  }

  /** reload(): re-reads the stored session; null when it no longer exists. */
  async reload(state: SessionState): Promise<OpenedSession['stored'] | null> {
    const loaded = await this.store.load(state.id)
    if (!loaded) return null
    state.adopt(loaded, this.policy)
    return loaded.record
  }

  /** A cookie with an expiry sets the TTL; a browser-session cookie gets the configured `ttl`. */
  ttlSeconds(expires: Date | null): number {
    if (!expires) return this.#defaultTtlSeconds
    return Math.max(1, Math.ceil((expires.getTime() - Date.now()) / 1000))
  }
}
