import type { ServerResponse } from 'node:http'
import { parse as parseCookie } from 'cookie'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { CookieVerifier } from '../core/cookie-value.js'
import type { RequestFacts } from '../core/locking-policy.js'
import type { SessionContent } from '../core/serializer.js'
import type { SessionState } from '../core/session-state.js'
import { createEngine } from '../create-engine.js'
import { endOfTurn } from '../end-of-turn.js'
import { SessionFailoverError } from '../errors.js'
import { operationsOf, type SessionOperations } from '../operator.js'
import { parseOptions, type SessionFailoverOptions } from '../options.js'
import {
  isSecureConnection,
  newSessionCookie,
  type SessionCookie,
  sessionCookieHeader,
  storedSessionCookie,
} from '../session-cookie.js'
import { FastifySession, type SessionControl } from './session.js'
import { discardBody, holdWhileStored, isStreamed } from './streamed-body.js'

declare module 'fastify' {
  /**
   * Your session's data, declared by merging as with @fastify/session:
   * `declare module 'fastify' { interface Session { user: User } }` types `request.session.user`,
   * `request.session.get('user')` and `request.session.set('user', …)`.
   */
  interface Session {}
  interface FastifyRequest {
    /** The session (null outside the cookie path). */
    session: FastifySession & Session
  }
  interface FastifyInstance {
    /** Health, statistics, events and live node changes of the session layer (close() runs on app close). */
    sessionFailover: Omit<SessionOperations, 'close'>
  }
}

interface RequestContext {
  /** Replaced by a fresh one when the session is destroyed: the request goes on with a new, empty session. */
  state: SessionState
  readonly facts: RequestFacts
  /** The commit ran: an error reply it caused passes through onSend again and must not commit again. */
  committed: boolean
  /** The reply's own hijack(), called by the one this plugin puts in its place. */
  readonly hijack: FastifyReply['hijack']
}

/** The plugin's options: the Express middleware's, with a function `lockingMode` given the FastifyRequest. */
export type FastifySessionFailoverOptions = SessionFailoverOptions<FastifyRequest>

const COOKIE_PLUGIN_AFTER =
  'session-failover: @fastify/cookie was registered after this plugin. Register it before: otherwise the ' +
  'cookies a route sets also go out on the error reply that replaces a reply whose session could not be stored.'

/** A request with @fastify/cookie's `request.cookies`, typed here without depending on it. */
type ParsedCookies = { cookies?: Record<string, string | undefined> | null }

/**
 * Fastify plugin with the same options, core and guarantees as the Express middleware: the session is loaded
 * (and locked, per `lockingMode`) in onRequest, and committed in onSend, before the reply is sent: a failed
 * write becomes the error reply (503 when no node is reachable), never a 2xx.
 */
