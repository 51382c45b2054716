import type { Server } from 'node:http'
import { type AddressInfo, connect } from 'node:net'
import express5 from 'express'
import express4 from 'express4'
import {
  type SessionFailoverMiddleware,
  type SessionFailoverOptions,
  sessionFailover,
} from '../../src/index.js'
import { until } from './until.js'

export const expressVersions = [
  { name: 'Express 4', express: express4 as unknown as typeof express5 },
  { name: 'Express 5', express: express5 },
] as const

export type ExpressModule = (typeof expressVersions)[number]['express']

declare module 'express-session' {
  interface SessionData {
    cart: string[]
    views: number
  }
}

export interface ShopApp {
  readonly url: string
  readonly server: Server
  readonly sessions: SessionFailoverMiddleware
  /** Runs inside POST /slow/:item after the session was loaded and before it is modified. */
  beforeModify: () => Promise<void>
  /** What the routes that do not wait for a session operation saw of it settling (POST /logout-unawaited...). */
  readonly settledLate: string[]
  close(): Promise<void>
}

/** A small shop on a real HTTP server: the cart lives in the session. */
export async function startShop(express: ExpressModule, options: SessionFailoverOptions): Promise<ShopApp> {
  const app = express()
  const sessions = sessionFailover(options)
  app.use(sessions)
  const shop = { settledLate: [] as string[] } as unknown as ShopApp
  shop.beforeModify = async () => {}

  app.get('/cart', (req, res) => {
    res.json({ id: req.sessionID, cart: req.session.cart ?? [] })
  })
  app.get('/cart/held', async (req, res) => {
    // A read that waits for the test (beforeModify) before it answers.
    await shop.beforeModify()
    res.json({ cart: req.session.cart ?? [] })
  })
  app.post('/cart/:item', (req, res) => {
    req.session.cart = [...(req.session.cart ?? []), String(req.params.item)]
    res.json({ id: req.sessionID, cart: req.session.cart })
  })
  app.post('/slow/:item', async (req, res, next) => {
    try {
      await shop.beforeModify()
      req.session.cart = [...(req.session.cart ?? []), String(req.params.item)]
      res.json({ cart: req.session.cart })
    } catch (error) {
      next(error)
    }
  })
  app.post('/stream/:item', (req, res) => {
    req.session.cart = [...(req.session.cart ?? []), String(req.params.item)]
    res.write('{"cart":')
    res.end(`${JSON.stringify(req.session.cart)}}`)
  })
  app.post('/big/:kb', (req, res) => {
    ;(req.session as unknown as { blob: string }).blob = 'x'.repeat(Number(req.params.kb) * 1024)
    res.json({ ok: true })
  })
  // Not under /slow/: POST /slow/:item would serve it.
  app.post('/answer-slowly', (_req, res) => {
    setTimeout(() => res.json({ slow: true }), 400)
  })
  app.post('/max-age/:ms', (req, res) => {
    req.session.cookie.maxAge = Number(req.params.ms)
    req.session.cart = [...(req.session.cart ?? []), 'aged']
    res.json({ cart: req.session.cart })
  })
  app.post('/count', (req, res) => {
    req.session.views = (req.session.views ?? 0) + 1
    res.json({ views: req.session.views })
  })
  app.post('/count/slow', (req, res) => {
    // ?refuse: a form refused, as a 400 that leaves the session alone.
    if (req.query.refuse) {
      res.status(400).json({ refused: true })
      return
    }
    // Read at the start, write 30 ms later: parallel requests that are not kept apart overwrite each other.
    const views = req.session.views ?? 0
    setTimeout(() => {
      req.session.views = views + 1
      res.json({ views: req.session.views })
    }, 30)
  })
  app.post('/key/:name', (req, res) => {
    ;(req.session as unknown as Record<string, boolean>)[`k_${req.params.name}`] = true
    res.json({ ok: true })
  })
  app.get('/keys', (req, res) => {
    res.json({ keys: Object.keys(req.session).filter((key) => key.startsWith('k_')) })
  })
  app.post('/save-twice/:item', async (req, res, next) => {
    try {
      await shop.beforeModify()
      req.session.cart = [...(req.session.cart ?? []), String(req.params.item)]
      await new Promise<void>((resolve, reject) =>
        req.session.save((error) => (error ? reject(error) : resolve())),
      )
      req.session.cart = [...req.session.cart, 'again']
      res.json({ cart: req.session.cart })
    } catch (error) {
      next(error)
    }
  })
  app.post('/stream-open', (req, res) => {
    // Headers and a first chunk go out, then the response stays open (server-sent events, long polling).
    req.session.views = (req.session.views ?? 0) + 1
    res.write('open')
  })
  app.post('/stream-logout', (req, res) => {
    // A logout while streaming: the commit that the first byte waits for is in flight when destroy() is called.
    req.session.views = 99
    res.write('open ')
    req.session.destroy(() => res.end('destroyed'))
  })
  const hanging = new Set<string>()
  app.post('/hang', (req) => {
    // Never answers: holds the session's lock until the client goes away or the lock expires. Noted, so a test
    // knows when it holds the lock (GET /hanging/:tag).
    hanging.add(String(req.query.tag))
  })
  app.get('/hanging/:tag', (req, res) => {
    res.json({ reached: hanging.has(String(req.params.tag)) })
  })
  app.post('/unset', (req, res) => {
    ;(req as { session: unknown }).session = null
    res.json({ ok: true })
  })
  app.post('/reload-then-key/:name', async (req, res, next) => {
    // Waits (beforeModify), reloads, waits again, then sets a key: others may write at each wait.
    try {
      await shop.beforeModify()
      await new Promise<void>((resolve, reject) =>
        req.session.reload((error: unknown) => (error ? reject(error) : resolve())),
      )
      await shop.beforeModify()
      ;(req.session as unknown as Record<string, unknown>)[`k_${req.params.name}`] = true
      res.json({ views: req.session.views ?? 0 })
    } catch (error) {
      next(error)
    }
  })
  app.get('/reload', (req, res, next) => {
    req.session.reload((error: unknown) => (error ? next(error) : res.json({ cart: req.session.cart ?? [] })))
  })
  app.get('/elsewhere/cart', (req, res) => {
    res.json({ hasSession: req.session !== undefined })
  })
  app.post('/logout', (req, res, next) => {
    req.session.destroy((error) => (error ? next(error) : res.json({ ok: true })))
  })
  app.post('/logout-unawaited', (req, res) => {
    // A logout that redirects without waiting for the delete: the response must wait for it all the same.
    req.session.destroy(() => shop.settledLate.push('destroyed'))
    res.redirect('/cart')
  })
  app.post('/save-unawaited', (req, res) => {
    // An explicit save of a session nothing changed, not waited for: stored, and its cookie sent.
    req.session.save(() => shop.settledLate.push('saved'))
    res.json({ ok: true })
  })
  app.post('/login', (req, res, next) => {
    const cart = req.session.cart
    req.session.regenerate((error) => {
      if (error) return next(error)
      req.session.cart = cart ?? []
      res.json({ id: req.sessionID })
    })
  })
  app.post('/login-stream', (req, res, next) => {
    // A login that streams: the new session's cookie goes out with the first chunk, then (beforeModify) it changes.
    req.session.regenerate(async (error) => {
      if (error) return next(error)
      req.session.cart = ['login']
      res.write('open ')
      await shop.beforeModify()
      ;(req.session as unknown as Record<string, unknown>).k_stream = true
      res.end('done')
    })
  })
  app.post('/save-then-fail', (req, res, next) => {
    req.session.views = (req.session.views ?? 0) + 1
    req.session.save((error) => (error ? next(error) : res.json({ id: req.sessionID })))
  })

  const server: Server = await new Promise((resolve) => {
    const listening = app.listen(0, '127.0.0.1', () => resolve(listening))
  })
  const { port } = server.address() as AddressInfo
  Object.assign(shop, {
    url: `http://127.0.0.1:${port}`,
    server,
    sessions,
    async close() {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
      await sessions.close()
    },
  })
  return shop
}

