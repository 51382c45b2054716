import type { IncomingMessage } from 'node:http'
import session from 'express-session'
import type { SessionEngine } from '../core/engine.js'
import type { SessionContent } from '../core/serializer.js'
import type { SessionState } from '../core/session-state.js'
import type { SessionCookie } from '../session-cookie.js'

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
 * bound to one request's SessionState. Translation only: each method delegates to the engine.
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

  set(_id: string, sess: session.Session, callback: Callback = () => {}): void {
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

  get(_id: string, callback: (error: unknown, sess?: session.SessionData | null) => void): void {
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

  destroy(_id: string, callback: Callback = () => {}): void {
    this.#engine.destroy(this.#state).then(
      () => later(callback),
      (error: unknown) => later(callback, error),
    )
  }

  regenerate(_req: unknown, callback: Callback = () => {}): void {
    this.#engine.regenerate(this.#state).then(
      () => {
        this.generate()
        later(callback)
      },
      (error: unknown) => later(callback, error),
    )
  }

  createSession(req: SessionRequest, sess: session.SessionData): session.Session {
    return session.Store.prototype.createSession.call(this, req as never, sess)
  }

  touch(_id: string, _sess: unknown, callback: Callback = () => {}): void {
    later(callback)
  }
}
