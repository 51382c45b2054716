import replyFrom from '@fastify/reply-from'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'

/** 'round-robin' for non-sticky sessions; 'cookie' pins a client to an instance with the balancer's own cookie. */
export type BalancingMode = 'round-robin' | 'cookie'

export interface Upstream {
  readonly name: string
  /** Read per request: a revived instance comes back on the same address. */
  readonly url: string
}

/** The balancer's cookie in 'cookie' mode: the index of the instance a client is pinned to. */
export const BALANCER_COOKIE = 'lb'
/** How long an instance that refused a connection is left out before it is tried again. */
const DOWN_MS = 1000

/**
 * Failures before the request reached the instance: it can go to another one, whatever its method. A reset
 * connection is not among them: the instance may have served the request before it died.
 */
const NOT_DELIVERED = new Set(['ECONNREFUSED', 'UND_ERR_CONNECT_TIMEOUT'])

function errorCodes(error: unknown): string[] {
  const codes: string[] = []
  for (let at: unknown = error, depth = 0; at && depth < 5; depth++) {
    const { code, cause } = at as { code?: unknown; cause?: unknown }
    if (typeof code === 'string') codes.push(code)
    at = cause
  }
  return codes
}

function cookieValue(header: string | undefined, name: string): string | undefined {
  for (const part of header?.split(';') ?? []) {
    const [key, value] = part.split('=')
    if (key?.trim() === name) return value?.trim()
  }
  return undefined
}

/** The id inside an express-session style cookie value (`s:<id>.<signature>`, URI-encoded); not verified. */
function sessionIdOf(value: string | undefined): string | undefined {
  if (!value) return undefined
  let decoded: string
  try {
    decoded = decodeURIComponent(value)
  } catch {
    return undefined
  }
  const signatureAt = decoded.lastIndexOf('.')
  return decoded.startsWith('s:') && signatureAt > 2 ? decoded.slice(2, signatureAt) : undefined
}

/**
 * The demo's load balancer: every route `app` has not claimed is proxied to one of `upstreams` through
 * @fastify/reply-from. A request whose connection an instance refused (it was killed) goes to the next one; a
 * request that reached an instance which then died is answered 502, never replayed (it may have been served).
 */
export async function addBalancer(
  app: FastifyInstance,
  upstreams: readonly Upstream[],
  mode: BalancingMode,
  /**
   * The session cookie's name: each response then says, in `x-session-id`, which session id the client holds
   * after it (the one the app just set, else the one it sent). The demo page shows it; an app's JSON body is
   * written before the session is stored, and a relocation at that point changes the id.
   */
  sessionCookie?: string,
): Promise<void> {
  const downUntil = upstreams.map(() => 0)
  let next = 0

  /** The next instance in turn that is not known to be down and not yet tried for this request. */
  const pick = (tried: ReadonlySet<number>): number | undefined => {
    const now = Date.now()
    for (const allowDown of [false, true]) {
      for (let step = 0; step < upstreams.length; step++) {
        const index = (next + step) % upstreams.length
        if (tried.has(index) || (!allowDown && (downUntil[index] ?? 0) > now)) continue
        next = (index + 1) % upstreams.length
        return index
      }
    }
    return undefined
  }

  // Bodies stay raw bytes, so a request can be sent again, byte for byte, to another instance.
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', { parseAs: 'buffer' }, (_request, body, done) => done(null, body))
  await app.register(replyFrom, { undici: { connections: 64, connectTimeout: 1000 } })

  const forward = (
    request: FastifyRequest,
    reply: FastifyReply,
    index: number,
    tried: Set<number>,
    pinned: number | undefined,
  ): void => {
    tried.add(index)
    const upstream = upstreams[index] as Upstream
    const body = Buffer.isBuffer(request.body) ? request.body : undefined
    reply.from(`${upstream.url}${request.url}`, {
      ...(body ? { body, contentType: request.headers['content-type'] ?? 'application/octet-stream' } : {}),
      // reply-from retries a GET answered 503 on its own by default; a 503 here is the app's answer to pass on.
      retryDelay: () => null,
      rewriteHeaders: (headers) => {
        const set = headers['set-cookie'] === undefined ? [] : [headers['set-cookie']].flat()
        const rewritten: typeof headers = { ...headers }
        if (sessionCookie) {
          const sent = set.find((cookie) => cookie.startsWith(`${sessionCookie}=`))
          const id =
            sessionIdOf(sent?.slice(sessionCookie.length + 1).split(';')[0]) ??
            sessionIdOf(cookieValue(request.headers.cookie, sessionCookie))
          if (id) rewritten['x-session-id'] = id
        }
        if (mode === 'cookie' && pinned !== index) {
          rewritten['set-cookie'] = [...set, `${BALANCER_COOKIE}=${index}; Path=/; HttpOnly; SameSite=Lax`]
        }
        return rewritten
      },
      onError: (failed, { error }) => {
        const undelivered = errorCodes(error).some((code) => NOT_DELIVERED.has(code))
        if (undelivered) downUntil[index] = Date.now() + DOWN_MS
        const other = undelivered && !failed.sent ? pick(tried) : undefined
        if (other !== undefined) forward(request, failed as FastifyReply, other, tried, pinned)
        else
          failed
            .code(502)
            .send({ error: `instance ${upstream.name} failed: ${errorCodes(error).join(', ')}` })
      },
    })
  }

  app.all('/*', (request, reply) => {
    const cookie =
      mode === 'cookie' ? Number(cookieValue(request.headers.cookie, BALANCER_COOKIE)) : Number.NaN
    const pinned = Number.isInteger(cookie) && cookie >= 0 && cookie < upstreams.length ? cookie : undefined
    const first = pinned !== undefined && (downUntil[pinned] ?? 0) <= Date.now() ? pinned : pick(new Set())
    if (first === undefined) return reply.code(502).send({ error: 'no instance' })
    forward(request, reply, first, new Set(), pinned)
    return reply
  })
}
