import { type IncomingMessage, request, ServerResponse } from 'node:http'
import { connect as connectSocket } from 'node:net'
import type { Duplex } from 'node:stream'
import { Server as SocketServer } from 'socket.io'
import { io as connectClient, type Socket } from 'socket.io-client'
import { afterEach, describe, expect, it } from 'vitest'
import { WebSocket, WebSocketServer } from 'ws'
import type { SessionFailoverOptions } from '../src/index.js'
import { Browser, expressVersions, type ShopApp, startShop } from './support/app.js'
import { type MemcachedServer, nodesOption, startCluster, stopAllMemcached } from './support/memcached.js'
import { until } from './support/until.js'

const SECRET = 'socket-io-secret'
type SessionRequest = {
  session: { cart?: string[]; reload(cb: (e?: unknown) => void): void } & Record<string, unknown>
}

// socket.io's own guide mounts session middleware with io.engine.use(): on its handshake and long-polling
// requests, with a real response, and on a WebSocket upgrade, with a stand-in that only marks where the 101 goes.
describe.each(expressVersions)('socket.io with io.engine.use() on $name', ({ express }) => {
  let servers: MemcachedServer[]
  let shops: ShopApp[] = []
  let ios: SocketServer[] = []
  let clients: Socket[] = []

  async function shopWithSocketIo(options: Partial<SessionFailoverOptions> = {}) {
    servers ??= await startCluster(2)
    const shop = await startShop(express, { secret: SECRET, nodes: nodesOption(servers), ...options })
    shops.push(shop)
    const io = new SocketServer(shop.server)
    ios.push(io)
    io.engine.use(shop.sessions)
    io.on('connection', (socket) => {
      const req = socket.request as unknown as SessionRequest
      socket.emit('cart', req.session.cart ?? [])
      // The guide's way to change the session from an event: reload it, change it, save it.
      socket.on('add', (item: string, reply: (result: unknown) => void) => {
        req.session.reload((error) => {
          if (error) return reply({ error: String(error) })
          req.session.cart = [...(req.session.cart ?? []), item]
          ;(req.session as unknown as { save(cb: (e?: unknown) => void): void }).save((saveError) =>
            reply(saveError ? { error: String(saveError) } : { cart: req.session.cart }),
          )
        })
      })
    })
    return { shop, io }
  }

  function connect(shop: ShopApp, cookie: string | undefined, transport: 'websocket' | 'polling') {
    const client = connectClient(shop.url, {
      transports: [transport],
      extraHeaders: cookie ? { cookie } : {},
      reconnection: false,
      forceNew: true,
    })
    clients.push(client)
    return client
  }

  /** A logger that keeps its warnings and errors (close() warns of requests still in flight). */
  const recordingLogger = () => {
    const warnings: string[] = []
    const errors: string[] = []
    const logger = {
      debug() {},
      info() {},
      warn: (_: unknown, message: string) => warnings.push(message),
      error: (_: unknown, message: string) => errors.push(message),
    }
    return { warnings, errors, logger }
  }

  /** Upgrades to socket.io's WebSocket with `cookie`: each Set-Cookie line of the 101. */
  const upgradeCookies = (shop: ShopApp, cookie: string | undefined) =>
    new Promise<string[]>((resolve, reject) => {
      const upgrade = request(`${shop.url}/socket.io/?EIO=4&transport=websocket`, {
        headers: {
          cookie: cookie ?? '',
          connection: 'Upgrade',
          upgrade: 'websocket',
          'sec-websocket-key': Buffer.from('0123456789abcdef').toString('base64'),
          'sec-websocket-version': '13',
        },
      })
      upgrade.once('upgrade', (response, socket) => {
        socket.destroy()
        const raw = response.rawHeaders
        resolve(raw.filter((_, i) => i % 2 === 1 && /^set-cookie$/i.test(raw[i - 1] ?? '')))
      })
      upgrade.once('response', (response) => reject(new Error(`no upgrade: ${response.statusCode}`)))
      upgrade.once('error', reject)
      upgrade.end()
    })

  const firstCart = (client: Socket) =>
    new Promise<string[]>((resolve, reject) => {
      client.once('cart', resolve)
      client.once('connect_error', reject)
    })

  afterEach(async () => {
    for (const client of clients) client.close()
    await Promise.all(ios.map((io) => io.close()))
    await Promise.all(shops.map((shop) => shop.close()))
    clients = []
    ios = []
    shops = []
    await stopAllMemcached()
    servers = undefined as unknown as MemcachedServer[]
  })

  for (const transport of ['websocket', 'polling'] as const) {
    it(`serves the session over ${transport}, and neither holds its lock nor loses a change ('auto')`, async () => {
      // A lock held for the connection's life would fail the HTTP request below after lockTimeout.
      const { shop } = await shopWithSocketIo({ lockTimeout: 1000 })
      const browser = new Browser()
      await browser.send(shop, 'POST', '/cart/apple')
      const client = connect(shop, browser.cookie, transport)
      expect(await firstCart(client)).toEqual(['apple'])

      const pear = await browser.send(shop, 'POST', '/cart/pear')
      expect(pear.status).toBe(200)
      expect(pear.body.cart).toEqual(['apple', 'pear'])
      const plum = await client.timeout(5000).emitWithAck('add', 'plum')
      expect(plum).toEqual({ cart: ['apple', 'pear', 'plum'] })
      expect((await browser.send(shop, 'POST', '/cart/fig')).body.cart).toEqual([
        'apple',
        'pear',
        'plum',
        'fig',
      ])
    })
  }

  it('sends a cookie that is due (rolling) with the 101, while the lock is released in the background', async () => {
    // 'auto' (the default): the first request of a route locks, so this commit needs a node round trip.
    const { shop } = await shopWithSocketIo({ rolling: true })
    const browser = new Browser()
    await browser.send(shop, 'POST', '/cart/apple')
    const cookies = await upgradeCookies(shop, browser.cookie)
    expect(cookies).toHaveLength(1)
    expect(cookies[0]).toMatch(/^connect\.sid=s%3A/)
    expect(cookies[0]).toContain(encodeURIComponent(browser.sessionId ?? '-'))
  })

  it("sends the session cookie on a 101 line of its own beside another middleware's cookie", async () => {
    const { shop, io } = await shopWithSocketIo({ rolling: true })
    // Mounted before the sessions' engine.use() in socket.io's order of middleware: its cookie is set first.
    ;(io.engine as unknown as { middlewares: unknown[] }).middlewares.unshift(
      (_req: unknown, res: { setHeader(name: string, value: string): void }, next: () => void) => {
        res.setHeader('Set-Cookie', 'affinity=node1; Path=/')
        next()
      },
    )
    const browser = new Browser()
    await browser.send(shop, 'POST', '/cart/apple')
    const cookies = await upgradeCookies(shop, browser.cookie)
    expect(cookies).toHaveLength(2)
    expect(cookies).toContain('affinity=node1; Path=/')
    expect(cookies.find((cookie) => cookie.startsWith('connect.sid='))).toContain(
      encodeURIComponent(browser.sessionId ?? '-'),
    )
  })

  it('survives an upgrade whose client resets its connection while it waits for the lock, and leaves no lock', async () => {
    const { warnings, logger } = recordingLogger()
    const { shop, io } = await shopWithSocketIo({ lockingMode: 'all', lockTimeout: 3000, logger })
    // A middleware after the sessions' that refuses this upgrade: nothing then calls the stand-in's writeHead().
    io.engine.use((_req: unknown, _res: unknown, next: (error?: Error) => void) => next(new Error('refused')))
    const browser = new Browser()
    await browser.send(shop, 'POST', '/cart/apple')
    let release: (() => void) | undefined
    shop.beforeModify = () => new Promise<void>((resolve) => (release = resolve))
    const holding = browser.send(shop, 'POST', '/slow/pear')
    // The slow request holds the session's lock from here.
    await until(() => release !== undefined, 5000)
    const socket = connectSocket(Number(new URL(shop.url).port), '127.0.0.1')
    socket.on('error', () => {})
    socket.write(
      `GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nCookie: ${browser.cookie}\r\n` +
        'Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n' +
        `Sec-WebSocket-Key: ${Buffer.from('0123456789abcdef').toString('base64')}\r\n\r\n`,
    )
    // Reset (RST) while the upgrade waits for the lock the slow request holds.
    await new Promise((resolve) => setTimeout(resolve, 300))
    socket.resetAndDestroy()
    await new Promise((resolve) => setTimeout(resolve, 100))
    release?.()
    shop.beforeModify = async () => {}
    expect((await holding).status).toBe(200)
    // The upgrade's lock, taken after the slow request's, must not be left to expire.
    const next = await browser.send(shop, 'POST', '/cart/plum')
    expect(next.status).toBe(200)
    expect(next.body.cart).toEqual(['apple', 'pear', 'plum'])
    await shop.sessions.close({ timeout: 3000 })
    expect(warnings.filter((warning) => warning.includes('still in flight'))).toEqual([])
  })

  it("neither holds the lock nor stays in flight for express-ws's upgrade, routed through a response nothing ends", async () => {
    const { warnings, logger } = recordingLogger()
    servers ??= await startCluster(2)
    const shop = await startShop(express, {
      secret: SECRET,
      nodes: nodesOption(servers),
      lockingMode: 'all',
      lockTimeout: 1000,
      logger,
    })
    shops.push(shop)
    // express-ws's way: ws answers the handshake, then the request goes through the app with a response that has
    // no connection, and its route gets the WebSocket.
    const app = shop.server.listeners('request')[0] as ((
      req: unknown,
      res: unknown,
      done: () => void,
    ) => void) & {
      get(
        path: string,
        handler: (req: SessionRequest & { ws?: WebSocket }, res: unknown, next: () => void) => void,
      ): void
    }
    app.get('/live/.websocket', (req, _res, next) => {
      if (!req.ws) return next()
      req.session.cart = [...(req.session.cart ?? []), 'via websocket']
      req.ws.send('ready')
    })
    const wss = new WebSocketServer({ noServer: true })
    shop.server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      wss.handleUpgrade(req, socket, head, (ws) => {
        Object.assign(req, { ws, url: '/live/.websocket' })
        app(req, new ServerResponse(req), () => ws.close())
      })
    })
    const browser = new Browser()
    await browser.send(shop, 'POST', '/cart/apple')
    const ws = new WebSocket(`${shop.url.replace('http', 'ws')}/live`, {
      headers: { cookie: browser.cookie ?? '' },
    })
    try {
      await new Promise((resolve, reject) => {
        ws.once('message', resolve)
        ws.once('error', reject)
      })
      // Held for the WebSocket's life, the lock would answer this with a 503 after lockTimeout.
      const pear = await browser.send(shop, 'POST', '/cart/pear')
      expect(pear.status).toBe(200)
      expect(pear.body.cart).toEqual(['apple', 'via websocket', 'pear'])
    } finally {
      ws.close()
      wss.close()
    }
    await shop.close()
    shops.splice(shops.indexOf(shop), 1)
    expect(warnings.filter((warning) => warning.includes('still in flight'))).toEqual([])
  })

  const changes = {
    'is too large': (session: Record<string, unknown>) => {
      session.blob = 'x'.repeat(8192)
    },
    'cannot be serialized': (session: Record<string, unknown>) => {
      session.count = 10n
    },
  }
  for (const [problem, change] of Object.entries(changes)) {
    it(`cuts the WebSocket whose changed session ${problem}, says why, and releases its lock`, async () => {
      const { errors, logger } = recordingLogger()
      const { shop, io } = await shopWithSocketIo({ maxSessionBytes: 4096, lockTimeout: 1000, logger })
      // Another engine middleware, after the session's, changes it.
      io.engine.use((req: SessionRequest, _res: unknown, next: () => void) => {
        change(req.session)
        next()
      })
      const browser = new Browser()
      await browser.send(shop, 'POST', '/cart/apple')
      const client = connect(shop, browser.cookie, 'websocket')
      const ended = await new Promise<string>((resolve) => {
        client.once('disconnect', () => resolve('disconnected'))
        client.once('connect_error', () => resolve('refused'))
      })
      expect(['disconnected', 'refused']).toContain(ended)
      expect(errors).toContain(
        'session-failover: the session of a WebSocket upgrade could not be stored; connection cut',
      )
      const next = await browser.send(shop, 'POST', '/cart/pear')
      expect(next.status).toBe(200)
      expect(next.body.cart).toEqual(['apple', 'pear'])
    })
  }
})
