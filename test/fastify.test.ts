import { createReadStream, type ReadStream } from 'node:fs'
import { type ClientHttp2Stream, connect, type IncomingHttpHeaders } from 'node:http2'
import { Readable, Stream } from 'node:stream'
import fastifyCookie from '@fastify/cookie'
import express from 'express'
import Fastify, {
  type FastifyError,
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
} from 'fastify'
import fp from 'fastify-plugin'
import { afterEach, describe, expect, it } from 'vitest'
import { storageKeys } from '../src/core/keys.js'
import { createEngine } from '../src/create-engine.js'
import { fastifySessionFailover } from '../src/fastify.js'
import { parseSessionId } from '../src/index.js'
import { parseOptions } from '../src/options.js'
import { Browser, firstBytes, hangingRequest, type ShopApp, startShop } from './support/app.js'
import { startFastifyShop } from './support/fastify-app.js'
import { type MemcachedServer, nodesOption, startCluster, stopAllMemcached } from './support/memcached.js'
import { watchedNode } from './support/proxy.js'
import { until } from './support/until.js'

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

describe('the Fastify plugin', () => {
  const shops: ShopApp[] = []
  afterEach(async () => {
    await Promise.all(shops.splice(0).map((shop) => shop.close()))
    await stopAllMemcached()
  })
  async function both(extra: object = {}) {
    const servers = await startCluster(3)
    const options = { secret: 'shared', nodes: nodesOption(servers), ...extra }
    const onExpress = await startShop(express, options)
    const onFastify = await startFastifyShop(options)
    shops.push(onExpress, onFastify)
    return { servers, onExpress, onFastify }
  }

  it('serves sessions through inject, without a network', async () => {
    const servers = await startCluster(2)
    const app = Fastify()
    // With Fastify's own register options, which reach the plugin too.
    await app.register(fastifySessionFailover, {
      secret: 's',
      nodes: nodesOption(servers),
      logLevel: 'warn',
      logSerializers: {},
    } as Parameters<typeof fastifySessionFailover>[1])
    app.post('/visit', async (request) => {
      request.session.set('visits', (request.session.get<number>('visits') ?? 0) + 1)
      return { visits: request.session.get('visits') }
    })
    try {
      const first = await app.inject({ method: 'POST', url: '/visit' })
      const cookie = String(first.headers['set-cookie']).split(';')[0] as string
      expect(first.json()).toEqual({ visits: 1 })
      const second = await app.inject({ method: 'POST', url: '/visit', headers: { cookie } })
      expect(second.json()).toEqual({ visits: 2 })
    } finally {
      await app.close()
    }
  })

  it('sends a reply that stores nothing at the end of its turn, after the node requests that turn made', async () => {
    const [server] = await startCluster(1)
    const events: string[] = []
    const { node, close } = await watchedNode((server as MemcachedServer).port, events)
    const app = Fastify()
    await app.register(fastifySessionFailover, {
      secret: 's',
      nodes: nodesOption([server as MemcachedServer]),
    })
    let stored: Promise<void> | undefined
    app.get('/read-then-store', async () => {
      // Made before the reply is sent, in the same turn: it leaves first.
      stored = node.set('later', Buffer.from('2'), 60)
      return { ok: true }
    })
    try {
      const url = await app.listen({ port: 0, host: '127.0.0.1' })
      events.length = 0
      expect(await firstBytes({ url }, '/read-then-store', () => events.push('response'))).toMatch(
        /^HTTP\/1\.1 200/,
      )
      expect(events).toEqual(['node request', 'response'])
      await stored
      expect(await server?.get('later')).toEqual(Buffer.from('2'))
    } finally {
      await app.close()
      await close()
    }
  })

  it('shares sessions with Express apps on the same nodes and secret (a mixed fleet)', async () => {
    const { onExpress, onFastify } = await both()
    const browser = new Browser()
    await browser.send(onExpress, 'POST', '/cart/from-express')
    expect((await browser.send(onFastify, 'POST', '/cart/from-fastify')).body.cart).toEqual([
      'from-express',
      'from-fastify',
    ])
    expect((await browser.send(onExpress, 'GET', '/cart')).body.cart).toEqual([
      'from-express',
      'from-fastify',
    ])
  })

  it('keeps parallel increments exact with requests split between Express and Fastify', async () => {
    const { onExpress, onFastify } = await both({ lockingMode: 'all', lockTimeout: 10_000 })
    const browser = new Browser()
    await browser.send(onFastify, 'POST', '/cart/start')
    await Promise.all(
      Array.from({ length: 30 }, (_, i) => browser.send(i % 2 ? onExpress : onFastify, 'POST', '/count')),
    )
    expect((await browser.send(onFastify, 'POST', '/count')).body.views).toBe(31)
  })

  it('releases the lock of a handler that throws', async () => {
    const { onFastify } = await both({ lockingMode: 'all', lockExpiration: 30, lockTimeout: 2000 })
    const browser = new Browser()
    await browser.send(onFastify, 'POST', '/cart/start')
    expect((await browser.send(onFastify, 'POST', '/boom')).status).toBe(500)
    const next = await browser.send(onFastify, 'POST', '/count')
    expect(next.status).toBe(200)
    // Its lock was gone: the next request took it at once, without a wait (the lock would live 30 s).
    expect(onFastify.sessions.stats().lockWaits).toBe(0)
  })

  it('releases the lock of a request with a body whose client leaves while its handler runs', async () => {
    const { servers, onFastify } = await both({ lockingMode: 'all', lockExpiration: 30, lockTimeout: 2000 })
    const browser = new Browser()
    await browser.send(onFastify, 'POST', '/cart/start')
    const { lock } = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
    const lockStored = async () =>
      (await Promise.all(servers.map((server) => server.has(lock)))).some(Boolean)
    const until = async (done: () => Promise<boolean>) => {
      for (let i = 0; i < 200 && !(await done()); i++) await sleep(10)
    }
    // Its body is read before the handler runs; Fastify's onRequestAbort does not fire for such a request.
    const hanging = hangingRequest(onFastify, browser.cookie, { json: '{"item":"apple"}' })
    await until(lockStored)
    expect(await lockStored()).toBe(true)
    hanging.abort()
    expect(await hanging.done).toBe('aborted')
    // Deleted once the server sees the client go; without that, it would stay for the lock's 30 s.
    await until(async () => !(await lockStored()))
    expect(await lockStored()).toBe(false)
    const next = await browser.send(onFastify, 'POST', '/count')
    expect(next.status).toBe(200)
    expect(onFastify.sessions.stats().lockWaits).toBe(0)
  })

  it('stores the session of a hijacked reply (server-sent events) and releases its lock', async () => {
    const { onFastify } = await both({ lockingMode: 'all', lockExpiration: 30, lockTimeout: 2000 })
    const open = async (cookie: string | undefined) => {
      const controller = new AbortController()
      const reply = await fetch(`${onFastify.url}/hijack-open`, {
        method: 'POST',
        headers: cookie ? { cookie } : {},
        signal: controller.signal,
      })
      expect(reply.headers.get('content-type')).toBe('text/event-stream')
      // The reply stays open: its events are read until the one sent once the later change was saved.
      const reader = (reply.body as ReadableStream<Uint8Array>).getReader()
      let events = ''
      while (!events.includes('data: saved')) {
        const { value, done } = await reader.read()
        if (done) break
        events += Buffer.from(value).toString()
      }
      return { close: () => controller.abort(), cookie: reply.headers.getSetCookie()[0]?.split(';')[0] }
    }
    const browser = new Browser()
    await browser.send(onFastify, 'POST', '/cart/start')
    const events = await open(browser.cookie)
    // Without a commit at hijack() this waits for the lock the open reply holds, and gets a 503 after 2 s.
    const next = await browser.send(onFastify, 'POST', '/count')
    events.close()
    expect(next.status).toBe(200)
    expect(next.body.views).toBe(3) // both of the hijacked request's changes were stored

    // A session begun by a hijacked reply gets its cookie on the raw response, and is stored.
    const first = await open(undefined)
    first.close()
    expect(first.cookie).toMatch(/^connect\.sid=/)
    const newcomer = new Browser()
    newcomer.cookie = first.cookie
    const id = newcomer.sessionId
    const found = async () => {
      const cart = await fetch(`${onFastify.url}/cart`, { headers: { cookie: first.cookie ?? '' } })
      return ((await cart.json()) as { id?: string }).id === id
    }
    for (let i = 0; i < 200 && !(await found()); i++) await sleep(10)
    expect((await newcomer.send(onFastify, 'POST', '/count')).body.views).toBe(3)
  })

  it('answers a logout whose handler did not wait for destroy() only once both copies are gone (Express and Fastify)', async () => {
    const { servers, onExpress, onFastify } = await both({ operationTimeout: 300 })
    for (const app of [onExpress, onFastify]) {
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/apple')
      const parsed = parseSessionId(browser.sessionId)
      const { primary } = storageKeys('sf:', parsed?.random ?? '')
      const onPrimary = servers[Number(parsed?.nodeId.slice(1)) - 1] as MemcachedServer
      // Every other node frozen: the backup's delete takes the operation timeout, long after the redirect.
      const others = servers.filter((server) => server !== onPrimary)
      await Promise.all(others.map((server) => server.freeze()))
      try {
        const reply = await fetch(`${app.url}/logout-unawaited`, {
          method: 'POST',
          headers: { cookie: browser.cookie ?? '' },
          redirect: 'manual',
        })
        expect(reply.status).toBe(302)
        expect(app.settledLate).toEqual(['destroyed'])
        expect(await onPrimary.has(primary)).toBe(false)
      } finally {
        for (const server of others) server.thaw()
      }
    }
  })

  it('destroys a session for good when destroy() follows a commit in flight (hijack(), a streamed response)', async () => {
    const { servers, onExpress, onFastify } = await both({ lockingMode: 'all' })
    for (const [app, path, body] of [
      [onFastify, '/hijack-logout', 'data: destroyed\n\n'],
      [onExpress, '/stream-logout', 'open destroyed'],
    ] as const) {
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/apple')
      const { primary, backup } = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
      const reply = await fetch(`${app.url}${path}`, {
        method: 'POST',
        headers: { cookie: browser.cookie ?? '' },
      })
      expect(await reply.text()).toBe(body)
      // Without the wait, the commit's backup write lands after the delete and the session comes back from it.
      const stored = await Promise.all(servers.flatMap((server) => [server.has(primary), server.has(backup)]))
      expect(stored.some(Boolean)).toBe(false)
      expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual([])
    }
  })

  it('stores a change made while the reply streams before it ends, or cuts the connection if it cannot', async () => {
    const { onFastify } = await both({ maxSessionBytes: 4096 })
    const browser = new Browser()
    await browser.send(onFastify, 'POST', '/cart/start')
    const streamed = await browser.send(onFastify, 'POST', '/stream-late/late')
    expect(streamed.body.cart).toEqual(['start', 'early', 'late'])
    expect((await browser.send(onFastify, 'GET', '/cart')).body.cart).toEqual(['start', 'early', 'late'])
    await browser.send(onFastify, 'POST', '/stream-late/web?web=1')
    expect((await browser.send(onFastify, 'GET', '/cart')).body.cart?.slice(-2)).toEqual(['early', 'web'])
    // Too large to store once it streams: the client must not get a whole reply for it.
    const cut = fetch(`${onFastify.url}/stream-late/${'x'.repeat(5000)}`, {
      method: 'POST',
      headers: { cookie: browser.cookie ?? '' },
    }).then((reply) => reply.text())
    await expect(cut).rejects.toThrow()
    expect((await browser.send(onFastify, 'GET', '/cart')).body.cart?.slice(-3)).toEqual([
      'early',
      'web',
      'early',
    ])
  })

  it('answers the error of a session that cannot be stored when the handler takes over its reply', async () => {
    const servers = await startCluster(2)
    const app = Fastify()
    await app.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) })
    app.post('/events', async (request, reply) => {
      request.session.set('views', 1)
      request.session.cookie.maxAge = Number.NaN
      reply.hijack()
      reply.raw.end('taken over')
    })
    try {
      const reply = await app.inject({ method: 'POST', url: '/events' })
      expect(reply.statusCode).toBe(500)
      expect(reply.body).not.toBe('taken over')
    } finally {
      await app.close()
    }
  })

  it("takes @fastify/session's callbacks, and regenerate() keeps the keys it is given", async () => {
    const { onFastify } = await both()
    const browser = new Browser()
    await browser.send(onFastify, 'POST', '/cart/apple')
    const before = browser.sessionId
    const login = await browser.send(onFastify, 'POST', '/login-keep')
    expect(login.status).toBe(200)
    expect(login.body.cart).toEqual(['apple'])
    expect(browser.sessionId).not.toBe(before)
    expect((await browser.send(onFastify, 'GET', '/cart')).body.cart).toEqual(['apple'])
    const logout = await browser.send(onFastify, 'POST', '/logout-callback')
    expect(logout.body.ok).toBe(true)
    expect((await browser.send(onFastify, 'GET', '/cart')).body.cart).toEqual([])
  })

  it('gives a new id and empty data on a regenerate() whose old copies cannot be deleted (no fixation)', async () => {
    const servers = await startCluster(1)
    const app = Fastify()
    await app.register(fastifySessionFailover, {
      secret: 's',
      nodes: nodesOption(servers),
      operationTimeout: 250,
    })
    let loaded!: () => void
    const loading = new Promise<void>((resolve) => {
      loaded = resolve
    })
    let nodeGone!: () => void
    const killed = new Promise<void>((resolve) => {
      nodeGone = resolve
    })
    const seen: Array<{ before: string; after: string; code: unknown; cart: unknown }> = []
    app.post('/cart', async (request) => {
      request.session.set('cart', ['apple'])
      return { ok: true }
    })
    app.post('/login', async (request) => {
      const before = request.session.sessionId
      loaded()
      await killed
      const error = await request.session.regenerate().then(
        () => undefined,
        (failure: { code?: string }) => failure,
      )
      request.session.set('user', 'alice')
      seen.push({
        before,
        after: request.session.sessionId,
        code: error?.code,
        cart: request.session.get('cart'),
      })
      return { ok: true }
    })
    try {
      const first = await app.inject({ method: 'POST', url: '/cart' })
      const cookie = String(first.headers['set-cookie']).split(';')[0] as string
      const login = app.inject({ method: 'POST', url: '/login', headers: { cookie } })
      await loading
      await (servers[0] as MemcachedServer).kill()
      nodeGone()
      expect((await login).statusCode).toBe(503)
      const [{ before, after, code, cart }] = seen as [(typeof seen)[number]]
      expect(code).toBe('ESF_ALL_NODES_DOWN')
      expect(parseSessionId(after)?.random).not.toBe(parseSessionId(before)?.random)
      expect(cart).toBeUndefined()
    } finally {
      await app.close()
    }
  })

  it("removes both copies when request.session is set to null with unset: 'destroy', keeps them with 'keep'", async () => {
    for (const unset of ['destroy', 'keep'] as const) {
      const { servers, onFastify } = await both({ unset })
      const browser = new Browser()
      await browser.send(onFastify, 'POST', '/cart/apple')
      const { primary, backup } = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
      expect((await browser.send(onFastify, 'POST', '/unset')).status).toBe(200)
      const stored = await Promise.all(servers.flatMap((s) => [s.has(primary), s.has(backup)]))
      expect(stored.some(Boolean)).toBe(unset === 'keep')
      await Promise.all(shops.splice(0).map((shop) => shop.close()))
      await stopAllMemcached()
    }
  })

  it('answers 503 with Retry-After when every node is down', async () => {
    const { servers, onFastify } = await both({ operationTimeout: 200 })
    const browser = new Browser()
    await browser.send(onFastify, 'POST', '/cart/apple')
    await Promise.all(servers.map((server) => server.kill()))
    const reply = await browser.send(onFastify, 'GET', '/cart')
    expect(reply.status).toBe(503)
    expect(reply.headers.get('retry-after')).toMatch(/^\d+$/)
  })
})

