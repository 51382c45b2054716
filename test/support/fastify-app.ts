import type { AddressInfo } from 'node:net'
import Fastify from 'fastify'
import { fastifySessionFailover } from '../../src/fastify.js'
import type { SessionFailoverOptions } from '../../src/index.js'
import type { ShopApp } from './app.js'

/** The shop of test/support/app.ts on Fastify 5, through the plugin: the routes the behavioural suites use. */
export async function startFastifyShop(options: SessionFailoverOptions): Promise<ShopApp> {
  const app = Fastify({ routerOptions: { maxParamLength: 8192 } }) // long items: a cart item may be a few KiB
  await app.register(fastifySessionFailover, options)
  const shop = { settledLate: [] as string[] } as unknown as ShopApp
  shop.beforeModify = async () => {}
  const cartOf = (session: { get<T>(key: string): T | undefined }) => session.get<string[]>('cart') ?? []

  app.get('/cart', async (request) => ({ id: request.session.sessionId, cart: cartOf(request.session) }))
  app.get('/cart/held', async (request) => {
    // A read that waits for the test (beforeModify) before it answers.
    await shop.beforeModify()
    return { cart: cartOf(request.session) }
  })
  app.post<{ Params: { item: string } }>('/cart/:item', async (request) => {
    request.session.set('cart', [...cartOf(request.session), request.params.item])
    return { id: request.session.sessionId, cart: cartOf(request.session) }
  })
  app.post<{ Params: { item: string } }>('/slow/:item', async (request) => {
    await shop.beforeModify()
    request.session.cart = [...cartOf(request.session), request.params.item]
    return { cart: request.session.cart }
  })
  app.post<{ Params: { item: string } }>('/stream/:item', async (request, reply) => {
    request.session.cart = [...cartOf(request.session), request.params.item]
    const { Readable } = await import('node:stream')
    reply.type('application/json')
    return reply.send(Readable.from(['{"cart":', JSON.stringify(request.session.cart), '}']))
  })
  app.post('/logout', async (request) => {
    await request.session.destroy()
    return { ok: true }
  })
  app.post('/logout-unawaited', async (request, reply) => {
    // A logout that redirects without waiting for the delete: the reply must wait for it all the same.
    void request.session.destroy().then(() => shop.settledLate.push('destroyed'))
    return reply.redirect('/cart')
  })
  app.post('/login', async (request) => {
    const cart = cartOf(request.session)
    await request.session.regenerate()
    request.session.cart = cart
    return { id: request.session.sessionId }
  })
  // @fastify/session's callback style, in handlers that answer from the callback.
  app.post('/login-keep', (request, reply) => {
    request.session.regenerate(['cart'], (error) => {
      if (error) reply.send(error)
      else reply.send({ id: request.session.sessionId, cart: cartOf(request.session) })
    })
  })
  app.post('/logout-callback', (request, reply) => {
    request.session.destroy((error) => reply.send(error ?? { ok: true }))
  })
  app.post('/unset', async (request) => {
    ;(request as { session: unknown }).session = null
    return { ok: true }
  })
  app.post('/count', async (request) => {
    request.session.views = ((request.session.views as number | undefined) ?? 0) + 1
    return { views: request.session.views }
  })

  app.post('/count/slow', async (request, reply) => {
    // ?refuse: a form refused, as a 400 that leaves the session alone.
    if ((request.query as { refuse?: string }).refuse) return reply.code(400).send({ refused: true })
    // Read at the start, write 30 ms later: parallel requests that are not kept apart overwrite each other.
    const views = (request.session.views as number | undefined) ?? 0
    await new Promise((resolve) => setTimeout(resolve, 30))
    request.session.views = views + 1
    return { views: request.session.views }
  })
  app.post<{ Params: { name: string } }>('/key/:name', async (request) => {
    request.session.set(`k_${request.params.name}`, true)
    return { ok: true }
  })
  app.post<{ Params: { kb: string } }>('/big/:kb', async (request) => {
    request.session.set('blob', 'x'.repeat(Number(request.params.kb) * 1024))
    return { ok: true }
  })
  app.get('/keys', async (request) => ({
    keys: Object.keys(request.session).filter((key) => key.startsWith('k_')),
  }))
  const hanging = new Set<string>()
  // Never answers; noted, so a test knows when it holds the lock (GET /hanging/:tag, as the Express shop).
  app.post<{ Querystring: { tag?: string } }>('/hang', (request) => {
    hanging.add(String(request.query.tag))
    return new Promise(() => {})
  })
  app.get<{ Params: { tag: string } }>('/hanging/:tag', async (request) => ({
    reached: hanging.has(request.params.tag),
  }))
  app.post('/boom', async (request) => {
    request.session.views = 99
    throw new Error('the handler failed')
  })
  app.post<{ Params: { item: string } }>('/save-twice/:item', async (request) => {
    await shop.beforeModify()
    request.session.cart = [...cartOf(request.session), request.params.item]
    await request.session.save()
    request.session.cart = [...cartOf(request.session), 'again']
    return { cart: request.session.cart }
  })
  app.post('/stream-open', async (request, reply) => {
    // Headers and a first chunk go out, then the reply stays open (server-sent events, long polling).
    request.session.views = ((request.session.views as number | undefined) ?? 0) + 1
    const { PassThrough } = await import('node:stream')
    const stream = new PassThrough()
    stream.write('open')
    request.raw.once('close', () => stream.destroy())
    return reply.send(stream)
  })

  app.post('/hijack-open', async (request, reply) => {
    // Taken over from Fastify, as server-sent events are: headers and a first event, then the reply stays open.
    request.session.views = ((request.session.views as number | undefined) ?? 0) + 1
    reply.hijack()
    reply.raw.writeHead(200, { 'content-type': 'text/event-stream' })
    reply.raw.write('data: open\n\n')
    // A change made once the reply is taken over is stored by save().
    request.session.views = (request.session.views as number) + 1
    await request.session.save()
    reply.raw.write('data: saved\n\n')
  })

  app.post('/hijack-logout', async (request, reply) => {
    // A logout on a taken-over reply: the commit of its change runs while destroy() is called.
    request.session.views = 99
    reply.hijack()
    reply.raw.writeHead(200, { 'content-type': 'text/event-stream' })
    await request.session.destroy()
    reply.raw.end('data: destroyed\n\n')
  })

  app.post<{ Params: { item: string }; Querystring: { web?: string } }>(
    '/stream-late/:item',
    async (request, reply) => {
      // One item before the body streams, one while it streams (after the headers went out). ?web=1: a web stream.
      const session = request.session
      session.set('cart', [...cartOf(session), 'early'])
      const { Readable } = await import('node:stream')
      async function* body() {
        yield '{"cart":'
        await new Promise((resolve) => setTimeout(resolve, 20))
        session.set('cart', [...cartOf(session), request.params.item])
        yield `${JSON.stringify(cartOf(session))}}`
      }
      reply.type('application/json')
      if (!request.query.web) return reply.send(Readable.from(body()))
      const chunks = body()
      const web = new ReadableStream<Uint8Array>({
        async pull(controller) {
          const { value, done } = await chunks.next()
          if (done) controller.close()
          else controller.enqueue(new TextEncoder().encode(value))
        },
      })
      return reply.send(web)
    },
  )

  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  Object.assign(shop, {
    url: `http://127.0.0.1:${port}`,
    server: app.server,
    sessions: { ...app.sessionFailover, close: () => app.close() },
    close: async () => {
      app.server.closeAllConnections()
      await app.close()
    },
  })
  return shop
}
