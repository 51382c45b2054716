import { sign } from 'cookie-signature'
import express from 'express'
import { afterEach, describe, expect, it } from 'vitest'
import { storageKeys } from '../src/core/keys.js'
import { parseSessionId, type SessionFailoverOptions } from '../src/index.js'
import { Browser, hangingRequest, pauseBeforeModify, type ShopApp, startShop } from './support/app.js'
import {
  type Backend,
  backends,
  type CacheServer,
  nodesFor,
  startBackend,
  stopAllServers,
} from './support/backends.js'
import { startFastifyShop } from './support/fastify-app.js'
import { startAppProcess, stopAllAppProcesses } from './support/instance.js'
import { until } from './support/until.js'

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** Every backend under Express, and Fastify on memcached: the suites below run on each. */
const setups: ReadonlyArray<{
  name: string
  backend: Backend
  start: (o: SessionFailoverOptions) => Promise<ShopApp>
}> = [
  ...backends.map((backend) => ({
    name: `${backend}, Express`,
    backend,
    start: (options: SessionFailoverOptions) => startShop(express, options),
  })),
  { name: 'memcached, Fastify', backend: 'memcached', start: startFastifyShop },
]

/** Parallel requests of one session, split over two app instances sharing the nodes (non-sticky mode). */
describe.each(setups)('parallel requests of one session ($name)', ({ backend, start }) => {
  let servers: CacheServer[]
  const shops: ShopApp[] = []

  afterEach(async () => {
    await Promise.all(shops.splice(0).map((shop) => shop.close()))
    await stopAllAppProcesses()
    await stopAllServers()
  })

  async function instances(options: Partial<SessionFailoverOptions>): Promise<[ShopApp, ShopApp]> {
    servers = await startBackend(backend, 3)
    const all = { secret: 'parallel', nodes: nodesFor(servers), lockTimeout: 10_000, ...options }
    const pair = [await start(all), await start(all)] as [ShopApp, ShopApp]
    shops.push(...pair)
    return pair
  }
  async function session(app: ShopApp): Promise<Browser> {
    const browser = new Browser()
    expect((await browser.send(app, 'POST', '/cart/start')).status).toBe(200)
    return browser
  }
  const inParallel = (count: number, send: (i: number) => Promise<{ status: number }>) =>
    Promise.all(Array.from({ length: count }, (_, i) => send(i)))

  it.each([
    'all',
    'auto',
  ] as const)("counts 40 parallel increments exactly with lockingMode '%s'", async (mode) => {
    const [a, b] = await instances({ lockingMode: mode })
    const browser = await session(a)
    const replies = await inParallel(40, (i) => browser.send(i % 2 ? a : b, 'POST', '/count'))
    expect(replies.every((reply) => reply.status === 200)).toBe(true)
    expect((await browser.send(a, 'POST', '/count')).body.views).toBe(41)
    expect(a.sessions.stats().locksAcquired + b.sessions.stats().locksAcquired).toBeGreaterThanOrEqual(40)
  })

  it('keeps the slow increments apart too, so the lock really spans read to write', async () => {
    const [a, b] = await instances({ lockingMode: 'all' })
    const browser = await session(a)
    await inParallel(10, (i) => browser.send(i % 2 ? a : b, 'POST', '/count/slow'))
    expect((await browser.send(b, 'POST', '/count')).body.views).toBe(11)
  })

  it("loses updates with lockingMode 'none', as express-session does (the reason the other modes exist)", async () => {
    const [a, b] = await instances({ lockingMode: 'none' })
    const browser = await session(a)
    await inParallel(10, (i) => browser.send(i % 2 ? a : b, 'POST', '/count/slow'))
    expect((await browser.send(a, 'POST', '/count')).body.views).toBeLessThan(11)
  })

  it("keeps all 40 keys written by 40 parallel requests with lockingMode 'merge'", async () => {
    const [a, b] = await instances({ lockingMode: 'merge' })
    const browser = await session(a)
    const replies = await inParallel(40, (i) => browser.send(i % 2 ? a : b, 'POST', `/key/${i}`))
    expect(replies.every((reply) => reply.status === 200)).toBe(true)
    const keys = (await browser.send(a, 'GET', '/keys')).body.keys as string[]
    expect(keys.sort()).toEqual(Array.from({ length: 40 }, (_, i) => `k_${i}`).sort())
    expect((await browser.send(a, 'GET', '/cart')).body.cart).toEqual(['start'])
    expect(a.sessions.stats().merges + b.sessions.stats().merges).toBe(40)
  })

  it("counts a same-key conflict under 'merge', and the last writer wins", async () => {
    const [a, b] = await instances({ lockingMode: 'merge' })
    const browser = await session(a)
    const paused = pauseBeforeModify(a)
    const slow = browser.send(a, 'POST', '/slow/late') // reads cart ['start'] now, writes it later
    await paused.reached
    expect((await browser.send(b, 'POST', '/cart/early')).body.cart).toEqual(['start', 'early'])
    paused.release()
    expect((await slow).status).toBe(200)
    expect(a.sessions.stats().mergeConflicts).toBe(1)
    expect((await browser.send(b, 'GET', '/cart')).body.cart).toEqual(['start', 'late'])
  })

  it("stores an unlocked change that fits only merged onto what another request stored meanwhile ('merge')", async () => {
    const [a, b] = await instances({ lockingMode: 'merge', maxSessionBytes: 8192 })
    const browser = await session(a)
    await browser.send(a, 'POST', '/big/6') // 6 KiB of the 8
    const paused = pauseBeforeModify(a)
    const item = 'y'.repeat(3000)
    const slow = browser.send(a, 'POST', `/slow/${item}`) // read with the 6 KiB; its own copy would not fit
    await paused.reached
    expect((await browser.send(b, 'POST', '/big/0')).status).toBe(200)
    paused.release()
    expect((await slow).status).toBe(200)
    expect((await browser.send(b, 'GET', '/cart')).body.cart).toEqual(['start', item])
  })

  it('answers 503 with Retry-After when the lock stays taken past lockTimeout, and never runs unlocked', async () => {
    const [a, b] = await instances({ lockingMode: 'all', lockTimeout: 300 })
    const browser = await session(a)
    const hanging = hangingRequest(a, browser.cookie)
    await hanging.reached()
    const blocked = await browser.send(b, 'POST', '/count')
    expect(blocked.status).toBe(503)
    expect(blocked.headers.get('retry-after')).toBe('1')
    expect(b.sessions.stats().lockTimeouts).toBe(1)
    hanging.abort()
    await sleep(100)
    // The blocked request did not run: the count was never incremented.
    expect((await browser.send(b, 'POST', '/count')).body.views).toBe(1)
  })

  it('releases the lock of a request whose client went away', async () => {
    const [a, b] = await instances({ lockingMode: 'all', lockExpiration: 30 })
    const browser = await session(a)
    const hanging = hangingRequest(a, browser.cookie)
    await hanging.reached()
    hanging.abort()
    expect(await hanging.done).toBe('aborted')
    const reply = await browser.send(b, 'POST', '/count')
    expect(reply.status).toBe(200)
    expect(reply.elapsedMs).toBeLessThan(5000) // not the 30 s the lock would otherwise live
  })

  it('lets others proceed after lockExpiration when the lock holder process is killed, with nothing corrupt', async () => {
    servers = await startBackend(backend, 3)
    // memcached counts expiry in whole seconds, so a 1 s lock may lapse at once: 2 s lives between 1 and 2 s.
    const options = {
      secret: 'parallel',
      nodes: nodesFor(servers),
      lockingMode: 'all' as const,
      lockExpiration: 2,
      operationTimeout: 250,
    }
    const holder = await startAppProcess(options)
    const other = await start({ ...options, lockTimeout: 5000 })
    shops.push(other)
    const browser = new Browser()
    await browser.send(holder, 'POST', '/cart/apple')
    await hangingRequest(holder, browser.cookie).reached()
    await holder.kill()
    const reply = await browser.send(other, 'POST', '/cart/pear')
    expect(reply.status).toBe(200)
    expect(reply.body.cart).toEqual(['apple', 'pear'])
    // It did wait for the dead holder's lock. Counted, not timed: memcached's whole-second expiry gives the lock
    // between 1 and 2 s, so how long is left of it after the kill varies.
    expect(other.sessions.stats().lockWaits).toBe(1)
  })

  it("keeps locking a route 'auto' has seen write, after a request on it that did not", async () => {
    const [a, b] = await instances({ lockingMode: 'auto' })
    const browser = await session(a)
    // Seen writing on both instances, then refused once on each (a 400 that writes nothing).
    for (const app of [a, b]) {
      expect((await browser.send(app, 'POST', '/count/slow')).status).toBe(200)
      expect((await browser.send(app, 'POST', '/count/slow?refuse=1')).status).toBe(400)
    }
    await inParallel(10, (i) => browser.send(i % 2 ? a : b, 'POST', '/count/slow'))
    expect((await browser.send(b, 'POST', '/count')).body.views).toBe(13)
  })

  it("skips the lock on a route 'auto' has learned only reads", async () => {
    const lockWrites = async () =>
      (await Promise.all(servers.map((s) => s.writes()))).reduce((n, w) => n + w, 0)
    const [auto] = await instances({ lockingMode: 'auto' })
    const browser = await session(auto)
    await browser.send(auto, 'GET', '/cart') // locked: the route is not known yet; it only reads
    const before = await lockWrites()
    for (let i = 0; i < 5; i++) await browser.send(auto, 'GET', '/cart')
    expect(await lockWrites()).toBe(before)
    // The same requests under 'all' take and release the lock every time.
    await Promise.all(shops.splice(0).map((shop) => shop.close()))
    await stopAllServers()
    const [all] = await instances({ lockingMode: 'all' })
    const other = await session(all)
    await other.send(all, 'GET', '/cart')
    const beforeAll = await lockWrites()
    for (let i = 0; i < 5; i++) await other.send(all, 'GET', '/cart')
    expect(await lockWrites()).toBeGreaterThanOrEqual(beforeAll + 10)
  })
})