describe('the Fastify plugin in sticky mode', () => {
  afterEach(() => stopAllMemcached())

  it('serves from memory, and takes over from (and back to) an Express instance with a reissued route', async () => {
    const servers = await startCluster(2)
    const base = { secret: 'sticky', nodes: nodesOption(servers), sticky: true as const }
    const onFastify = await startFastifyShop({ ...base, route: 'f' })
    const onExpress = await startShop(express, { ...base, route: 'e' })
    try {
      const browser = new Browser()
      await browser.send(onFastify, 'POST', '/cart/apple')
      expect(browser.sessionId?.endsWith('.f')).toBe(true)
      const gets = async () =>
        (await Promise.all(servers.map((s) => s.stats()))).reduce((n, s) => n + (s.cmd_get ?? 0), 0)
      const before = await gets()
      expect((await browser.send(onFastify, 'GET', '/cart')).body.cart).toEqual(['apple'])
      expect(await gets()).toBe(before) // served from memory

      expect((await browser.send(onExpress, 'POST', '/cart/pear')).body.cart).toEqual(['apple', 'pear'])
      expect(browser.sessionId?.endsWith('.e')).toBe(true)
      // Back on Fastify: its own copy (['apple']) is stale and must not be served.
      expect((await browser.send(onFastify, 'GET', '/cart')).body.cart).toEqual(['apple', 'pear'])
      expect(browser.sessionId?.endsWith('.f')).toBe(true)
    } finally {
      await onFastify.close()
      await onExpress.close()
    }
  })
})

