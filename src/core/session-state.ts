import type { SessionRecord } from './codec.js'
import type { SessionLock } from './locking.js'
import type { LoadedSession } from './store.js'

/** express-session's save/cookie options, with its meanings. */
export interface LifecyclePolicy {
  readonly resave: boolean
  readonly saveUninitialized: boolean
  readonly rolling: boolean
  readonly unsetDestroy: boolean
}

/** Serialized session data (without the cookie) as the adapter sees it when the response is about to go out. */
export interface SessionSnapshot {
  /** Session data in the configured serializer's format. */
  readonly data: Buffer
  readonly cookieJson: string
  /** Cookie expiry; null for a browser-session cookie. */
  readonly expires: Date | null
}

/**
 * What one request knows about its session, and the decisions express-session users expect from it: save when
 * modified (or per resave/saveUninitialized), touch when untouched, set the cookie when the id is new or moved.
 * Modification is decided by comparing serialized data, so nothing is hashed or serialized twice.
 */
export class SessionState {
  /** The id the client presented (validly signed), if any. */
  readonly cookieId: string | undefined
  /** The id the session has now; changes on relocation and regenerate. */
  id: string
  /** The id and data the request started with. */
  readonly originalId: string
  originalData: Buffer
  /** The id and data known to be in the store; undefined when nothing is stored yet. */
  savedId: string | undefined = undefined
  savedData: Buffer | undefined = undefined
  /** The stored record this request read, used to heal a missing backup on refresh. */
  record: SessionRecord | undefined = undefined
  /** The session must be written this request: it was restored from a backup or relocated. */
  mustWrite = false
  destroyed = false
  /** The session's lock, when this request holds one. */
  lock: SessionLock | undefined = undefined
  /** A write of this session made by this request (counted by stats()). */
  wrote = false
  /**
   * The request changed the session: it stored data other than what it had read, destroyed or regenerated it.
   * What 'auto' locking learns from: a write the library makes for its own reasons (a session moved off a dead
   * node, restored from its backup, rewritten under a new key) must not mark a read-only route as writing.
   */
  changed = false
  /** The commit in progress; the lock is released only after it. */
  committing: Promise<unknown> | undefined = undefined
  /** Commits begun and not yet settled (SessionEngine.commit). */
  commitsRunning = 0
  /**
   * The application's own saves, destroys, regenerates and reloads of this session not yet settled: the commit
   * and the lock's release wait for them (SessionEngine.settled), whether or not the application did. Made by
   * the first: most requests never call one, and every request has a state.
   */
  operations: Set<Promise<unknown>> | undefined = undefined
  /** The cookie was verified by a rotated-out secret: it is sent again, signed with the current one. */
  resign = false
  /** finish() ran: the lock is released and the route learned. */
  finished = false
  /** The last finish() begun (SessionEngine.finish), and the commit it waits for. */
  finishing: Promise<void> | undefined = undefined
  finishedAfter: Promise<unknown> | undefined = undefined
  /** The request was counted (as a write, or as a write skipped). */
  tallied = false
  /** regenerate() replaced the session: its writes concern a new session nobody else knows. */
  renewed = false
  /** The primary copy's compare-and-set token as read (until this request writes). */
  cas: LoadedSession['cas'] = undefined

  /** What a merge diffs against: the data this request last read (its load, a reload()) or wrote. */
  #base: Buffer

  private constructor(cookieId: string | undefined, id: string, data: Buffer) {
    this.cookieId = cookieId
    this.id = id
    this.originalId = id
    this.originalData = data
    this.#base = data
  }

  /** `empty`: the serializer's `{}`. */
  static fresh(cookieId: string | undefined, id: string, empty: Buffer): SessionState {
    return new SessionState(cookieId, id, empty)
  }

  static loaded(cookieId: string, loaded: LoadedSession, policy: LifecyclePolicy): SessionState {
    const state = new SessionState(cookieId, loaded.id, loaded.record.data)
    state.adopt(loaded, policy)
    return state
  }

  /** Takes a freshly read record as the stored state (initial load and reload()). */
  adopt(loaded: LoadedSession, policy: LifecyclePolicy): void {
    this.id = loaded.id
    this.record = loaded.record
    this.cas = loaded.cas
    this.mustWrite = loaded.mustWrite
    // Also with resave, where nothing counts as saved: a reload()'s data is what this request's changes are
    // made against, not the first load's (whose differences would all look like this request's own).
    this.#base = loaded.record.data
    if (!policy.resave) {
      this.savedId = loaded.id
      this.savedData = loaded.record.data
    }
  }

  /** regenerate(): a new, empty, unsaved session under a new id. */
  renew(id: string): void {
    this.renewed = true
    this.cas = undefined
    this.id = id
    this.savedId = undefined
    this.savedData = undefined
    this.record = undefined
    this.mustWrite = false
    this.destroyed = false
  }

  get version(): number {
    return this.record?.version ?? 0
  }

  isModified(data: Buffer): boolean {
    return this.originalId !== this.id || !this.originalData.equals(data)
  }

  isSaved(data: Buffer): boolean {
    return this.savedId === this.id && this.savedData?.equals(data) === true
  }

  shouldSave(data: Buffer, policy: LifecyclePolicy): boolean {
    if (this.mustWrite) return true
    const uninitializedNew =
      !policy.saveUninitialized && this.savedData === undefined && this.cookieId !== this.id
    return uninitializedNew ? this.isModified(data) : !this.isSaved(data)
  }

  /**
   * A stored session that is not being saved gets its expiry refreshed (and its copies verified). Unlike
   * express-session this does not require the cookie to carry the current id: the refresh is about the stored
   * copies, which a relocated session needs as much as any other.
   */
  shouldTouch(data: Buffer, policy: LifecyclePolicy): boolean {
    return this.record !== undefined && !this.shouldSave(data, policy)
  }

  shouldSetCookie(snapshot: SessionSnapshot, policy: LifecyclePolicy): boolean {
    if (this.resign && !this.destroyed) return true
    if (this.cookieId !== this.id) {
      // A stored session whose id moved (relocation, takeover, regenerate) always sends the id it has now.
      return policy.saveUninitialized || this.record !== undefined || this.isModified(snapshot.data)
    }
    return policy.rolling || (snapshot.expires !== null && this.isModified(snapshot.data))
  }

  /** `view`: the data as this request sees it, when the stored record holds more (a merge). */
  markSaved(id: string, record: SessionRecord, view = record.data): void {
    this.id = id
    this.savedId = id
    this.savedData = view
    this.#base = view
    this.record = record
    this.cas = undefined
    this.mustWrite = false
    this.wrote = true
    // Once stored, a regenerated session is known: its id may have gone out (a streamed response's first chunk),
    // and another request of it may write. Later writes of this request merge, as a new session's do.
    this.renewed = false
  }

  /** What a merge diffs against: the data this request last read or wrote. */
  get baseData(): Buffer {
    return this.#base
  }
}