/** What the locks and merges must also get right when things go wrong around them. */
describe.each(setups)('locks and merges under failure ($name)', ({ backend, start }) => {
  let servers: CacheServer[]
  const shops: ShopApp[] = []

  afterEach(async () => {
    await Promise.all(shops.splice(0).map((shop) => shop.close()))
    await stopAllServers()
  })

  async function pair(
    options: Partial<SessionFailoverOptions>,
    other: Partial<SessionFailoverOptions> = options,
  ) {
    servers = await startBackend(backend, 3)
    const base = {
      secret: 'failure',
      nodes: nodesFor(servers),
      operationTimeout: 250,
      nodeProbeInterval: 100,
    }
    const a = await start({ ...base, ...options })
    const b = await start({ ...base, ...other })
    shops.push(a, b)
    return [a, b] as const
  }

  it('keeps the whole session when a merge follows a failover', async () => {
    const [a] = await pair({ lockingMode: 'merge' })
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/precious')
    const primary = servers[Number(parseSessionId(browser.sessionId)?.nodeId.slice(1)) - 1]
    await primary?.kill()
    expect((await browser.send(a, 'POST', '/key/after')).status).toBe(200)
    expect((await browser.send(a, 'GET', '/cart')).body.cart).toEqual(['precious'])
    expect((await browser.send(a, 'GET', '/keys')).body.keys).toEqual(['k_after'])
  })

  it("does not delete another request's keys when it saves twice under 'merge'", async () => {
    const [a, b] = await pair({ lockingMode: 'merge' })
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/start')
    a.beforeModify = () => browser.send(b, 'POST', '/key/theirs').then(() => undefined)
    expect((await browser.send(a, 'POST', '/save-twice/mine')).status).toBe(200)
    expect((await browser.send(b, 'GET', '/keys')).body.keys).toEqual(['k_theirs'])
    expect((await browser.send(b, 'GET', '/cart')).body.cart).toEqual(['start', 'mine', 'again'])
  })

  it('merges instead of overwriting when the copy changed under a held lock', async () => {
    // b writes blindly ('none'), as a request whose lock lapsed would: a's locked write must not erase it.
    const [a, b] = await pair({ lockingMode: 'all' }, { lockingMode: 'none' })
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/start')
    a.beforeModify = () => browser.send(b, 'POST', '/key/blind').then(() => undefined)
    expect((await browser.send(a, 'POST', '/slow/locked')).status).toBe(200)
    expect((await browser.send(b, 'GET', '/keys')).body.keys).toEqual(['k_blind'])
    expect((await browser.send(b, 'GET', '/cart')).body.cart).toEqual(['start', 'locked'])
  })

  it("keeps locking a route that destroys sessions under 'auto'", async () => {
    const [a] = await pair({ lockingMode: 'auto' })
    for (let i = 0; i < 3; i++) {
      const browser = new Browser()
      await browser.send(a, 'POST', '/cart/x')
      await browser.send(a, 'POST', '/logout')
    }
    // Each /cart/x starts a new session (no lock needed); each /logout destroys an existing one and, being a
    // write, keeps its route locked: three locks. Learned as read-only, the route would lock once.
    expect(a.sessions.stats().locksAcquired).toBe(3)
  })

  it('does not leave a lock behind when the client leaves while waiting for it', async () => {
    const [a, b] = await pair({ lockingMode: 'all', lockExpiration: 30, lockTimeout: 5000 })
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/start')
    const holder = hangingRequest(a, browser.cookie)
    await holder.reached()
    const waiter = hangingRequest(b, browser.cookie) // waits for the lock...
    await sleep(100)
    waiter.abort() // ...and its client gives up
    holder.abort()
    const reply = await browser.send(a, 'POST', '/count')
    expect(reply.status).toBe(200)
    expect(reply.elapsedMs).toBeLessThan(4000)
  })

  it('releases the lock once a streamed response has sent its headers', async () => {
    const [a, b] = await pair({ lockingMode: 'all', lockExpiration: 30, lockTimeout: 3000 })
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/start')
    const controller = new AbortController()
    const stream = await fetch(`${a.url}/stream-open`, {
      method: 'POST',
      headers: { cookie: browser.cookie ?? '' },
      signal: controller.signal,
    })
    expect(stream.status).toBe(200)
    const reply = await browser.send(b, 'POST', '/count')
    controller.abort()
    expect(reply.status).toBe(200)
    expect(reply.body.views).toBe(2) // the stream's own increment is stored, and this one after it
  })
})