describe('the Fastify plugin with unusual setups', () => {
  afterEach(() => stopAllMemcached())

  async function app(register: (app: ReturnType<typeof Fastify>) => Promise<void>) {
    const instance = Fastify()
    await register(instance)
    instance.post('/visit', async (request) => {
      request.session.visits = ((request.session.visits as number | undefined) ?? 0) + 1
      return { visits: request.session.visits }
    })
    instance.post('/reset', async (request) => {
      await request.session.destroy()
      request.session.set('fresh', true)
      return { cart: request.session.get('cart') ?? null }
    })
    instance.post('/api-key', async (request) => {
      request.session.set('touch', 1)
      return {}
    })
    instance.post('/shadow', async (request) => {
      ;(request.session as unknown as Record<string, unknown>).get = 5
      return {}
    })
    instance.get('/all', async (request) => ({ ...request.session, cookie: undefined }))
    return instance
  }
  const cookieOf = (reply: { headers: Record<string, unknown> }) =>
    String(
      [reply.headers['set-cookie']].flat().find((c) => String(c).startsWith('connect.sid=')) ?? '',
    ).split(';')[0]

  it('trusts X-Forwarded-Proto for a secure cookie with proxy: true', async () => {
    const servers = await startCluster(1)
    const fastify = await app(async (a) => {
      await a.register(fastifySessionFailover, {
        secret: 's',
        nodes: nodesOption(servers),
        proxy: true,
        cookie: { secure: true },
      })
    })
    const reply = await fastify.inject({
      method: 'POST',
      url: '/visit',
      headers: { 'x-forwarded-proto': 'https' },
    })
    expect(String(reply.headers['set-cookie'])).toMatch(/; Secure/)
    await fastify.close()
  })

  it('goes on with a new, empty session after destroy(), stored only because it was modified', async () => {
    const servers = await startCluster(1)
    const fastify = await app(async (a) => {
      await a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) })
    })
    const first = await fastify.inject({ method: 'POST', url: '/visit' })
    const cookie = cookieOf(first)
    const reset = await fastify.inject({ method: 'POST', url: '/reset', headers: { cookie } })
    expect(reset.json()).toEqual({ cart: null })
    const fresh = cookieOf(reset)
    expect(fresh).not.toBe(cookie)
    expect((await fastify.inject({ url: '/all', headers: { cookie: fresh } })).json()).toEqual({
      fresh: true,
    })
    await fastify.close()
  })

  it("gives the new session after destroy() a new cookie: the old one's remember-me lifetime stays behind", async () => {
    const servers = await startCluster(1)
    const fastify = await app(async (a) => {
      await a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) })
      a.post('/remember', async (request: FastifyRequest) => {
        request.session.cookie.maxAge = 30 * 24 * 3600 * 1000
        request.session.set('user', 'ann')
        return {}
      })
    })
    const remembered = await fastify.inject({ method: 'POST', url: '/remember' })
    expect(String(remembered.headers['set-cookie'])).toMatch(/; Expires=/)
    const reset = await fastify.inject({
      method: 'POST',
      url: '/reset',
      headers: { cookie: cookieOf(remembered) },
    })
    const fresh = [reset.headers['set-cookie']].flat().find((c) => String(c).startsWith('connect.sid='))
    expect(fresh).toBeDefined()
    expect(String(fresh)).not.toMatch(/Expires=|Max-Age=/)
    await fastify.close()
  })

  it("learns a read-only route in 'auto' mode as Fastify names it ('/users/:name', not each user's path), before the response", async () => {
    const servers = await startCluster(1)
    const fastify = await app(async (a) => {
      await a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) })
      a.get('/users/:name', async (request: FastifyRequest) => ({ visits: request.session.get('visits') }))
    })
    const cookie = cookieOf(await fastify.inject({ method: 'POST', url: '/visit' }))
    const locks = () => fastify.sessionFailover.stats().locksAcquired
    const read = (name: string) => fastify.inject({ url: `/users/${name}`, headers: { cookie } })
    // The first request of the route locks; it is learned read-only before its response leaves.
    const first = locks()
    await read('alice')
    expect(locks()).toBe(first + 1)
    const before = locks()
    for (const name of ['bob', 'carol', 'dave']) expect((await read(name)).json()).toEqual({ visits: 1 })
    expect(locks()).toBe(before)
    await fastify.close()
  })

  it('destroys another session by its id through app.sessionFailover (log out my other devices)', async () => {
    const servers = await startCluster(2)
    const fastify = await app(async (a) => {
      await a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) })
      a.post('/logout-other', async (request: FastifyRequest) => {
        await a.sessionFailover.destroySession(String(request.session.get('other')))
        return { ok: true }
      })
      a.post('/remember-other', async (request: FastifyRequest) => {
        request.session.set('other', (request.query as { id: string }).id)
        return {}
      })
      a.get('/id', async (request: FastifyRequest) => ({ id: request.session.sessionId }))
    })
    const phone = cookieOf(await fastify.inject({ method: 'POST', url: '/visit' }))
    const laptop = cookieOf(await fastify.inject({ method: 'POST', url: '/visit' }))
    const phoneId = (await fastify.inject({ url: '/id', headers: { cookie: phone } })).json().id
    const visit = (cookie: string | undefined) =>
      fastify.inject({ method: 'POST', url: '/visit', headers: { cookie } }).then((reply) => reply.json())
    await fastify.inject({
      method: 'POST',
      url: `/remember-other?id=${encodeURIComponent(phoneId)}`,
      headers: { cookie: laptop },
    })
    expect(
      (await fastify.inject({ method: 'POST', url: '/logout-other', headers: { cookie: laptop } }))
        .statusCode,
    ).toBe(200)
    expect(await visit(phone)).toEqual({ visits: 1 })
    expect(await visit(laptop)).toEqual({ visits: 2 })
    await expect(fastify.sessionFailover.destroySession(42 as unknown as string)).rejects.toThrow(TypeError)
    await fastify.close()
  })

  for (const handler of ["Fastify's own", 'an application'] as const) {
    it(`answers a session it could not store with an error status, not the route's, and without its cookies or redirect (${handler} error handler)`, async () => {
      const servers = await startCluster(1)
      const fastify = await app(async (a) => {
        // For reply.setCookie().
        await a.register(fastifyCookie)
        await a.register(fastifySessionFailover, {
          secret: 's',
          nodes: nodesOption(servers),
          maxSessionBytes: 4096,
        })
        if (handler === 'an application')
          a.setErrorHandler((error: FastifyError, _request: FastifyRequest, reply: FastifyReply) =>
            reply.send({ failed: error.code }),
          )
        a.post('/created', async (request: FastifyRequest, reply: FastifyReply) => {
          reply.code(201).setCookie('remember', 'yes').header('location', '/next')
          request.session.set('blob', 'x'.repeat(8192))
          return { ok: true }
        })
      })
      const reply = await fastify.inject({ method: 'POST', url: '/created' })
      expect(reply.statusCode).toBe(500)
      expect(String(reply.headers['set-cookie'] ?? '')).not.toContain('remember=')
      expect(reply.headers.location).toBeUndefined()
      expect(reply.body).toContain('ESF_SESSION_TOO_LARGE')
      await fastify.close()
    })
  }

  it('refuses session keys that would shadow its API, and survives a shadowing assignment', async () => {
    const servers = await startCluster(1)
    const fastify = await app(async (a) => {
      await a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) })
    })
    const cookie = cookieOf(await fastify.inject({ method: 'POST', url: '/visit' }))
    expect((await fastify.inject({ method: 'POST', url: '/api-key', headers: { cookie } })).statusCode).toBe(
      500,
    )
    expect((await fastify.inject({ method: 'POST', url: '/shadow', headers: { cookie } })).statusCode).toBe(
      200,
    )
    expect((await fastify.inject({ method: 'POST', url: '/visit', headers: { cookie } })).json()).toEqual({
      visits: 2,
    })
    await fastify.close()
  })

  it('works when another plugin than @fastify/cookie decorates request.cookies', async () => {
    const servers = await startCluster(1)
    const fastify = await app(async (a) => {
      // A cookie parser of its own, which parses in its own hook and adds no parseCookie.
      await a.register(
        fp(async (instance: FastifyInstance) => {
          instance.decorateRequest('cookies', null as unknown as Record<string, string>)
          instance.addHook('onRequest', async (request) => {
            request.cookies = {}
          })
        }),
      )
      await a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) })
    })
    try {
      const first = await fastify.inject({ method: 'POST', url: '/visit' })
      expect(first.statusCode).toBe(200)
      const cookie = cookieOf(first)
      expect((await fastify.inject({ method: 'POST', url: '/visit', headers: { cookie } })).json()).toEqual({
        visits: 2,
      })
    } finally {
      await fastify.close()
    }
  })

  it("works whatever the application's own @fastify/cookie setup: parsing later, signing by default, or registered after the plugin", async () => {
    const servers = await startCluster(1)
    for (const [cookieOptions, order] of [
      [{ hook: false as const }, 'before'],
      [{ secret: 'theirs', parseOptions: { signed: true } }, 'before'],
      [{ hook: 'preHandler' as const }, 'before'],
      // Registered after the plugin (refused while the plugin registered its own).
      [{}, 'after'],
    ] as const) {
      const fastify = await app(async (a) => {
        if (order === 'before') await a.register(fastifyCookie, cookieOptions)
        await a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) })
        if (order === 'after') await a.register(fastifyCookie, cookieOptions)
      })
      const warnings: string[] = []
      const onWarning = (warning: Error) => warnings.push((warning as { code?: string }).code ?? '')
      process.on('warning', onWarning)
      try {
        const cookie = cookieOf(await fastify.inject({ method: 'POST', url: '/visit' }))
        expect((await fastify.inject({ method: 'POST', url: '/visit', headers: { cookie } })).json()).toEqual(
          {
            visits: 2,
          },
        )
      } finally {
        process.off('warning', onWarning)
        await fastify.close()
      }
      // Registered after, its cookies would go out on an error reply: the application is told.
      expect(warnings.includes('ESF_COOKIE_PLUGIN_AFTER')).toBe(order === 'after')
    }
  })

  it('answers a streamed body that fails while its session is stored as Fastify does, instead of crashing', async () => {
    const servers = await startCluster(1)
    const fastify = await app((a) =>
      a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers) }),
    )
    // Bodies that fail as soon as the reply is under way (an upstream, a file that cannot be opened): one that is
    // destroyed, and two that emit their error themselves and so leave no trace of it on the stream.
    const failing: Record<string, () => Stream> = {
      destroyed: () => {
        const body = new Readable({ read() {} })
        setImmediate(() => body.destroy(new Error('upstream failed')))
        return body
      },
      emitted: () => {
        const body = new Readable({ read() {}, autoDestroy: false })
        setImmediate(() => body.emit('error', new Error('upstream failed')))
        return body
      },
      legacy: () => {
        const body = new Stream()
        setImmediate(() => body.emit('error', new Error('upstream failed')))
        return body
      },
    }
    fastify.get('/failing/:kind/:access', async (request, reply) => {
      const { kind, access } = request.params as { kind: string; access: string }
      if (access === 'write') request.session.set('seen', true)
      return reply.send((failing[kind] as () => Stream)())
    })
    // Thrown 'error' events, which would end an application's process.
    const uncaught: unknown[] = []
    const record = (error: unknown) => uncaught.push(error)
    process.on('uncaughtException', record)
    try {
      for (const kind of Object.keys(failing)) {
        for (const access of ['read', 'write']) {
          const answered = fastify.inject({ method: 'GET', url: `/failing/${kind}/${access}` })
          const status = await Promise.race([
            answered.then((reply) => reply.statusCode),
            new Promise((resolve) => setTimeout(resolve, 3000, 'no answer')),
          ])
          expect([kind, access, status]).toEqual([kind, access, 500])
        }
      }
      expect(uncaught).toEqual([])
    } finally {
      process.off('uncaughtException', record)
      await fastify.close()
    }
  })

  it('closes at once after a destroy() in onResponse: the new session of a finished request is not waited for', async () => {
    const servers = await startCluster(1)
    const warnings: string[] = []
    const noop = () => {}
    const logger = {
      debug: noop,
      info: noop,
      error: noop,
      warn: (_: object, message?: string) => warnings.push(String(message)),
    }
    const fastify = await app((a) =>
      a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers), logger }),
    )
    let destroyed = false
    fastify.addHook('onResponse', async (request) => {
      await request.session.destroy()
      destroyed = true
    })
    expect((await fastify.inject({ method: 'POST', url: '/visit' })).statusCode).toBe(200)
    await until(() => destroyed)
    // Without the fix close() waits out its 10 s for a request that is over, then warns.
    await fastify.close()
    expect(warnings.filter((warning) => warning.includes('still in flight'))).toEqual([])
  })

  it("counts no request in flight after a hijacked reply's destroy(): the new session is not the finished request's", async () => {
    // What the plugin does for a hijacked reply whose handler then destroys the session: the commit is detached,
    // finish() begins at once, and the destroy's new state comes after it. A client that left meanwhile has
    // already had its reply's close: nothing else would finish that new state, and close() would wait for it.
    const servers = await startCluster(2)
    const engine = createEngine(parseOptions({ secret: 's', nodes: nodesOption(servers) }))
    try {
      const facts = { method: 'POST', path: '/hijack', raw: undefined, route: undefined }
      const created = await engine.session.open(undefined, facts)
      await engine.session.commit(created.state, engine.session.snapshot({ visits: 1 }, {}))
      await engine.session.finish(created.state, facts)
      const opened = await engine.session.open({ id: created.state.id, resign: false }, facts)
      engine.session.commitDetached(opened.state, engine.session.snapshot({ visits: 1 }, {}), facts)
      await engine.session.destroy(opened.state)
      engine.session.startOver(opened.state)
      expect(await engine.session.drain(1000)).toBe(0)
    } finally {
      await engine.close({ timeout: 100 })
    }
  })

  it('closes a streamed body that the error reply of a session it cannot store replaces', async () => {
    const servers = await startCluster(1)
    const fastify = await app((a) =>
      a.register(fastifySessionFailover, { secret: 's', nodes: nodesOption(servers), maxSessionBytes: 4096 }),
    )
    const files: ReadStream[] = []
    let webCancelled = false
    let legacyClosed = false
    fastify.post('/too-large/:kind', async (request, reply) => {
      request.session.set('blob', 'x'.repeat(8192))
      const { kind } = request.params as { kind: string }
      if (kind === 'legacy') {
        // An old-style stream: no destroy(), a close(callback) as some upstream clients have.
        const body = Object.assign(new Stream(), {
          close(callback: () => void) {
            legacyClosed = true
            callback()
          },
        })
        return reply.send(body)
      }
      if (kind === 'web') {
        const cancel = () => {
          webCancelled = true
        }
        return reply.send(new ReadableStream({ pull() {}, cancel }))
      }
      const file = createReadStream(new URL(import.meta.url))
      files.push(file)
      return reply.send(file)
    })
    try {
      expect((await fastify.inject({ method: 'POST', url: '/too-large/file' })).statusCode).toBe(500)
      expect((await fastify.inject({ method: 'POST', url: '/too-large/web' })).statusCode).toBe(500)
      const legacy = await fastify.inject({ method: 'POST', url: '/too-large/legacy' })
      // The session's error, not one from closing the body.
      expect([legacy.statusCode, legacy.json().code]).toEqual([500, 'ESF_SESSION_TOO_LARGE'])
      expect(files.map((file) => file.destroyed)).toEqual([true])
      expect(webCancelled).toBe(true)
      expect(legacyClosed).toBe(true)
    } finally {
      await fastify.close()
    }
  })

  it("serves sessions over HTTP/2 (Fastify's http2), and a stream cancelled while it waits for the lock does not block the session's next request", async () => {
    const servers = await startCluster(2)
    const fastify = Fastify({ http2: true })
    await fastify.register(fastifySessionFailover, {
      secret: 's',
      nodes: nodesOption(servers),
      lockingMode: 'all',
      lockTimeout: 2000,
    })
    let release = () => {}
    let slowStarted = false
    fastify.post('/visit', async (request) => {
      request.session.visits = ((request.session.visits as number | undefined) ?? 0) + 1
      return { visits: request.session.visits }
    })
    fastify.post('/slow', async (request) => {
      slowStarted = true
      await new Promise<void>((resolve) => {
        release = resolve
      })
      request.session.slow = true
      return {}
    })
    const client = connect(await fastify.listen({ port: 0, host: '127.0.0.1' }))
    const post = (path: string, cookie?: string) => {
      const stream = client.request({ ':method': 'POST', ':path': path, ...(cookie ? { cookie } : {}) })
      stream.end()
      return stream
    }
    const answer = (stream: ClientHttp2Stream) =>
      new Promise<{ status: number; body: string; cookie: string }>((resolve, reject) => {
        let headers: IncomingHttpHeaders = {}
        let body = ''
        stream.on('response', (received) => {
          headers = received
        })
        stream.on('data', (chunk) => {
          body += chunk
        })
        stream.on('end', () =>
          resolve({
            status: Number(headers[':status']),
            body,
            cookie: String([headers['set-cookie']].flat()[0] ?? '').split(';')[0] as string,
          }),
        )
        stream.on('error', reject)
      })
    try {
      const first = await answer(post('/visit'))
      expect([first.status, JSON.parse(first.body)]).toEqual([200, { visits: 1 }])
      const slow = answer(post('/slow', first.cookie))
      await until(() => slowStarted, 2000)
      // A request of the session queues behind the slow one for the lock; its client cancels it (RST_STREAM).
      const cancelled = post('/visit', first.cookie)
      cancelled.on('error', () => {})
      await sleep(100)
      cancelled.close()
      await sleep(50)
      release()
      expect((await slow).status).toBe(200)
      // Within lockTimeout, or a LockTimeoutError (503) if the cancelled request had kept the lock.
      const after = await answer(post('/visit', first.cookie))
      expect(after.status).toBe(200)
      expect(JSON.parse(after.body).visits).toBeGreaterThanOrEqual(2)
      // The cancelled request did reach the server and wait for the lock behind the slow one.
      expect(fastify.sessionFailover.stats().lockWaits).toBeGreaterThanOrEqual(1)
    } finally {
      release()
      client.destroy()
      await fastify.close()
    }
  })
})
