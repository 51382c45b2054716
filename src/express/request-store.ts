import type { IncomingMessage } from 'node:http'
import session from 'express-session'
import type { SessionEngine } from '../core/engine.js'
import type { SessionContent } from '../core/serializer.js'
import type { SessionState } from '../core/session-state.js'
import { UnsupportedOperationError } from '../errors.js'
import type { SessionCookie } from '../session-cookie.js'
import { parseSessionId } from '../session-id.js'

export type SessionRequest = IncomingMessage & {
  session?: session.Session & Partial<session.SessionData>
  sessionID: string
  sessionStore: unknown
  secure?: boolean
}

type Callback = (error?: unknown) => void

/** Calls back outside the promise chain, as a Node callback: an exception in it is the caller's, not a rejection. */
function later(callback: Callback, error?: unknown): void {
  process.nextTick(callback, error)
}

/** express-session's Session class, with the constructor its type declarations keep private. */
export const SessionClass = session.Session as unknown as new (
  req: SessionRequest,
  data?: Record<string, unknown>,
) => session.Session & Partial<session.SessionData>

/**
 * What express-session's Session methods (save, reload, destroy, regenerate) call through `req.sessionStore`,
 * bound to one request's SessionState. Translation only: each method delegates to the engine. Applications call
 * it too, with other sessions' ids: destroy() takes any id (logging another user or device out); get() and set()
 * of another session call back with UnsupportedOperationError rather than act on this request's session.
 */
export class RequestStore {
  readonly #req: SessionRequest
  readonly #engine: SessionEngine
  readonly #state: SessionState
  readonly #newCookie: (req: SessionRequest) => SessionCookie

  constructor(
    req: SessionRequest,
    engine: SessionEngine,
    state: SessionState,
    newCookie: (req: SessionRequest) => SessionCookie,
  ) {
    this.#req = req
    this.#engine = engine
    this.#state = state
    this.#newCookie = newCookie
  }

  /** A new, empty session under `state.id`, with cookie options applied. */
  generate(): void {
    this.#req.sessionID = this.#state.id
    const fresh = new SessionClass(this.#req)
    fresh.cookie = this.#newCookie(this.#req)
    this.#req.session = fresh
  }

  /** Builds req.session from stored content, as express-session's Store#createSession. */
  inflate(content: SessionContent): void {
    this.#req.sessionID = this.#state.id
    session.Store.prototype.createSession.call(
      this,
      this.#req as never,
      {
        ...content.data,
        cookie: content.cookie,
      } as never,
    )
  }

  set(id: string, sess: session.Session, callback: Callback = () => {}): void {
    if (this.#other(id, 'set', callback)) return
    // In a promise: a session that cannot be serialized reaches the callback, not the caller's stack.
    new Promise<void>((resolve) =>
      resolve(this.#engine.save(this.#state, this.#engine.snapshot(sess, sess.cookie))),
    ).then(
      () => {
        if (this.#req.sessionID !== this.#state.id && this.#req.session === sess) {
          // Relocated while saving: the id (and so Session#id) changed; keep req.session consistent with it.
          const { cookie, ...data } = sess as unknown as Record<string, unknown>
          this.#req.sessionID = this.#state.id
          const moved = new SessionClass(this.#req, data)
          moved.cookie = cookie as session.Cookie
          this.#req.session = moved
        }
        later(callback)
      },
      (error: unknown) => later(callback, error),
    )
  }

  get(id: string, callback: (error: unknown, sess?: session.SessionData | null) => void): void {
    if (this.#other(id, 'get', callback)) return
    this.#engine.reload(this.#state).then(
      (content) => {
        const sess =
          content && ({ ...content.data, cookie: content.cookie } as unknown as session.SessionData)
        this.#req.sessionID = this.#state.id
        process.nextTick(callback, null, sess)
      },
      (error: unknown) => process.nextTick(callback, error),
    )
  }

  destroy(id: string, callback: Callback = () => {}): void {
    const destroying = this.#isOwn(id) ? this.#engine.destroy(this.#state) : this.#engine.destroyById(id)
    destroying.then(
      () => later(callback),
      (error: unknown) => later(callback, error),
    )
  }

  regenerate(_req: unknown, callback: Callback = () => {}): void {
    const before = this.#state.id
    this.#engine.regenerate(this.#state).then(
      () => {
        this.generate()
        later(callback)
      },
      (error: unknown) => {
        // The old copies could not be deleted, but the session was renewed all the same (see the engine).
        if (this.#state.id !== before) this.generate()
        later(callback, error)
      },
    )
  }

  createSession(req: SessionRequest, sess: session.SessionData): session.Session {
    return session.Store.prototype.createSession.call(this, req as never, sess)
  }

  touch(_id: string, _sess: unknown, callback: Callback = () => {}): void {
    later(callback)
  }

  /**
   * Whether `id` is this request's session: the id express-session's Session methods pass. A session moved to
   * another node (or taken over, in sticky mode) keeps its random part under a new id, while a Session object
   * keeps the id it was built with.
   */
  #isOwn(id: string): boolean {
    if (id === this.#req.sessionID || id === this.#state.id) return true
    const random = parseSessionId(id)?.random
    return random !== undefined && random === parseSessionId(this.#state.id)?.random
  }

  /** For another session's id, calls back with UnsupportedOperationError and says so. */
  #other(id: string, method: 'get' | 'set', callback: Callback): boolean {
    if (this.#isOwn(id)) return false
    later(
      callback,
      new UnsupportedOperationError(
        `req.sessionStore.${method}() reads and writes this request's session only; another session's id was given (destroy() takes any id)`,
      ),
    )
    return true
  }
}
