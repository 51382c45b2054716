import type { Session } from 'fastify'
import type { SessionCookie } from '../session-cookie.js'

/** Names of the session's own API: never stored as data, and refused by set(). */
const RESERVED = new Set([
  'cookie',
  'sessionId',
  'get',
  'set',
  'save',
  'regenerate',
  'destroy',
  'reload',
  'touch',
  'replaceData',
])

/** What a FastifySession asks of its request: every decision stays in the engine. */
export interface SessionControl {
  readonly id: () => string
  save(session: FastifySession): Promise<void>
  /** `keep`: names of keys that the new session keeps. */
  regenerate(session: FastifySession, keep: readonly string[]): Promise<void>
  destroy(session: FastifySession): Promise<void>
  reload(session: FastifySession): Promise<void>
}

/** A callback in @fastify/session's style: `null`, or the error. */
export type SessionCallback = (error: Error | null) => void

/**
 * `request.session` under Fastify. Data lives on the object as with express-session (`request.session.cart`),
 * and also through `get`/`set` as with @fastify/session. Methods and the private handle are not data: only own
 * enumerable properties are stored (and `cookie` is kept apart).
 */
export class FastifySession {
  /** express-session's Cookie: maxAge, expires and the rest of the cookie options of this session. */
  cookie: SessionCookie;
  [key: string]: unknown
  readonly #control: SessionControl

  constructor(control: SessionControl, data: Record<string, unknown>, cookie: SessionCookie) {
    this.#control = control
    this.cookie = cookie
    this.replaceData(data)
  }

  /** The session id (changes when the session is relocated or regenerated). */
  get sessionId(): string {
    return this.#control.id()
  }

  /** A key of your `Session` declaration comes typed; any other, as you say (`get<string[]>('cart')`). */
  get<K extends keyof Session>(key: K): Session[K] | undefined
  get<T = unknown>(key: string): T | undefined
  get(key: string): unknown {
    return Object.hasOwn(this, key) ? this[key] : undefined
  }

  /** A key of your `Session` declaration takes its declared type; any other key, any value. */
  set<K extends keyof Session & string>(key: K, value: Session[K]): void
  set<K extends string>(key: K extends keyof Session ? never : K, value: unknown): void
  set(key: string, value: unknown): void {
    if (RESERVED.has(key))
      throw new TypeError(`'${key}' is part of the session's API and cannot be a session key`)
    Object.defineProperty(this, key, { value, enumerable: true, writable: true, configurable: true })
  }

  // Each method returns a promise, or, given a callback as @fastify/session's methods take one, calls it instead
  // (code written for @fastify/session would otherwise wait for a callback that never comes).

  /** Stores the session now (it is also stored, if changed, before the response goes out). */
  save(): Promise<void>
  save(callback: SessionCallback): void
  save(callback?: SessionCallback): Promise<void> | undefined {
    return settle(this.#control.save(this), callback)
  }

  /**
   * A new id and empty data, but for the keys named in `keep`; both copies of the old session are removed. Call
   * it on login.
   */
  regenerate(keep?: readonly string[]): Promise<void>
  regenerate(callback: SessionCallback): void
  regenerate(keep: readonly string[], callback: SessionCallback): void
  regenerate(
    keepOrCallback?: readonly string[] | SessionCallback,
    callback?: SessionCallback,
  ): Promise<void> | undefined {
    const keep = Array.isArray(keepOrCallback) ? keepOrCallback : []
    const done = typeof keepOrCallback === 'function' ? keepOrCallback : callback
    return settle(this.#control.regenerate(this, keep), done)
  }

  /** Removes both copies; the request has a new, empty session afterwards, which is stored only if modified. */
  destroy(): Promise<void>
  destroy(callback: SessionCallback): void
  destroy(callback?: SessionCallback): Promise<void> | undefined {
    return settle(
      this.#control.destroy(this).then(() => this.replaceData({})),
      callback,
    )
  }

  /** Reads the stored session again. */
  reload(): Promise<void>
  reload(callback: SessionCallback): void
  reload(callback?: SessionCallback): Promise<void> | undefined {
    return settle(this.#control.reload(this), callback)
  }

  /** Resets the cookie's expiry, as express-session's touch(). */
  touch(): void {
    this.cookie.maxAge = this.cookie.originalMaxAge ?? undefined
  }

  /** Internal: replaces the data (regenerate, reload). */
  replaceData(data: Record<string, unknown>): void {
    for (const key of Object.keys(this)) if (key !== 'cookie') delete this[key]
    for (const [key, value] of Object.entries(data)) if (!RESERVED.has(key)) this.set(key, value)
  }
}

/** The promise, or, given a callback, undefined and the callback called (outside the promise: what it throws is thrown). */
function settle(done: Promise<void>, callback: SessionCallback | undefined): Promise<void> | undefined {
  if (typeof callback !== 'function') return done
  done.then(
    () => process.nextTick(callback, null),
    (error: unknown) => process.nextTick(callback, error instanceof Error ? error : new Error(String(error))),
  )
  return undefined
}

// Methods are defined on the prototype, so they are never own (stored) properties; replaceData too.
Object.defineProperty(FastifySession.prototype, 'replaceData', { enumerable: false })