export interface Reply {
  readonly status: number
  readonly body: { id?: string; cart?: string[] } & Record<string, unknown>
  readonly setCookie: string | undefined
  readonly headers: Headers
  readonly elapsedMs: number
}

/** A browser: one cookie jar, any number of app instances behind it. */
export class Browser {
  cookie: string | undefined

  constructor(readonly cookieName = 'connect.sid') {}

  async send(app: Pick<ShopApp, 'url'>, method: 'GET' | 'POST', path: string): Promise<Reply> {
    const started = performance.now()
    const response = await fetch(app.url + path, {
      method,
      headers: this.cookie ? { cookie: this.cookie } : {},
      signal: AbortSignal.timeout(15_000),
    })
    const text = await response.text()
    const elapsedMs = performance.now() - started
    const setCookie = response.headers.getSetCookie().find((c) => c.startsWith(`${this.cookieName}=`))
    if (setCookie) this.cookie = setCookie.split(';')[0]
    let body: Reply['body'] = {}
    try {
      body = JSON.parse(text)
    } catch {
      body = { text }
    }
    return { status: response.status, body, setCookie, headers: response.headers, elapsedMs }
  }

  /** The session id inside the signed cookie. */
  get sessionId(): string | undefined {
    if (!this.cookie) return undefined
    const value = decodeURIComponent(this.cookie.slice(this.cookie.indexOf('=') + 1))
    return value.slice(2, value.lastIndexOf('.'))
  }
}

