/**
 * How parallel requests of one session are kept from losing each other's changes (non-sticky mode). A function is
 * given the framework's request: Node's IncomingMessage under Express (socket.io's handshake passes one that
 * Express never saw), FastifyRequest under Fastify.
 */
export type LockingMode<Request = unknown> =
  | 'none'
  | 'all'
  | 'auto'
  | 'merge'
  | RegExp
  | ((request: Request) => boolean)

export interface RequestFacts {
  readonly method: string
  readonly path: string
  /** The framework's request object, for a function `lockingMode`. */
  readonly raw: unknown
  /**
   * "METHOD /path" with id segments as `:id`, once 'auto' mode has computed it: both shouldLock() and learn()
   * need it. Adapters start it undefined, so every request object has the same shape, or with the framework's
   * route when it knows it before the session is opened (Fastify's "METHOD /users/:name").
   */
  route?: string | undefined
}

/** Routes remembered by 'auto' mode, of each kind (read-only, writing). */
const LEARNED_ROUTES = 2000
/**
 * A route longer than this is not learned, and so always locks: a flood of long paths (up to a URL's 16 KB) would
 * otherwise hold tens of megabytes in the learned routes.
 */
const LONGEST_LEARNED_ROUTE = 512
/** Whole path segments that are ids (numbers, uuids, long tokens): one route, not thousands. */
const ID_SEGMENTS =
  /(?<=^|\/)(?:\d+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[A-Za-z0-9_-]{20,})(?=\/|$)/gi

/**
 * Which requests lock their session, and how a request that does not hold a lock writes:
 * - 'none': no lock; a write overwrites (last writer wins, as express-session).
 * - 'all': every request of an existing session holds its lock.
 * - 'auto': every request locks, except on routes learned to only read the session: a request that did not
 *   modify it marks its route read-only, unless the route has been seen writing. One that modifies it marks the
 *   route as writing, for good (as memcached-session-manager's blacklist): a route that writes only sometimes
 *   (a form refused with a 400, an "add if absent") would otherwise run its next requests unlocked, and two of
 *   them in parallel would lose one's change to the other's.
 * - 'merge': no lock; a write that finds the stored session changed since its read re-reads it and applies only
 *   this request's changed keys.
 * - a RegExp tested against "METHOD /path", or a function of the request: true locks.
 * In every mode but 'none', a write made without the lock (an unlocked route, a lock that expired, a request
 * whose client went away) is a merge, never a blind overwrite.
 */
export class LockingPolicy {
  readonly #mode: LockingMode
  /**
   * Routes learned read-only, least recently seen first: each read-only request moves its route to the end. A
   * plain set, not an LRU cache: asked and told on every request, where the cache's bookkeeping cost more than
   * the lookup. Full, it forgets the route seen longest ago, which locks once more and is learned again.
   */
  readonly #readOnlyRoutes = new Set<string>()
  /** Routes seen writing, never learned read-only again; full, the one seen writing longest ago is forgotten. */
  readonly #writingRoutes = new Set<string>()

  constructor(mode: LockingMode) {
    // A global or sticky RegExp keeps state between test() calls; a copy without those flags does not.
    this.#mode = mode instanceof RegExp ? new RegExp(mode.source, mode.flags.replace(/[gy]/g, '')) : mode
  }

  get mergesUnlockedWrites(): boolean {
    return this.#mode !== 'none'
  }

  shouldLock(request: RequestFacts): boolean {
    const mode = this.#mode
    if (mode === 'none' || mode === 'merge') return false
    if (mode === 'all') return true
    if (mode === 'auto') return !this.#readOnlyRoutes.has(routeKey(request))
    if (mode instanceof RegExp) return mode.test(`${request.method} ${request.path}`)
    return mode(request.raw) === true
  }

  /** 'auto' mode learns from every finished request whether its route writes the session. */
  learn(request: RequestFacts, modified: boolean): void {
    if (this.#mode !== 'auto') return
    const key = routeKey(request)
    if (key.length > LONGEST_LEARNED_ROUTE) return
    if (modified) {
      this.#readOnlyRoutes.delete(key)
      remember(this.#writingRoutes, key)
    } else if (!this.#writingRoutes.has(key)) remember(this.#readOnlyRoutes, key)
  }
}

/** Adds `key` to `routes` as the one seen last (at the end), forgetting the one seen longest ago when full. */
function remember(routes: Set<string>, key: string): void {
  // Taken out and put back: a hot route stays at the end instead of being forgotten every 2 000 new routes.
  if (!routes.delete(key) && routes.size >= LEARNED_ROUTES) {
    routes.delete(routes.values().next().value as string)
  }
  routes.add(key)
}

/** The request's route, computed once per request. */
function routeKey(request: RequestFacts): string {
  request.route ??= `${request.method} ${request.path.replace(ID_SEGMENTS, ':id')}`
  return request.route
}
