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
  regenerate(session: FastifySession): Promise<void>
  destroy(): Promise<void>
  reload(session: FastifySession): Promise<void>
}

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

  get<T = unknown>(key: string): T | undefined {
    return (Object.hasOwn(this, key) ? this[key] : undefined) as T | undefined
  }

  set(key: string, value: unknown): void {
    if (RESERVED.has(key))
      throw new TypeError(`'${key}' is part of the session's API and cannot be a session key`)
    Object.defineProperty(this, key, { value, enumerable: true, writable: true, configurable: true })
  }

  /** Stores the session now (it is also stored, if changed, before the response goes out). */
  save(): Promise<void> {
    return this.#control.save(this)
  }

  /** A new id and empty data; both copies of the old session are removed. Call it on login. */
  regenerate(): Promise<void> {
    return this.#control.regenerate(this)
  }

  /** Removes both copies; the request has a new, empty session afterwards, which is stored only if modified. */
  async destroy(): Promise<void> {
    await this.#control.destroy()
    this.replaceData({})
  }

  /** Reads the stored session again. */
  reload(): Promise<void> {
    return this.#control.reload(this)
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

// Methods are defined on the prototype, so they are never own (stored) properties; replaceData too.
Object.defineProperty(FastifySession.prototype, 'replaceData', { enumerable: false })
