import { endOfTurn } from '../end-of-turn.js'
import {
  CorruptSessionError,
  ForeignRecordError,
  LockTimeoutError,
  SessionTooLargeError,
  StaleWriteError,
  UnserializableSessionError,
  UnsupportedOperationError,
} from '../errors.js'
import type { Logger } from '../logger.js'
import type { ParsedSessionId } from '../session-id.js'
import type { SessionBackend } from './backend.js'
import type { SessionRecord } from './codec.js'
import type { PresentedId } from './cookie-value.js'
import type { SessionCounters } from './counters.js'
import { KeyedQueue } from './keyed-queue.js'
import { logIdOf, storageKeys } from './keys.js'
import type { LockManager } from './locking.js'
import type { LockingPolicy, RequestFacts } from './locking-policy.js'
import { changesBetween } from './merge.js'
import type { Metrics } from './metrics.js'
import type { SessionContent, SessionSerializer } from './serializer.js'
import { type LifecyclePolicy, type SessionSnapshot, SessionState } from './session-state.js'
import type { LoadedSession, ReplicatedStore } from './store.js'

/** Shared, so that waiting out a promise's failure allocates no function. */
const ignore = (): void => {}

export interface OpenedSession {
  readonly state: SessionState
  /** The stored data and cookie, for a session that was found; undefined for a new one. */
  readonly content: SessionContent | undefined
}

/** What the engine needs beyond the backend. */
export interface EngineOptions {
  readonly policy: LifecyclePolicy
  /** TTL of a session whose cookie has no expiry. */
  readonly defaultTtlSeconds: number
  /** Milliseconds a session may live from its creation, however active; undefined: no limit. */
  readonly absoluteTimeoutMs: number | undefined
  readonly serializer: SessionSerializer
  readonly metrics: Metrics
  readonly logger: Logger
  readonly concurrency?: Concurrency | undefined
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
  readonly counters: SessionCounters
  readonly #options: EngineOptions
  readonly #concurrency: Concurrency | undefined
  readonly #merges = new KeyedQueue()
  /** Sessions of requests in flight (opened, not finished): what close() waits for. */
  readonly #inFlight = new Set<SessionState>()

  constructor(store: SessionBackend, options: EngineOptions) {
    this.store = store
    this.policy = options.policy
    this.counters = options.metrics.counters
    this.#options = options
    this.#concurrency = options.concurrency
  }

