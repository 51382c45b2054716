import type { Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import express, { type NextFunction, type Request, type Response } from 'express'
import passport from 'passport'
import { Strategy } from 'passport-local'
import { afterEach, describe, expect, it } from 'vitest'
import { parseSessionId, type SessionFailoverOptions, sessionFailover } from '../src/index.js'
import { Browser } from './support/app.js'
import { type MemcachedServer, nodesOption, startCluster, stopAllMemcached } from './support/memcached.js'

// Passport's login calls req.session.regenerate() then save(), its logout save() then regenerate(): the most
// common user of express-session's session methods, run here unchanged against real nodes.
describe.each([
  { mode: 'non-sticky', options: {} },
  { mode: 'sticky', options: { sticky: true } },
] as const)('a passport login ($mode)', ({ options }) => {
  let servers: MemcachedServer[]
  const closers: Array<() => Promise<void>> = []

  afterEach(async () => {
    await Promise.all(closers.splice(0).map((close) => close()))
    await stopAllMemcached()
  })

  async function start(extra: Partial<SessionFailoverOptions> = {}) {
    servers = await startCluster(3)
    const sessions = sessionFailover({
      secret: 'passport',
      nodes: nodesOption(servers),
      operationTimeout: 300,
      ...options,
      ...extra,
    })
    const auth = new passport.Passport()
    auth.use(new Strategy((name, password, done) => done(null, password === 'pw' ? { name } : false)))
    auth.serializeUser((user, done) => done(null, (user as { name: string }).name))
    auth.deserializeUser((name: string, done) => done(null, { name }))
    const app = express()
    app.use(express.json())
    app.use(sessions)
    app.use(auth.session())
    app.post('/cart/:item', (req, res) => {
      req.session.cart = [...(req.session.cart ?? []), String(req.params.item)]
      res.json({ cart: req.session.cart })
    })
    app.post('/login', auth.authenticate('local', { keepSessionInfo: true }), (req, res) => {
      res.json({ user: req.user })
    })
    app.post('/logout', (req, res, next) =>
      req.logout((error) => (error ? next(error) : res.json({ ok: true }))),
    )
    app.get('/me', (req, res) => {
      res.json({ user: req.user ?? null, cart: req.session.cart ?? null })
    })
    app.use(
      (error: { status?: number; message: string }, _req: Request, res: Response, _next: NextFunction) =>
        res.status(error.status ?? 500).json({ error: error.message }),
    )
    const server: Server = await new Promise((resolve) => {
      const listening = app.listen(0, '127.0.0.1', () => resolve(listening))
    })
    closers.push(async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
      await sessions.close()
    })
    return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` }
  }

  const login = (app: { url: string }, browser: Browser) =>
    fetch(`${app.url}/login`, {
      method: 'POST',
      headers: { cookie: browser.cookie ?? '', 'content-type': 'application/json' },
      body: JSON.stringify({ username: 'ann', password: 'pw' }),
    }).then((response) => {
      const setCookie = response.headers.getSetCookie().find((c) => c.startsWith('connect.sid='))
      if (setCookie) browser.cookie = setCookie.split(';')[0]
      return response.status
    })

  it('logs in under a new id, keeps the cart, survives the death of its node, and logs out for good', async () => {
    const app = await start()
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const anonymous = new Browser()
    anonymous.cookie = browser.cookie

    expect(await login(app, browser)).toBe(200)
    expect(browser.cookie).not.toBe(anonymous.cookie)
    expect((await browser.send(app, 'GET', '/me')).body).toEqual({ user: { name: 'ann' }, cart: ['apple'] })
    // The id from before the login is not logged in (session fixation).
    expect((await anonymous.send(app, 'GET', '/me')).body.user).toBeNull()

    const node = Number(parseSessionId(browser.sessionId)?.nodeId.slice(1))
    await (servers[node - 1] as MemcachedServer).kill()
    expect((await browser.send(app, 'GET', '/me')).body).toEqual({ user: { name: 'ann' }, cart: ['apple'] })

    const loggedIn = browser.cookie
    expect((await browser.send(app, 'POST', '/logout')).status).toBe(200)
    expect((await browser.send(app, 'GET', '/me')).body.user).toBeNull()
    const replayed = new Browser()
    replayed.cookie = loggedIn
    expect((await replayed.send(app, 'GET', '/me')).body.user).toBeNull()
  })
})