const plugin: FastifyPluginAsync<FastifySessionFailoverOptions> = async (fastify, options) => {
  // Fastify's own register options (a plugin's log level) reach the plugin too: they are not ours to refuse.
  // (`prefix` is both Fastify's and ours; this plugin declares no routes, so only ours means anything.)
  const {
    logLevel: _logLevel,
    logSerializers: _logSerializers,
    ...own
  } = options as FastifySessionFailoverOptions & {
    logLevel?: unknown
    logSerializers?: unknown
  }
  const config = parseOptions(own)
  const engine = createEngine(config)
  const cookiePath = config.cookie.path ?? '/'
  const verifier = new CookieVerifier(config.secrets)
  const contexts = new WeakMap<FastifyRequest, RequestContext>()
  // The session cookie is read from @fastify/cookie's `request.cookies` when the application registered it
  // first (it also adds `parseCookie`; another plugin may have taken the name `cookies`), and otherwise, or when
  // it parses in a later hook, from the header. Not registered here: a dependency on it would tie every install
  // to its own dependencies' Node versions (its cookie 2 needs Node 22), and an application that registers it
  // after this plugin would be refused a second registration.
  const cookiesParsed = fastify.hasDecorator('parseCookie')
  if (!cookiesParsed) {
    fastify.addHook('onReady', async () => {
      // Registered after this plugin, @fastify/cookie writes a route's cookies in an onSend hook that runs after
      // this plugin's, so they also go out on the error reply that replaces a reply whose session failed.
      // A process warning, as for a missing `nodes`: the logger is silent unless the application gave one.
      if (fastify.hasDecorator('parseCookie')) {
        process.emitWarning(COOKIE_PLUGIN_AFTER, {
          type: 'SessionFailoverWarning',
          code: 'ESF_COOKIE_PLUGIN_AFTER',
        })
      }
    })
  }
  fastify.decorateRequest('session', null as unknown as FastifySession)
  const { close: _closedWithTheApp, ...operations } = operationsOf(engine, () => engine.close())
  fastify.decorate('sessionFailover', operations)

  const isSecure = (request: FastifyRequest): boolean =>
    isSecureConnection(request.raw, config.proxy, request.protocol === 'https')
  const newCookie = (request: FastifyRequest): SessionCookie =>
    newSessionCookie(config.cookie, isSecure(request))
  const cookieOf = (content: SessionContent): SessionCookie => storedSessionCookie(content.cookie)
  const snapshotOf = (session: FastifySession) => {
    // The prototype's: a session key may not shadow the API, but a plain assignment could still try.
    FastifySession.prototype.touch.call(session)
    return engine.session.snapshot(session, session.cookie)
  }
  /** The request's session as it is now, or null when the application removed it (`request.session = null`). */
  const currentSnapshot = (request: FastifyRequest) => {
    const session: unknown = request.session
    return session instanceof FastifySession ? snapshotOf(session) : null
  }
  const cookieHeader = (request: FastifyRequest, state: SessionState, session: FastifySession) =>
    !session.cookie.secure || isSecure(request)
      ? sessionCookieHeader(config.name, state.id, config.secrets[0] as string, session.cookie)
      : undefined

  // A reply the application takes over (reply.hijack(): server-sent events, websockets) passes through no
  // onSend: its session is committed when it is taken over instead, or it would never be stored, and in
  // non-sticky mode its lock would be held until the connection closed. A session that cannot be serialized
  // throws here, in the handler, before the reply is taken over, so Fastify still answers the error.
  function hijackStoringSession(this: FastifyReply): FastifyReply {
    const context = contexts.get(this.request) as RequestContext
    if (!context.committed) {
      const session: unknown = this.request.session
      const snapshot = currentSnapshot(this.request)
      context.committed = true
      const setCookie = engine.session.commitDetached(context.state, snapshot, context.facts)
      const header =
        setCookie && session instanceof FastifySession && !this.raw.headersSent
          ? cookieHeader(this.request, context.state, session)
          : undefined
      if (header) this.raw.appendHeader('set-cookie', header)
    }
    return context.hijack.call(this)
  }

  const control = (request: FastifyRequest, context: RequestContext): SessionControl => ({
    id: () => context.state.id,
    save: async (session) =>
      engine.session.save(context.state, engine.session.snapshot(session, session.cookie)),
    async regenerate(session, keep) {
      const kept = Object.fromEntries(
        keep.filter((key) => Object.hasOwn(session, key)).map((key) => [key, session[key]]),
      )
      const before = context.state.id
      try {
        await engine.session.regenerate(context.state)
      } finally {
        // Renewed even when the old copies could not be deleted (see the engine): the data goes with the old id.
        if (context.state.id !== before) {
          session.replaceData(kept)
          session.cookie = newCookie(request)
        }
      }
    },
    async destroy(session) {
      await engine.session.destroy(context.state)
      context.state = engine.session.startOver(context.state)
      // The old session's cookie (a remember-me maxAge) does not carry over to the new, anonymous one.
      session.cookie = newCookie(request)
    },
    async reload(session) {
      const content = await engine.session.reload(context.state)
      if (!content) throw new Error('failed to load session')
      session.replaceData(content.data)
      session.cookie = cookieOf(content)
    },
  })

  fastify.addHook('onRequest', async (request, reply) => {
    const path = request.url.split('?')[0] ?? '/'
    if (!path.startsWith(cookiePath)) return
    const raw =
      (cookiesParsed ? (request as ParsedCookies).cookies?.[config.name] : undefined) ??
      parseCookie(request.headers.cookie ?? '')[config.name]
    const presented = verifier.idOf(raw)
    // 'auto' learns by Fastify's route ('/users/:name'), not by each path it serves ('/users/alice').
    const pattern = request.routeOptions.url
    const route = pattern === undefined ? undefined : `${request.method} ${pattern}`
    const facts: RequestFacts = { method: request.method, path, raw: request, route }
    const { state, content } = await engine.session.open(presented, facts)
    // A client that left while this request waited for its lock closed the reply before there was anything to
    // release: release it now.
    if (request.raw.socket?.destroyed) await engine.session.finish(state)
    const context: RequestContext = { state, facts, committed: false, hijack: reply.hijack }
    contexts.set(request, context)
    reply.hijack = hijackStoringSession
    // A reply that failed, or whose client left: its lock goes when the reply closes, as in Express (after any
    // commit in flight). Not Fastify's onResponse and onRequestAbort: the second does not fire once the request's
    // body was read (a POST with a JSON body), and the close covers what both do.
    reply.raw.once('close', () => void engine.session.finish(context.state))
    request.session = content
      ? new FastifySession(control(request, context), content.data, cookieOf(content))
      : new FastifySession(control(request, context), {}, newCookie(request))
  })

  fastify.addHook('onSend', async (request: FastifyRequest, reply: FastifyReply, payload: unknown) => {
    const context = contexts.get(request)
    if (!context || context.committed) return payload
    context.committed = true
    const release = holdWhileStored(payload)
    // A save, destroy or regenerate the handler did not wait for lands first; a destroy gives the request a new
    // state (startOver), whose own operations are waited for in turn.
    for (
      let operations = engine.session.settled(context.state);
      operations;
      operations = engine.session.settled(context.state)
    ) {
      await operations
    }
    const { state, facts } = context
    // Undefined when the application removed it (`request.session = null`).
    const session: FastifySession | undefined =
      (request.session as unknown) instanceof FastifySession ? request.session : undefined
    let setCookie = false
    try {
      if (session) {
        const snapshot = snapshotOf(session)
        const atOnce = engine.session.commitAtOnce(state, snapshot, facts)
        setCookie = (atOnce ?? (await engine.session.commit(state, snapshot))).setCookie
        if (atOnce) {
          // Nothing to store: the reply leaves at the end of this turn, after the node requests the turn made.
          await endOfTurn()
        } else {
          // The lock's release leaves before the reply, and is not waited for (see the Express middleware).
          await engine.session.answered(state, facts)
        }
      } else {
        // Removed by the application: what happens is the `unset` option's, as in Express, not a TypeError.
        await engine.session.commit(state, null)
        await engine.session.answered(state, facts)
      }
    } catch (error) {
      // The error reply, too, leaves after the lock's release.
      await engine.session.answered(state)
      failedReply(reply, error)
      discardBody(payload)
      throw error
    }
    const header = session && setCookie ? cookieHeader(request, state, session) : undefined
    if (header) reply.header('set-cookie', header)
    const failure = release()
    if (failure) {
      discardBody(payload)
      throw failure.error
    }
    if (session && isStreamed(payload)) storeBeforeEnd(reply.raw, request, context)
    return payload
  })

  // A streamed body is sent after onSend: what the application changes while it streams is stored before the
  // reply ends, as in Express (a merge: the lock went with the headers). If that fails, the connection is cut,
  // so the client never sees a complete reply for a change that was not stored.
  function storeBeforeEnd(raw: ServerResponse, request: FastifyRequest, context: RequestContext): void {
    const end = raw.end
    raw.end = ((...args: unknown[]) => {
      raw.end = end
      new Promise((resolve) => resolve(engine.session.commit(context.state, currentSnapshot(request)))).then(
        () => (end as (...args: unknown[]) => unknown).apply(raw, args),
        () => {
          raw.on('error', () => {})
          raw.destroy()
        },
      )
      return raw
    }) as ServerResponse['end']
  }

  // Our errors carry their headers (Retry-After on a 503); Fastify's default error handler does not send them.
  fastify.addHook('onError', async (_request, reply, error) => {
    const headers = (error as { headers?: unknown }).headers
    if (error instanceof SessionFailoverError && headers && typeof headers === 'object')
      reply.headers(headers)
  })
  fastify.addHook('onClose', () => engine.close())
}

/**
 * A reply whose session was not stored becomes an error reply, as in Express: never with the status the route
 * set (Fastify's error handlers, its default included, keep a 201 or 302 the route chose), nor with its cookies
 * (@fastify/cookie's are set by now) or its redirect. Fastify drops the content headers itself.
 */
function failedReply(reply: FastifyReply, error: unknown): void {
  const status = (error as { status?: unknown }).status
  reply.code(typeof status === 'number' && status >= 500 && status <= 599 ? status : 500)
  reply.removeHeader('set-cookie')
  reply.removeHeader('location')
}

/** `app.register(fastifySessionFailover, { secret, nodes, ... })`. */
export const fastifySessionFailover = fp(plugin, { fastify: '5.x', name: 'session-failover' })