let hangingRequests = 0

/**
 * Starts a request to POST /hang, which never answers: it holds its session's lock until `abort()` (the client
 * going away) or until the lock expires. `done` settles once the request is over; `reached()` once its handler
 * runs, so its session is loaded and, where the mode locks, its lock held.
 */
export function hangingRequest(
  app: Pick<ShopApp, 'url'>,
  cookie: string | undefined,
  { json }: { json?: string } = {},
) {
  const controller = new AbortController()
  const tag = String(++hangingRequests)
  const done = fetch(`${app.url}/hang?tag=${tag}`, {
    method: 'POST',
    headers: { cookie: cookie ?? '', ...(json === undefined ? {} : { 'content-type': 'application/json' }) },
    ...(json === undefined ? {} : { body: json }),
    signal: controller.signal,
  }).then(
    () => 'answered',
    () => 'aborted',
  )
  // Asked without a cookie: no session, so no lock to wait for.
  const reached = () =>
    until(
      async () => ((await (await fetch(`${app.url}/hanging/${tag}`)).json()) as { reached: boolean }).reached,
    )
  return { abort: () => controller.abort(), done, reached }
}

/**
 * Makes the shop's next POST /slow/:item (or GET /cart/held) stop before it modifies the session: `reached`
 * settles once it has loaded the session and stopped there, `release()` lets it go on.
 */
export function pauseBeforeModify(shop: Pick<ShopApp, 'beforeModify'>): {
  reached: Promise<void>
  release(): void
} {
  let arrive = (): void => {}
  let release = (): void => {}
  const reached = new Promise<void>((resolve) => {
    arrive = resolve
  })
  shop.beforeModify = () => {
    // The next request only: those after it go on at once.
    shop.beforeModify = async () => {}
    arrive()
    return new Promise<void>((resolve) => {
      release = resolve
    })
  }
  return { reached, release: () => release() }
}

/**
 * Requests `path` (GET unless told) from a raw connection: `onArrival` runs as the response's first bytes
 * arrive, before any HTTP client's parsing, so a test can order them against other I/O. Settles with those bytes.
 */
export function firstBytes(
  app: Pick<ShopApp, 'url'>,
  path: string,
  onArrival: () => void,
  { method = 'GET', cookie }: { method?: 'GET' | 'POST'; cookie?: string | undefined } = {},
): Promise<string> {
  const socket = connect(Number(new URL(app.url).port), '127.0.0.1')
  return new Promise((resolve, reject) => {
    socket.once('error', reject)
    socket.once('data', (chunk: Buffer) => {
      onArrival()
      socket.destroy()
      resolve(chunk.toString())
    })
    const cookieLine = cookie ? `Cookie: ${cookie}\r\n` : ''
    socket.write(`${method} ${path} HTTP/1.1\r\nHost: shop\r\n${cookieLine}Content-Length: 0\r\n\r\n`)
  })
}