  /**
   * Loads the presented session, or starts a new one. When the locking mode says so, the session's lock is taken
   * first. Rejects with AllNodesDownError when nothing can answer, LockTimeoutError when the lock stays taken.
   */
  async open(presented: PresentedId | undefined, request?: RequestFacts): Promise<OpenedSession> {
    // A malformed id, or one recently found nowhere, is a new session at no cost: no lock, no read.
    const parsed = presented && this.store.recognize(presented.id)
    const cookieId = parsed && !this.store.knownAbsent(parsed) ? presented.id : undefined
    // The read that left beside the lock's add; used only if that add took the lock.
    let early: Promise<LoadedSession | null> | undefined
    const lock =
      cookieId === undefined || !parsed || !request
        ? undefined
        : await this.#lock(parsed, request, () => {
            early = this.#load(cookieId)
            early.catch(ignore)
          })
    let found: { loaded: LoadedSession; content: SessionContent } | undefined
    try {
      const loaded =
        cookieId === undefined ? null : early && lock?.byFirstAdd ? await early : await this.#load(cookieId)
      if (loaded?.followedMove) this.counters.movesFollowed++
      found = loaded ? this.#readable(loaded) : undefined
    } catch (error) {
      await lock?.release()
      throw error
    }
    if (found) this.counters.requestsWithSession++
    else this.counters.requestsWithoutSession++
    const opened: OpenedSession = found
      ? {
          state: SessionState.loaded(presented?.id as string, found.loaded, this.policy),
          content: found.content,
        }
      : { state: this.#fresh(presented?.id), content: undefined }
    opened.state.lock = lock
    // A cookie signed with a rotated-out secret is re-signed, so that secret can be retired.
    opened.state.resign = presented?.resign === true && found !== undefined
    this.#inFlight.add(opened.state)
    return opened
  }

  #load(id: string): Promise<LoadedSession | null> {
    return this.#options.metrics.time('load', () => this.store.load(id))
  }

  /** Resolves once no request is in flight, or after `timeoutMs`, with how many still are. */
  async drain(timeoutMs: number): Promise<number> {
    const deadline = performance.now() + timeoutMs
    while (this.#inFlight.size > 0 && performance.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    return this.#inFlight.size
  }

  /** The adapter's session object as the bytes that would be stored; UnserializableSessionError if it cannot be. */
  snapshot(session: object, cookie: object): SessionSnapshot {
    return this.#options.metrics.timeSync('serialize', () =>
      this.#options.serializer.snapshot(session, cookie),
    )
  }

  /**
   * The loaded session with its content, or undefined when it must not be served: past its absolute lifetime,
   * or stored data this instance cannot read; a new session begins, and the client never sees an error for
   * what the store holds. The copies are removed, unless another instance may read them. Data in another
   * format than the configured one (the serializer changed) is re-serialized, so comparisons and the next write
   * use the configured format.
   */
  #readable(loaded: LoadedSession): { loaded: LoadedSession; content: SessionContent } | undefined {
    const { record } = loaded
    const absoluteTimeoutMs = this.#options.absoluteTimeoutMs
    if (absoluteTimeoutMs !== undefined && Date.now() - record.createdAt >= absoluteTimeoutMs) {
      this.#discard(loaded.id)
      return undefined
    }
    const serializer = this.#options.serializer
    try {
      const content = serializer.content(record)
      if (record.format === serializer.tag) return { loaded, content }
      const data = serializer.serialize(content.data)
      return { loaded: { ...loaded, record: { ...record, data, format: serializer.tag } }, content }
    } catch (error) {
      if (!(error instanceof CorruptSessionError || error instanceof UnserializableSessionError)) throw error
      const session = logIdOf(this.store.recognize(loaded.id)?.random ?? '')
      // Data in a format only other instances read (or cannot convert to this one's) stays theirs.
      if (error instanceof ForeignRecordError || error instanceof UnserializableSessionError) {
        this.counters.foreignRecords++
        this.#options.logger.info(
          { session, err: error.message },
          'session-failover: session in a format this instance cannot use; a new one is served',
        )
        return undefined
      }
      this.counters.corruptSessions++
      this.#options.metrics.emit('corruptSession', { session, node: undefined, reason: error.message })
      this.#options.logger.warn(
        { session, err: error.message },
        'session-failover: unreadable stored session replaced by a new one',
      )
      this.#discard(loaded.id)
      return undefined
    }
  }

  /** Removes a session's copies in the background: the request goes on with a new session meanwhile. */
  #discard(id: string): void {
    this.store.destroy(id).catch((error: unknown) => {
      this.#options.logger.warn({ err: String(error) }, 'session-failover: removing a session failed')
    })
  }

  #fresh(cookieId: string | undefined): SessionState {
    return SessionState.fresh(cookieId, this.store.newSessionId(), this.#options.serializer.empty)
  }

  /**
   * The request is over: after any commit in flight the lock is released. Given the request (it was answered,
   * not abandoned), 'auto' mode also learns whether its route wrote the session. Never rejects; once the commit
   * has settled, the release is queued in this tick and sent at the end of the turn, so adapters need not wait
   * for its answer.
   */
  finish(state: SessionState, request?: RequestFacts): Promise<void> {
    // The response's close asks again after answered() did, with no request: the same commit then has nothing
    // left to wait for (every request pays for this call, so it costs no promise of its own).
    if (request === undefined && state.finishing && state.finishedAfter === state.committing) {
      return state.finishing
    }
    state.finishedAfter = state.committing
    state.finishing = this.#finish(state, request)
    return state.finishing
  }

  async #finish(state: SessionState, request: RequestFacts | undefined): Promise<void> {
    await state.committing?.catch(ignore)
    // A save or destroy the application began and did not wait for (a logout followed at once by a redirect)
    // lands before the lock goes: the session's next request must not read the copies it replaces.
    const operations = this.settled(state)
    if (operations) await operations
    // Learned before the release is answered: the client's next request, which the response (leaving after the
    // release is sent) lets in, already finds its route read-only.
    this.#learn(state, request)
    await state.lock?.release()
    this.#settle(state, request)
  }

  /**
   * finish() for a request whose response is ready once its commit is stored; resolves when that response may
   * leave. A lock's release goes out with this turn's other node requests, at the end of the turn; a request
   * that still held its lock has its response leave after them, so that its client's next request, on any
   * instance, finds the lock gone. Any other response may leave at once: undefined. (A release that must first
   * read the lock, its add's connection having closed, still leaves after the response: rare, and only a wait.)
   */
  answered(state: SessionState, request?: RequestFacts): Promise<void> | undefined {
    const releasing = state.lock?.held === true
    void this.finish(state, request)
    return releasing ? endOfTurn() : undefined
  }

  /**
   * The commit of a request that stores nothing and holds no lock (most reads), decided and done at once, so
   * the response need not wait for a promise. Undefined when the commit needs the store or a lock release: then
   * commit() and finish() do it.
   */
  commitAtOnce(
    state: SessionState,
    snapshot: SessionSnapshot,
    request?: RequestFacts,
  ): CommitResult | undefined {
    // A lock not yet handed to finish() is released there; a commit still running must settle first. A streamed
    // response's end after its first commit, with nothing changed since, is done here at once.
    if (
      (state.lock && !state.finishing) ||
      state.commitsRunning > 0 ||
      (state.operations !== undefined && state.operations.size > 0) ||
      state.shouldSave(snapshot.data, this.policy)
    ) {
      return undefined
    }
    if (state.record && state.shouldTouch(snapshot.data, this.policy)) {
      void this.store.refresh(
        state.id,
        state.record,
        this.ttlSeconds(snapshot.expires, state.record.createdAt),
      )
    }
    this.#settle(state, request)
    return { setCookie: state.shouldSetCookie(snapshot, this.policy) }
  }

  /** The bookkeeping of a finished request: no longer in flight, counted, and its route learned. */
  #settle(state: SessionState, request: RequestFacts | undefined): void {
    this.#inFlight.delete(state)
    // Once per answered request (a streamed response commits more than once).
    if (request && !state.tallied) {
      state.tallied = true
      if (!state.wrote) this.counters.writesSkipped++
    }
    this.#learn(state, request)
  }

  /** 'auto' mode learns, once per answered request of a stored session, whether its route wrote the session. */
  #learn(state: SessionState, request: RequestFacts | undefined): void {
    if (request && !state.finished && state.record !== undefined) {
      state.finished = true
      this.#concurrency?.policy.learn(request, state.changed)
    }
  }

  async #lock(parsed: ParsedSessionId, request: RequestFacts, besideFirstAdd: () => void) {
    const concurrency = this.#concurrency
    if (!concurrency || !concurrency.policy.shouldLock(request)) return undefined
    const keys = storageKeys(concurrency.prefix, parsed.random)
    try {
      const lock = await this.#options.metrics.time('lockWait', () =>
        // Asked after any wait in this process: the request ahead may have moved the session.
        concurrency.locks.acquire(
          parsed.random,
          () => concurrency.store.presumedNode(parsed),
          keys.lock,
          besideFirstAdd,
        ),
      )
      this.counters.locksAcquired++
      if (lock.waited) this.counters.lockWaits++
      return lock
    } catch (error) {
      if (!(error instanceof LockTimeoutError)) throw error
      const session = keys.digest.slice(0, 12)
      this.counters.lockTimeouts++
      this.#options.metrics.emit('lockTimeout', { session, path: request.path })
      concurrency.logger.warn({ path: request.path, session }, 'session-failover: session lock timed out')
      if (concurrency.lockTimeoutAction === 'proceed') return undefined
      throw error
    }
  }

  /**
   * Stores what must be stored, before the response goes out. `snapshot` is null when the application removed
   * the session object (express-session's `unset`).
   */
  commit(state: SessionState, snapshot: SessionSnapshot | null): Promise<CommitResult> {
    state.commitsRunning++
    const committing = this.#commit(state, snapshot)
    state.committing = committing
    return committing
  }

  /**
   * The commit of a request whose response the application has taken over (Fastify's `reply.hijack()`, for
   * server-sent events or a websocket, or socket.io's WebSocket upgrade): nothing waits for it. The session is
   * stored in the background and the lock released after it; a failure goes to `onFailure`, by default logged,
   * as nothing can answer it. Says at once whether to send the session's cookie with the id it has now. A write
   * that must move the session (its node died) gives it a new id that this response can no longer carry; the
   * old id still finds it, through failover.
   */
  commitDetached(
    state: SessionState,
    snapshot: SessionSnapshot | null,
    request: RequestFacts,
    onFailure: (error: unknown) => void = (error) =>
      this.#options.logger.warn(
        { session: logIdOf(this.store.recognize(state.id)?.random ?? ''), err: String(error) },
        'session-failover: the session of a taken-over response was not stored',
      ),
  ): boolean {
    const setCookie = snapshot !== null && state.shouldSetCookie(snapshot, this.policy)
    this.commit(state, snapshot).catch(onFailure)
    void this.finish(state, request)
    return setCookie
  }

  async #commit(state: SessionState, snapshot: SessionSnapshot | null): Promise<CommitResult> {
    try {
      if (snapshot === null) {
        if (this.policy.unsetDestroy && !state.destroyed) await this.#destroy(state)
        return { setCookie: false }
      }
      if (state.shouldSave(snapshot.data, this.policy)) {
        await this.#options.metrics.time('save', () => this.#save(state, snapshot))
        return { setCookie: state.shouldSetCookie(snapshot, this.policy) }
      }
      if (state.record && state.shouldTouch(snapshot.data, this.policy)) {
        // Not awaited: an expiry refresh acknowledges no change, so the response need not wait for it.
        void this.store.refresh(
          state.id,
          state.record,
          this.ttlSeconds(snapshot.expires, state.record.createdAt),
        )
      }
      return { setCookie: state.shouldSetCookie(snapshot, this.policy) }
    } finally {
      state.commitsRunning--
    }
  }

  /**
   * Resolves once every save, destroy, regenerate and reload the application began on this session has settled,
   * including those begun meanwhile; undefined when none is running. Adapters wait for it before they take the
   * session's snapshot for the commit: an application that calls `req.session.destroy()` and then redirects
   * without waiting for the callback still logs the user out before the response, and a regenerate's callback
   * has replaced the session by then. Never rejects: each operation's caller hears of its failure.
   */
  settled(state: SessionState): Promise<void> | undefined {
    const operations = state.operations
    if (operations === undefined || operations.size === 0) return undefined
    return Promise.allSettled(operations).then(() => this.settled(state))
  }

  /** Counts `operation` among the state's operations until it settles. */
  #tracked<T>(state: SessionState, operation: Promise<T>): Promise<T> {
    state.operations ??= new Set()
    const operations = state.operations
    operations.add(operation)
    const settle = () => operations.delete(operation)
    operation.then(settle, settle)
    return operation
  }

  /**
   * The application's own save, destroy, regenerate and reload wait for a commit in flight: after a streamed
   * response's first commit, or a Fastify reply's hijack(), the commit runs while the application goes on, and a
   * destroy racing it would be undone by its late backup write, a regenerate's new id by its end. Each is
   * tracked until it settles (settled()).
   */
  save(state: SessionState, snapshot: SessionSnapshot): Promise<void> {
    return this.#tracked(state, this.#saveAfterCommit(state, snapshot))
  }

  async #saveAfterCommit(state: SessionState, snapshot: SessionSnapshot): Promise<void> {
    if (state.committing) await state.committing.catch(ignore)
    await this.#save(state, snapshot)
  }

  async #save(state: SessionState, snapshot: SessionSnapshot): Promise<void> {
    if (!state.changed && !snapshot.data.equals(state.baseData)) state.changed = true
    const concurrency = this.#concurrency
    const now = Date.now()
    const createdAt = state.record?.createdAt ?? now
    const ttlSeconds = this.ttlSeconds(snapshot.expires, createdAt)
    const record: SessionRecord = {
      version: state.version + 1,
      writtenAt: now,
      createdAt,
      cookieJson: snapshot.cookieJson,
      data: snapshot.data,
      format: this.#options.serializer.tag,
    }
    // 'none', sticky mode, and sessions this request created (or regenerated): nobody else writes them.
    if (!concurrency?.policy.mergesUnlockedWrites || !state.record || state.renewed) {
      state.markSaved(await this.store.save(state.id, record, ttlSeconds), record)
      return
    }
    // Write only over the copy this request read (a lock can lapse, or its node die); if the copy changed
    // meanwhile, merge instead of overwriting. Without the lock too: when nothing was stored since the read, the
    // merge's result is this snapshot, and this spares its second read and its decoding of the stored session.
    let lateWrite: StaleWriteError['lateWrite']
    const locked = state.lock?.held === true
    if (state.cas) {
      try {
        const id = await concurrency.store.save(state.id, record, ttlSeconds, {
          ifUnchanged: state.cas,
          backupIfOlder: !locked,
        })
        state.markSaved(id, record)
        if (!locked) this.counters.merges++
        return
      } catch (error) {
        if (error instanceof StaleWriteError) lateWrite = error.lateWrite
        // Unlocked, a snapshot over the size limit may still fit merged onto what was stored since (a key that
        // another request deleted); if nothing was, the merge meets the same limit.
        else if (locked || !(error instanceof SessionTooLargeError)) throw error
      }
    }
    // Nothing keeps other requests of this session out: apply this request's changes onto what is stored.
    // Merges of one session in this process take turns, so they contend only with other instances.
    const changes = changesBetween(this.#options.serializer, state.baseData, snapshot.data)
    const key = this.store.recognize(state.id)?.random ?? state.id
    const merged = await this.#merges.run(key, () =>
      concurrency.store.merge(state.id, changes, snapshot.cookieJson, ttlSeconds, lateWrite),
    )
    this.counters.merges++
    if (!merged) {
      // Destroyed by another request meanwhile: it stays destroyed.
      state.destroyed = true
      return
    }
    this.counters.mergeConflicts += merged.conflicts
    // This request's own view stays the base of its next diff: keys others added are not "deleted" by it.
    state.markSaved(merged.id, merged.record, snapshot.data)
  }

  destroy(state: SessionState): Promise<void> {
    return this.#tracked(state, this.#destroyAfterCommit(state))
  }

  async #destroyAfterCommit(state: SessionState): Promise<void> {
    if (state.committing) await state.committing.catch(ignore)
    await this.#destroy(state)
  }

  /**
   * Destroys a session other than the request's own, by its id (an admin's "log this user out", or "log out my
   * other devices"). An id this store did not issue names no session: nothing to do.
   */
  async destroyById(id: string): Promise<void> {
    const parsed = this.store.recognize(id)
    if (!parsed) return
    if (!this.store.destroysEverywhere(parsed)) {
      throw new UnsupportedOperationError(
        "In sticky mode a session is destroyed by the instance that serves it (its route names it); this one would be written back from that instance's memory",
      )
    }
    await this.store.destroy(id)
  }

  async #destroy(state: SessionState): Promise<void> {
    state.destroyed = true
    state.wrote = true
    state.changed = true
    await this.store.destroy(state.id)
  }

  /**
   * After destroy(), for adapters whose request keeps a session object (Fastify): a new, empty session, stored
   * only if modified. The request keeps its lock.
   */
  startOver(destroyed: SessionState): SessionState {
    const next = this.#fresh(destroyed.cookieId)
    // A request already finished (a destroy() in Fastify's onResponse) commits nothing more: the new session is not
    // in flight, or close() would wait for it until its timeout.
    // Nor one whose finish() has begun (a hijacked reply's, or one whose client left): nothing would finish the new
    // state, which would stay counted in flight.
    if (!destroyed.finishing && this.#inFlight.delete(destroyed)) this.#inFlight.add(next)
    next.lock = destroyed.lock
    next.wrote = true
    next.changed = true
    return next
  }

  /** regenerate(): both copies of the old session are removed, then a new id is issued. */
  regenerate(state: SessionState): Promise<void> {
    return this.#tracked(state, this.#regenerate(state))
  }

  async #regenerate(state: SessionState): Promise<void> {
    if (state.committing) await state.committing.catch(ignore)
    state.wrote = true
    state.changed = true
    try {
      await this.store.destroy(state.id)
    } finally {
      // Renewed even when the old copies could not be deleted, as express-session does: a login made by code
      // that ignores the error must not be stored under the id the client had before it (session fixation).
      state.renew(this.store.newSessionId())
    }
  }

  /** reload(): re-reads the stored session; null when it no longer exists (or cannot be read). */
  reload(state: SessionState): Promise<SessionContent | null> {
    return this.#tracked(state, this.#reload(state))
  }

  async #reload(state: SessionState): Promise<SessionContent | null> {
    if (state.committing) await state.committing.catch(ignore)
    const loaded = await this.store.load(state.id)
    const found = loaded && this.#readable(loaded)
    if (!found) return null
    state.adopt(found.loaded, this.policy)
    return found.content
  }

  /**
   * A cookie with an expiry sets the TTL; a browser-session cookie gets the configured `ttl`. Neither outlives
   * the absolute lifetime, so the cache drops a session when it ends.
   */
  ttlSeconds(expires: Date | null, createdAt: number): number {
    const now = Date.now()
    const idle = expires ? Math.ceil((expires.getTime() - now) / 1000) : this.#options.defaultTtlSeconds
    const absoluteTimeoutMs = this.#options.absoluteTimeoutMs
    const left =
      absoluteTimeoutMs === undefined ? idle : Math.ceil((createdAt + absoluteTimeoutMs - now) / 1000)
    const ttl = Math.max(1, Math.min(idle, left))
    // Never NaN (snapshot() refuses an expiry that is no date); should one come, the configured TTL, not "never".
    return Number.isFinite(ttl) ? ttl : this.#options.defaultTtlSeconds
  }
}