describe('a session regenerated by a request that goes on writing', () => {
  afterEach(async () => {
    await stopAllServers()
  })

  it("merges the request's later change with what another request of the new session stored meanwhile", async () => {
    const servers = await startBackend('memcached', 2)
    const app = await startShop(express, { secret: 'renewed', nodes: nodesFor(servers), lockingMode: 'all' })
    try {
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/start')
      let release = (): void => {}
      app.beforeModify = () => new Promise<void>((resolve) => (release = resolve))
      // The new session's cookie arrives with the first chunk, while the login is still running.
      const login = await fetch(`${app.url}/login-stream`, {
        method: 'POST',
        headers: { cookie: browser.cookie ?? '' },
      })
      const renewed = login.headers.getSetCookie().find((cookie) => cookie.startsWith('connect.sid='))
      browser.cookie = renewed?.split(';')[0]
      expect((await browser.send(app, 'POST', '/cart/other')).body.cart).toEqual(['login', 'other'])
      release()
      expect(await login.text()).toBe('open done')
      expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['login', 'other'])
      expect((await browser.send(app, 'GET', '/keys')).body.keys).toEqual(['k_stream'])
    } finally {
      await app.close()
    }
  })
})

describe('a destroy beside a write of the session that is still under way', () => {
  afterEach(async () => {
    await stopAllServers()
  })

  it.each([
    ['destroySession(id)', 'admin'],
    ['a logout', 'logout'],
  ] as const)('removes a copy the write puts back after the deletes (%s)', async (_name, how) => {
    const servers = await startBackend('memcached', 2)
    const app = await startShop(express, {
      secret: 'late',
      nodes: nodesFor(servers),
      operationTimeout: 300,
    })
    try {
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/apple')
      const id = browser.sessionId ?? ''
      const keys = storageKeys('sf:', parseSessionId(id)?.random ?? '')
      const copies = await Promise.all(servers.map((server) => server.get(keys.backup)))
      const index = copies.findIndex((copy) => copy !== null)
      expect(index).toBeGreaterThanOrEqual(0)
      const copy = copies[index] as Buffer
      if (how === 'admin') await app.sessions.destroySession(id)
      else expect((await browser.send(app, 'POST', '/logout')).status).toBe(200)
      // The backup write of a request that was writing the session (on another instance) lands now.
      await (servers[index] as CacheServer).put(keys.backup, copy)
      // Deleted again once such a write has had time to land (here 1 s after the destroy).
      await until(async () => !(await (servers[index] as CacheServer).has(keys.backup)), 5000)
      browser.cookie = `connect.sid=${encodeURIComponent(`s:${sign(id, 'late')}`)}`
      expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual([])
    } finally {
      await app.close()
    }
  })
})
