import type { SessionBackend } from './backend.js'
import { type LifecyclePolicy, type SessionSnapshot, SessionState } from './session-state.js'

export interface OpenedSession {
  readonly state: SessionState
  /** Stored cookie and data JSON, for a session that was found; undefined for a new one. */
  readonly stored: { readonly cookieJson: string; readonly dataJson: string } | undefined
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
  readonly #defaultTtlSeconds: number

  constructor(store: SessionBackend, policy: LifecyclePolicy, defaultTtlSeconds: number) {
    this.store = store
    this.policy = policy
    this.#defaultTtlSeconds = defaultTtlSeconds
  }

  /** Loads the presented session, or starts a new one. Rejects with AllNodesDownError when nothing can answer. */
  async open(cookieId: string | undefined): Promise<OpenedSession> {
    const loaded = cookieId === undefined ? null : await this.store.load(cookieId)
    if (cookieId !== undefined && loaded) {
      return { state: SessionState.loaded(cookieId, loaded, this.policy), stored: loaded.record }
    }
    return { state: SessionState.fresh(cookieId, this.store.newSessionId()), stored: undefined }
  }

  /**
   * Stores what must be stored, before the response goes out. `snapshot` is null when the application removed
   * the session object (express-session's `unset`).
   */
  async commit(state: SessionState, snapshot: SessionSnapshot | null): Promise<CommitResult> {
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
    return { setCookie: this.shouldSetCookie(state, snapshot) }
  }

  shouldSetCookie(state: SessionState, snapshot: SessionSnapshot): boolean {
    return state.shouldSetCookie(snapshot, this.policy)
  }

  async save(state: SessionState, snapshot: SessionSnapshot): Promise<void> {
    const record = {
      version: state.version + 1,
      writtenAt: Date.now(),
      cookieJson: snapshot.cookieJson,
      dataJson: snapshot.dataJson,
    }
    const id = await this.store.save(state.id, record, this.ttlSeconds(snapshot.expires))
    state.markSaved(id, record)
  }

  async destroy(state: SessionState): Promise<void> {
    state.destroyed = true
    await this.store.destroy(state.id)
  }

  /** regenerate(): both copies of the old session are removed, then a new id is issued. */
  async regenerate(state: SessionState): Promise<void> {
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
