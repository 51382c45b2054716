import fastifyCookie from '@fastify/cookie'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { signedValue, verifiedId } from '../core/cookie-value.js'
import type { SessionCounters } from '../core/engine.js'
import type { RequestFacts } from '../core/locking-policy.js'
import { contentOf, type SessionContent, snapshotOf } from '../core/serialize.js'
import type { SessionState } from '../core/session-state.js'
import { createEngine } from '../create-engine.js'
import { SessionFailoverError } from '../errors.js'
import type { NodeHealth } from '../nodes/ring.js'
import { parseOptions, type SessionFailoverOptions } from '../options.js'
import { newSessionCookie, type SessionCookie, storedSessionCookie } from '../session-cookie.js'
import { FastifySession, type SessionControl } from './session.js'

declare module 'fastify' {
  interface FastifyRequest {
    /** The session (null outside the cookie path). */
    session: FastifySession
  }
  interface FastifyInstance {
    /** Node health and counters of the session layer. */
    sessionFailover: { health(): NodeHealth[]; stats(): Readonly<SessionCounters> }
  }
}

interface RequestContext {
  readonly state: SessionState
  readonly facts: RequestFacts
  readonly resign: boolean
  /** The commit ran: an error reply it caused passes through onSend again and must not commit again. */
  committed: boolean
}

/**
 * Fastify plugin with the same options, core and guarantees as the Express middleware: the session is loaded
 * (and locked, per `lockingMode`) in onRequest, and committed in onSend, before the reply is sent: a failed
 * write becomes the error reply (503 when no node is reachable), never a 2xx.
 */
const plugin: FastifyPluginAsync<SessionFailoverOptions> = async (fastify, options) => {
  const config = parseOptions(options)
  const engine = createEngine(config)
  const cookiePath = config.cookie.path ?? '/'
  const contexts = new WeakMap<FastifyRequest, RequestContext>()
  if (!fastify.hasRequestDecorator('cookies')) await fastify.register(fastifyCookie)
  fastify.decorateRequest('session', null as unknown as FastifySession)
  fastify.decorate('sessionFailover', {
    health: () => engine.ring.health(),
    stats: () => ({ ...engine.session.counters }),
  })

  const newCookie = (request: FastifyRequest): SessionCookie =>
    newSessionCookie(config.cookie, isSecure(request))
  const cookieOf = (content: SessionContent): SessionCookie => storedSessionCookie(content.cookie)

  const control = (request: FastifyRequest, state: SessionState): SessionControl => ({
    id: () => state.id,
    save: (session) => engine.session.save(state, snapshotOf(session, session.cookie)),
    async regenerate(session) {
      await engine.session.regenerate(state)
      session.replaceData({})
      session.cookie = newCookie(request)
    },
    destroy: () => engine.session.destroy(state),
    async reload(session) {
      const stored = await engine.session.reload(state)
      if (!stored) throw new Error('failed to load session')
      const content = contentOf(stored)
      session.replaceData(content.data)
      session.cookie = cookieOf(content)
    },
  })

  fastify.addHook('onRequest', async (request) => {
    const path = request.url.split('?')[0] ?? '/'
    if (!path.startsWith(cookiePath)) return
    const presented = verifiedId(request.cookies[config.name], config.secrets)
    const recognized = presented !== undefined && engine.session.store.recognize(presented.id) !== null
    const facts: RequestFacts = { method: request.method, path, raw: request }
    const { state, stored } = await engine.session.open(recognized ? presented?.id : undefined, facts)
    contexts.set(request, {
      state,
      facts,
      resign: recognized && presented?.resign === true,
      committed: false,
    })
    let content: SessionContent | undefined
    try {
      content = stored && contentOf(stored)
    } catch {
      // A stored session that cannot be read starts afresh, as under Express.
      state.renew(engine.session.store.newSessionId())
    }
    request.session = content
      ? new FastifySession(control(request, state), content.data, cookieOf(content))
      : new FastifySession(control(request, state), {}, newCookie(request))
  })

  fastify.addHook('onSend', async (request: FastifyRequest, reply: FastifyReply, payload: unknown) => {
    const context = contexts.get(request)
    if (!context || context.committed) return payload
    context.committed = true
    const { state, facts, resign } = context
    const session = request.session
    session.touch()
    const { setCookie } = await engine.session.commit(
      state,
      state.destroyed ? null : snapshotOf(session, session.cookie),
    )
    await engine.session.finish(state, facts)
    if ((setCookie || resign) && !state.destroyed && (!session.cookie.secure || isSecure(request))) {
      const data = session.cookie.data as { expires?: Date | null } & Record<string, unknown>
      reply.setCookie(config.name, signedValue(state.id, config.secrets[0] as string), {
        ...(data as object),
        expires: data.expires ?? undefined,
      })
    }
    return payload
  })

  // A request that failed or whose client went away releases its lock too.
  const release = async (request: FastifyRequest): Promise<void> => {
    const context = contexts.get(request)
    if (context) await engine.session.finish(context.state)
  }
  // Our errors carry their headers (Retry-After on a 503); Fastify's default error handler does not send them.
  fastify.addHook('onError', async (_request, reply, error) => {
    const headers = (error as { headers?: unknown }).headers
    if (error instanceof SessionFailoverError && headers && typeof headers === 'object')
      reply.headers(headers)
  })
  fastify.addHook('onResponse', release)
  fastify.addHook('onRequestAbort', release)
  fastify.addHook('onClose', () => engine.close())
}

function isSecure(request: FastifyRequest): boolean {
  return request.protocol === 'https'
}

/** `app.register(fastifySessionFailover, { secret, nodes, ... })`. */
export const fastifySessionFailover = fp(plugin, { fastify: '5.x', name: 'session-failover' })
