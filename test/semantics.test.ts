import { connect } from 'node:net'
import { sign } from 'cookie-signature'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { storageKeys } from '../src/core/keys.js'
import { parseSessionId, type SessionFailoverOptions } from '../src/index.js'
import { Browser, expressVersions, type ShopApp, startShop } from './support/app.js'
import { type MemcachedServer, nodesOption, startCluster, stopAllMemcached } from './support/memcached.js'
import { recordsOf } from './support/records.js'

const SECRET = 'semantics-secret'

describe.each(expressVersions)('express-session semantics on $name', ({ express }) => {
  let servers: MemcachedServer[]
  let apps: ShopApp[] = []

  async function shop(options: Partial<SessionFailoverOptions> = {}): Promise<ShopApp> {
    servers ??= await startCluster(2)
    // These tests count writes to check express-session's options; locks would add writes of their own.
    const app = await startShop(express, {
      secret: SECRET,
      nodes: nodesOption(servers),
      lockingMode: 'none',
      ...options,
    })
    apps.push(app)
    return app
  }

  afterEach(async () => {
    await Promise.all(apps.map((app) => app.close()))
    apps = []
    await stopAllMemcached()
    servers = undefined as unknown as MemcachedServer[]
  })

  const sets = async () =>
    (await Promise.all(servers.map((s) => s.stats()))).reduce((n, s) => n + (s.cmd_set ?? 0), 0)
  const touches = async () =>
    (await Promise.all(servers.map((s) => s.stats()))).reduce((n, s) => n + (s.cmd_touch ?? 0), 0)
  const keysOf = (id: string | undefined) => storageKeys('sf:', parseSessionId(id)?.random ?? '')
  const primaryOf = (id: string | undefined) =>
    servers[Number(parseSessionId(id)?.nodeId.slice(1)) - 1] as MemcachedServer

  it('neither stores nor sends a cookie for an untouched new session (saveUninitialized: false)', async () => {
    const app = await shop()
    const before = await sets()
    const reply = await new Browser().send(app, 'GET', '/cart')
    expect(reply.status).toBe(200)
    expect(reply.setCookie).toBeUndefined()
    expect(await sets()).toBe(before)
  })

  it('stores and sends new sessions with saveUninitialized: true', async () => {
    const app = await shop({ saveUninitialized: true })
    const browser = new Browser()
    const reply = await browser.send(app, 'GET', '/cart')
    expect(reply.setCookie).toBeDefined()
    expect(await primaryOf(browser.sessionId).has(keysOf(browser.sessionId).primary)).toBe(true)
  })

  it('rewrites an unchanged session only with resave: true', async () => {
    for (const resave of [false, true]) {
      const app = await shop({ resave })
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/apple')
      const before = await sets()
      await browser.send(app, 'GET', '/cart')
      expect(await sets()).toBe(resave ? before + 2 : before)
    }
  })

  it('sends the cookie on every response with rolling: true, without writing', async () => {
    const app = await shop({ rolling: true, cookie: { maxAge: 60_000 } })
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const before = await sets()
    const reply = await browser.send(app, 'GET', '/cart')
    expect(reply.setCookie).toMatch(/Expires=/)
    expect(await sets()).toBe(before)
  })

  it('stores with the TTL of cookie.maxAge, or `ttl` for a browser-session cookie', async () => {
    const withMaxAge = await shop({ cookie: { maxAge: 120_000 } })
    const a = new Browser()
    const reply = await a.send(withMaxAge, 'POST', '/cart/apple')
    expect(reply.setCookie).toMatch(/Expires=/)
    const ttlA = await primaryOf(a.sessionId).ttl(keysOf(a.sessionId).primary)
    expect(ttlA).toBeGreaterThan(110)
    expect(ttlA).toBeLessThanOrEqual(120)

    const sessionCookie = await shop({ ttl: 3600 })
    const b = new Browser()
    expect((await b.send(sessionCookie, 'POST', '/cart/apple')).setCookie).not.toMatch(/Expires=/)
    const ttlB = await primaryOf(b.sessionId).ttl(keysOf(b.sessionId).backup.replace('bak:', ''))
    expect(ttlB).toBeGreaterThan(3590)
  })

  it('keeps a session whose cookie lives for a century until the last expiry memcached can hold (2106)', async () => {
    const century = 100 * 365 * 24 * 3600 * 1000
    const app = await shop({ cookie: { maxAge: century } })
    const browser = new Browser()
    expect((await browser.send(app, 'POST', '/cart/apple')).status).toBe(200)
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['apple'])
    const ttl = (await primaryOf(browser.sessionId).ttl(keysOf(browser.sessionId).primary)) ?? 0
    expect(ttl).toBeGreaterThan(0xffff_ffff - Date.now() / 1000 - 3600)
    expect(app.sessions.stats().nodes.every((node) => node.alive)).toBe(true)
  })

  it('answers an error and stores nothing when the application sets cookie.maxAge to NaN or Infinity', async () => {
    const app = await shop()
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const before = await sets()
    for (const ms of ['NaN', 'Infinity']) {
      expect((await browser.send(app, 'POST', `/max-age/${ms}`)).status).toBe(500)
    }
    // A NaN expiry would have been stored as "never expires" (memcached reads the 0 it becomes so).
    expect(await sets()).toBe(before)
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['apple'])
    expect(app.sessions.stats().nodes.every((node) => node.alive)).toBe(true)
  })

  it('refreshes the expiry of an unchanged session with touches, not writes, once touchAfter has passed', async () => {
    const eager = await shop({ touchAfter: 0, ttl: 600 })
    const browser = new Browser()
    await browser.send(eager, 'POST', '/cart/apple')
    const [setsBefore, touchesBefore] = [await sets(), await touches()]
    await browser.send(eager, 'GET', '/cart')
    // The touches do not hold the response: wait for them to reach the nodes.
    await vi.waitFor(async () => expect(await touches()).toBeGreaterThanOrEqual(touchesBefore + 2), {
      timeout: 5000,
      interval: 20,
    })
    expect(await sets()).toBe(setsBefore)
    expect(await touches()).toBe(touchesBefore + 2) // primary and backup

    const lazy = await shop({ ttl: 600 }) // touchAfter 0.1: nothing to refresh right after a write
    const other = new Browser()
    await other.send(lazy, 'POST', '/cart/apple')
    const touchesNow = await touches()
    await other.send(lazy, 'GET', '/cart')
    await new Promise((resolve) => setTimeout(resolve, 100))
    expect(await touches()).toBe(touchesNow)
  })

  it("removes both copies when req.session is unset with unset: 'destroy', keeps them with 'keep'", async () => {
    for (const unset of ['destroy', 'keep'] as const) {
      const app = await shop({ unset })
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/apple')
      const keys = keysOf(browser.sessionId)
      await browser.send(app, 'POST', '/unset')
      const stored = await Promise.all(servers.flatMap((s) => [s.has(keys.primary), s.has(keys.backup)]))
      expect(stored.some(Boolean)).toBe(unset === 'keep')
    }
  })

  it('sends a secure cookie only over https, trusting X-Forwarded-Proto with proxy: true', async () => {
    const plain = await shop({ cookie: { secure: true } })
    expect((await new Browser().send(plain, 'POST', '/cart/a')).setCookie).toBeUndefined()

    const proxied = await shop({ cookie: { secure: true }, proxy: true })
    const reply = await fetch(`${proxied.url}/cart/a`, {
      method: 'POST',
      headers: { 'x-forwarded-proto': 'https' },
    })
    expect(reply.headers.getSetCookie()[0]).toMatch(/; Secure/)
  })

  it("resolves sameSite 'auto', in any case, to None and Secure over https and to Lax over http", async () => {
    const app = await shop({ cookie: { sameSite: 'Auto' as 'auto' }, proxy: true })
    const secure = await fetch(`${app.url}/cart/a`, {
      method: 'POST',
      headers: { 'x-forwarded-proto': 'https' },
    })
    expect(secure.status).toBe(200)
    expect(secure.headers.getSetCookie()[0]).toMatch(/; Secure; SameSite=None$/)
    const plain = await new Browser().send(app, 'POST', '/cart/a')
    expect(plain.status).toBe(200)
    expect(plain.setCookie).toMatch(/; SameSite=Lax$/)
    expect(plain.setCookie).not.toMatch(/Secure/)
  })

  it('serves requests without the cookie when its name is also an Object property (constructor)', async () => {
    const app = await shop({ name: 'constructor' })
    const browser = new Browser('constructor')
    const first = await browser.send(app, 'POST', '/cart/a')
    expect(first.status).toBe(200)
    expect(first.setCookie).toMatch(/^constructor=s%3A/)
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['a'])
    // A Cookie header without the session's cookie: the parsed object answers the name from its prototype.
    const other = await fetch(`${app.url}/cart`, { headers: { cookie: 'theme=dark' } })
    expect(other.status).toBe(200)
    expect(await other.json()).toMatchObject({ cart: [] })
  })

  it('verifies cookies signed with any configured secret (rotation), and re-signs old ones with the first', async () => {
    const old = await shop({ secret: 'old-secret' })
    const browser = new Browser()
    await browser.send(old, 'POST', '/cart/apple')
    const rotated = await shop({ secret: ['new-secret', 'old-secret'] })
    const reply = await browser.send(rotated, 'GET', '/cart')
    expect(reply.body.cart).toEqual(['apple'])
    const value = decodeURIComponent(reply.setCookie?.split(';')[0]?.split('=')[1] ?? '')
    expect(value).toBe(`s:${sign(browser.sessionId as string, 'new-secret')}`)
    // Once re-signed, the cookie is not sent again for an unchanged session.
    expect((await browser.send(rotated, 'GET', '/cart')).setCookie).toBeUndefined()
  })

  it('stores, and sends the cookie of, a new session saved by a save() the handler did not wait for', async () => {
    const app = await shop()
    const browser = new Browser()
    const reply = await browser.send(app, 'POST', '/save-unawaited')
    expect(reply.setCookie).toBeDefined()
    expect(app.settledLate).toEqual(['saved'])
    expect(await primaryOf(browser.sessionId).has(keysOf(browser.sessionId).primary)).toBe(true)
  })

  it('supports save() and reload() inside a request, without writing twice', async () => {
    const app = await shop()
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const before = await sets()
    expect((await browser.send(app, 'POST', '/save-then-fail')).status).toBe(200)
    expect(await sets()).toBe(before + 2)
    expect((await browser.send(app, 'GET', '/reload')).body.cart).toEqual(['apple'])
  })

  it("merges a change made after reload() against the reloaded data, with resave: true too ('merge')", async () => {
    const app = await shop({ resave: true, lockingMode: 'merge' })
    const browser = new Browser()
    await browser.send(app, 'POST', '/count') // views 1
    const gates: Array<() => void> = []
    app.beforeModify = () => new Promise<void>((resolve) => gates.push(resolve))
    const slow = browser.send(app, 'POST', '/reload-then-key/late')
    const until = async (count: number) => {
      while (gates.length < count) await new Promise((resolve) => setTimeout(resolve, 5))
    }
    await until(1)
    app.beforeModify = async () => {}
    await browser.send(app, 'POST', '/count') // views 2, before the reload
    gates[0]?.()
    app.beforeModify = () => new Promise<void>((resolve) => gates.push(resolve))
    await until(2)
    app.beforeModify = async () => {}
    await browser.send(app, 'POST', '/count') // views 3, after it
    gates[1]?.()
    expect((await slow).status).toBe(200)
    // Diffed against the first load instead, the reloaded views (2) would count as this request's change.
    const stored = await browser.send(app, 'GET', '/keys')
    expect(stored.body.keys).toEqual(['k_late'])
    expect((await browser.send(app, 'POST', '/count')).body.views).toBe(4)
    expect(app.sessions.stats().mergeConflicts).toBe(0)
  })

  it('leaves requests outside cookie.path without a session', async () => {
    const app = await shop({ cookie: { path: '/cart' } })
    expect((await new Browser().send(app, 'GET', '/elsewhere/cart')).body.hasSession).toBe(false)
  })

  it('serves a session to a request whose target is in absolute form, as proxies send it', async () => {
    const app = await shop()
    const { port } = new URL(app.url)
    const socket = connect(Number(port), '127.0.0.1')
    const reply = await new Promise<string>((resolve) => {
      let bytes = ''
      socket.on('data', (chunk) => {
        bytes += chunk.toString()
      })
      socket.on('close', () => resolve(bytes))
      socket.write(
        `POST http://127.0.0.1:${port}/cart/apple?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`,
      )
    })
    // Express routes it by its path; without a session there, the route fails (500).
    expect(reply.split('\r\n')[0]).toBe('HTTP/1.1 200 OK')
    expect(reply).toContain('"cart":["apple"]')
    expect(reply.toLowerCase()).toContain('set-cookie: connect.sid=')
  })

  it('falls back to the backup when the primary copy is corrupt, and a fresh session when both are', async () => {
    const app = await shop()
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const keys = keysOf(browser.sessionId)
    const primary = primaryOf(browser.sessionId)
    await primary.put(keys.primary, Buffer.from('not a session'))
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['apple'])
    expect(await primary.has(keys.primary)).toBe(true)

    const badJson = recordsOf(SECRET).encode(browser.sessionId, { version: 9, json: '{oops' })
    for (const server of servers) {
      await server.put(keys.primary, badJson)
      await server.put(keys.backup, badJson)
    }
    const reply = await browser.send(app, 'POST', '/cart/pear')
    expect(reply.status).toBe(200)
    expect(reply.body.cart).toEqual(['pear'])
  })
})
