import express from 'express'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { storageKeys } from '../src/core/keys.js'
import { createEngine } from '../src/create-engine.js'
import { parseSessionId, type SessionFailoverOptions } from '../src/index.js'
import { parseOptions } from '../src/options.js'
import { Browser, startShop } from './support/app.js'
import { type AppProcess, startAppProcess, stopAllAppProcesses } from './support/instance.js'
import { type MemcachedServer, nodesOption, startCluster, stopAllMemcached } from './support/memcached.js'
import { recordsOf } from './support/records.js'

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

describe('sticky mode', () => {
  let servers: MemcachedServer[]

  afterEach(async () => {
    await stopAllAppProcesses()
    await stopAllMemcached()
  })

  async function cluster(extra: Partial<SessionFailoverOptions> = {}) {
    servers = await startCluster(3)
    const options = (route: string): SessionFailoverOptions => ({
      secret: 'sticky-secret',
      nodes: nodesOption(servers),
      sticky: true,
      route,
      operationTimeout: 250,
      nodeProbeInterval: 100,
      ...extra,
    })
    return { options, a: await startAppProcess(options('a')), b: await startAppProcess(options('b')) }
  }
  const keysOf = (id: string | undefined) => storageKeys('sf:', parseSessionId(id)?.random ?? '')
  const primaryOf = (id: string | undefined) =>
    servers[Number(parseSessionId(id)?.nodeId.slice(1)) - 1] as MemcachedServer
  const backupOf = (id: string | undefined) =>
    servers[Number(parseSessionId(id)?.nodeId.slice(1)) % 3] as MemcachedServer

  async function fill(browser: Browser, app: AppProcess, items: string[]) {
    for (const item of items) expect((await browser.send(app, 'POST', `/cart/${item}`)).status).toBe(200)
  }

  it('backs every change up to two nodes before answering, and carries the route in the id', async () => {
    const { a } = await cluster()
    const browser = new Browser()
    await fill(browser, a, ['apple', 'pear'])
    const id = browser.sessionId
    expect(parseSessionId(id)?.route).toBe('a')
    expect(await primaryOf(id).has(keysOf(id).primary)).toBe(true)
    expect(await backupOf(id).has(keysOf(id).backup)).toBe(true)
  })

  it('serves a local session without reading memcached', async () => {
    const { a } = await cluster()
    const browser = new Browser()
    await fill(browser, a, ['apple'])
    const gets = async () =>
      (await Promise.all(servers.map((s) => s.stats()))).reduce((n, s) => n + (s.cmd_get ?? 0), 0)
    const before = await gets()
    for (let i = 0; i < 5; i++) expect((await browser.send(a, 'GET', '/cart')).body.cart).toEqual(['apple'])
    expect(await gets()).toBe(before)
  })

  it('loses nothing acknowledged when its instance is killed: another instance takes over', async () => {
    const { a, b } = await cluster()
    const browser = new Browser()
    await fill(browser, a, ['apple', 'pear', 'plum'])
    await a.kill()
    const reply = await browser.send(b, 'GET', '/cart')
    expect(reply.body.cart).toEqual(['apple', 'pear', 'plum'])
    expect(reply.setCookie).toBeDefined()
    expect(parseSessionId(browser.sessionId)?.route).toBe('b')
  })

  it('loses nothing when the instance and the primary node die together', async () => {
    const { a, b } = await cluster()
    const browser = new Browser()
    await fill(browser, a, ['apple', 'pear'])
    const id = browser.sessionId
    await Promise.all([a.kill(), primaryOf(id).kill()])
    const reply = await browser.send(b, 'POST', '/cart/fig')
    expect(reply.status).toBe(200)
    expect(reply.body.cart).toEqual(['apple', 'pear', 'fig'])
    const moved = parseSessionId(browser.sessionId)
    expect(moved?.route).toBe('b')
    expect(moved?.nodeId).not.toBe(parseSessionId(id)?.nodeId)
  })

  it('never serves a stale local copy after another instance owned the session', async () => {
    const { a, b } = await cluster()
    const browser = new Browser()
    await fill(browser, a, ['apple'])
    const cookieForA = browser.cookie
    // The balancer sends the session to b (a is slow, say): b takes over and changes it.
    expect((await browser.send(b, 'POST', '/cart/pear')).body.cart).toEqual(['apple', 'pear'])
    expect(parseSessionId(browser.sessionId)?.route).toBe('b')
    // Back on a, which still holds its own copy ['apple']: it must take the session over again.
    const back = await browser.send(a, 'GET', '/cart')
    expect(back.body.cart).toEqual(['apple', 'pear'])
    expect(back.setCookie).toBeDefined()
    expect(parseSessionId(browser.sessionId)?.route).toBe('a')
    // The old cookie (route a) is now just a route a owns: a serves its current copy, not the first one.
    const old = new Browser()
    old.cookie = cookieForA
    expect((await old.send(a, 'GET', '/cart')).body.cart).toEqual(['apple', 'pear'])
  })

  it('does not write back from the memory of the instance it was taken over from a session logged out on the new one', async () => {
    const { a, b } = await cluster({ backupCheckInterval: 100 })
    const browser = new Browser()
    await fill(browser, a, ['apple'])
    const cookieForA = browser.cookie
    // b takes the session over, then the user logs out there; a still holds ['apple'] in memory.
    expect((await browser.send(b, 'POST', '/cart/pear')).body.cart).toEqual(['apple', 'pear'])
    expect((await browser.send(b, 'POST', '/logout')).status).toBe(200)
    // The old cookie on a: each request past backupCheckInterval has a check its stored copies, which are gone.
    const old = new Browser()
    old.cookie = cookieForA
    for (let i = 0; i < 4; i++) {
      await old.send(a, 'GET', '/cart')
      await sleep(150)
    }
    expect((await old.send(a, 'GET', '/cart')).body.cart).toEqual([])
    // Nor written back to the nodes, where any instance would find it.
    const elsewhere = new Browser()
    elsewhere.cookie = cookieForA
    expect((await elsewhere.send(b, 'GET', '/cart')).body.cart).toEqual([])
  })

  it('relocates the session when its primary node dies, without failing the request', async () => {
    const { a } = await cluster()
    const browser = new Browser()
    await fill(browser, a, ['apple'])
    const id = browser.sessionId
    await primaryOf(id).kill()
    const first = await browser.send(a, 'POST', '/cart/pear') // the write finds the node dead
    expect(first.status).toBe(200)
    const reply = await browser.send(a, 'GET', '/cart')
    expect(reply.body.cart).toEqual(['apple', 'pear'])
    const moved = browser.sessionId
    expect(parseSessionId(moved)?.nodeId).not.toBe(parseSessionId(id)?.nodeId)
    expect(await primaryOf(moved).has(keysOf(moved).primary)).toBe(true)
    expect(await backupOf(moved).has(keysOf(moved).backup)).toBe(true)
  })

  it('keeps working from memory with every node down, and backs the sessions up when nodes return', async () => {
    const { a, b } = await cluster({ backupCheckInterval: 200 })
    const browsers = [new Browser(), new Browser(), new Browser()]
    for (const browser of browsers) await fill(browser, a, ['apple'])
    await Promise.all(servers.map((server) => server.kill()))
    for (const browser of browsers) {
      const reply = await browser.send(a, 'POST', '/cart/pear')
      expect(reply.status).toBe(200)
      expect(reply.body.cart).toEqual(['apple', 'pear'])
    }
    await Promise.all(servers.map((server) => server.restart()))
    // The queued backups are retried as soon as a node answers. Nodes come back one by one, so a write may find
    // one node only (and relocate its session there); the second copy follows on the next use of the session,
    // within backupCheckInterval.
    const copies = async (id: string | undefined) => {
      const keys = keysOf(id)
      const found = await Promise.all(
        servers.map(async (s) => [await s.has(keys.primary), await s.has(keys.backup)]),
      )
      return { primary: found.some(([p]) => p), backup: found.some(([, b]) => b) }
    }
    const deadline = Date.now() + 5000
    for (const browser of browsers) {
      while (!(await copies(browser.sessionId)).primary && Date.now() < deadline) await sleep(50)
      expect((await copies(browser.sessionId)).primary).toBe(true)
    }
    await sleep(250)
    for (const browser of browsers) {
      expect((await browser.send(a, 'GET', '/cart')).body.cart).toEqual(['apple', 'pear'])
    }
    // The check of each session's copies runs after its response: wait for the copies it writes.
    await vi.waitFor(
      async () => {
        for (const browser of browsers) {
          expect(await copies(browser.sessionId)).toEqual({ primary: true, backup: true })
          const id = browser.sessionId
          expect(await primaryOf(id).has(keysOf(id).primary)).toBe(true)
        }
      },
      { timeout: 5000, interval: 20 },
    )
    for (const browser of browsers) {
      expect(await copies(browser.sessionId)).toEqual({ primary: true, backup: true })
      const id = browser.sessionId
      expect(await primaryOf(id).has(keysOf(id).primary)).toBe(true)
    }
    // And what is stored is the change made during the outage: the other instance, which never held these
    // sessions in memory, reads them from the nodes.
    for (const browser of browsers) {
      expect((await browser.send(b, 'GET', '/cart')).body.cart).toEqual(['apple', 'pear'])
    }
  })

  // Orchestrators send SIGTERM; PM2 and a terminal's Ctrl-C send SIGINT.
  it.each([
    'SIGTERM',
    'SIGINT',
  ] as const)('flushes queued asynchronous backups on %s before the process exits', async (signal) => {
    const { a, b } = await cluster({ backupAsync: true })
    // Kill the nodes so the backups cannot be written yet and must wait in the queue. (Freezing would not do:
    // a stopped memcached still takes requests into its socket buffer and runs them after SIGCONT.)
    await Promise.all(servers.map((server) => server.kill()))
    const browsers = Array.from({ length: 5 }, () => new Browser())
    for (const [index, browser] of browsers.entries()) {
      const reply = await browser.send(a, 'POST', `/cart/item${index}`)
      expect(reply.status).toBe(200) // acknowledged from memory
    }
    const exit = a.terminate(signal)
    await sleep(300)
    await Promise.all(servers.map((server) => server.restart()))
    expect(await exit).toBe(signal)
    for (const [index, browser] of browsers.entries()) {
      expect((await browser.send(b, 'GET', '/cart')).body.cart).toEqual([`item${index}`])
    }
  })

  it('exits on a second SIGINT without waiting for backups that cannot be written (Ctrl-C pressed again)', async () => {
    const { a } = await cluster({ backupAsync: true })
    await Promise.all(servers.map((server) => server.kill()))
    expect((await new Browser().send(a, 'POST', '/cart/stuck')).status).toBe(200)
    const exit = a.terminate('SIGINT')
    await sleep(300)
    // The nodes stay down, so the first signal's flush would wait its whole 10 s.
    void a.terminate('SIGINT')
    const outcome = await Promise.race([exit, sleep(5000).then(() => 'still running after 5 s')])
    expect(outcome).toBe('SIGINT')
  })

  it('coalesces repeated asynchronous writes of one session and lands the newest', async () => {
    const { a, b } = await cluster({ backupAsync: true })
    const browser = new Browser()
    for (let i = 0; i < 20; i++) await browser.send(a, 'POST', `/cart/i${i}`)
    const all = Array.from({ length: 20 }, (_, i) => `i${i}`)
    const records = recordsOf('sticky-secret')
    // Read from the node, not through b (which would take the session over): until the newest write landed.
    const id = browser.sessionId
    const stored = async () => {
      const raw = await primaryOf(id).get(keysOf(id).primary)
      return raw && records.dataOf<{ cart: string[] }>(id, raw).cart
    }
    await vi.waitFor(async () => expect(await stored()).toEqual(all), { timeout: 5000, interval: 20 })
    const reply = await browser.send(b, 'GET', '/cart')
    expect(reply.body.cart).toEqual(all)
  })
})

describe('sticky mode in one process', () => {
  afterEach(() => stopAllMemcached())

  async function stickyShop() {
    const servers = await startCluster(2)
    const shop = await startShop(express, {
      secret: 'sticky-secret',
      nodes: nodesOption(servers),
      sticky: true,
      route: 'a',
    })
    return { servers, shop }
  }

  it('does not bring back a session logged out while a write of it was being stored', async () => {
    const { servers, shop } = await stickyShop()
    try {
      for (let trial = 0; trial < 30; trial++) {
        const browser = new Browser()
        await browser.send(shop, 'POST', '/cart/apple')
        const cookie = browser.cookie
        const { primary, backup } = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
        const tab = new Browser()
        tab.cookie = cookie
        // The logout waits for the write in flight; that write must not put the session back in memory.
        await Promise.all([tab.send(shop, 'POST', '/cart/pear'), browser.send(shop, 'POST', '/logout')])
        const stored = (await Promise.all(servers.flatMap((s) => [s.has(primary), s.has(backup)]))).some(
          Boolean,
        )
        const old = new Browser()
        old.cookie = cookie
        const served = ((await old.send(shop, 'GET', '/cart')).body.cart ?? []).length > 0
        // Whichever ends last, the logout stands: the write of a request that loaded the session before it
        // stores nothing, and one that loads after it gets a new session of its own.
        expect({ trial, served, stored }).toEqual({ trial, served: false, stored: false })
      }
    } finally {
      await shop.close()
    }
  })

  it('does not let a request that loaded the session before its logout store it again', async () => {
    const { servers, shop } = await stickyShop()
    try {
      const browser = new Browser()
      await browser.send(shop, 'POST', '/cart/apple')
      const { primary, backup } = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
      const tab = new Browser()
      tab.cookie = browser.cookie
      let release = () => {}
      let loaded = () => {}
      const slowLoaded = new Promise<void>((resolve) => {
        loaded = resolve
      })
      shop.beforeModify = () =>
        new Promise<void>((resolve) => {
          release = resolve
          loaded()
        })
      const slow = tab.send(shop, 'POST', '/slow/pear')
      await slowLoaded
      expect((await browser.send(shop, 'POST', '/logout')).status).toBe(200)
      release()
      expect((await slow).status).toBe(200)
      const old = new Browser()
      old.cookie = browser.cookie
      expect((await old.send(shop, 'GET', '/cart')).body.cart).toEqual([])
      const stored = await Promise.all(servers.flatMap((s) => [s.has(primary), s.has(backup)]))
      expect(stored).toEqual([false, false, false, false])
    } finally {
      await shop.close()
    }
  })

  it.each([
    { bound: 'localMaxSessions', limit: { localMaxSessions: 5 }, most: 5, backupAsync: false },
    { bound: 'localMaxSessions', limit: { localMaxSessions: 5 }, most: 5, backupAsync: true },
    // About 10 KB a record: four fit in 50 000 bytes.
    { bound: 'localMaxBytes', limit: { localMaxBytes: 50_000 }, most: 4, backupAsync: false },
    { bound: 'localMaxBytes', limit: { localMaxBytes: 50_000 }, most: 4, backupAsync: true },
  ])('keeps its backup queue within $bound through an outage (backupAsync $backupAsync)', async ({
    limit,
    most,
    backupAsync,
  }) => {
    const servers = await startCluster(2)
    const engine = createEngine(
      parseOptions({
        secret: 'sticky-secret',
        nodes: nodesOption(servers),
        sticky: true,
        route: 'a',
        backupAsync,
        ...limit,
        operationTimeout: 200,
        nodeProbeInterval: 60_000,
        logger: { debug() {}, info() {}, warn() {}, error() {} },
      }),
    )
    const cookie = { path: '/', httpOnly: true, originalMaxAge: null }
    try {
      await Promise.all(servers.map((server) => server.kill()))
      for (let i = 0; i < 30; i++) {
        const { state } = await engine.session.open(undefined)
        const data = { user: `u${i}`, pad: 'x'.repeat(10_000), cookie }
        await engine.session.save(state, engine.session.snapshot(data, cookie))
        await engine.session.finish(state)
      }
      // Each queued backup holds a whole record: without a bound, all 30 would wait here.
      expect(engine.sticky?.pendingBackups).toBeLessThanOrEqual(most)
    } finally {
      await engine.close({ timeout: 100 })
    }
  })
})

describe('failover nodes', () => {
  afterEach(() => stopAllMemcached())

  it('are used only when no other node is alive', async () => {
    const servers = await startCluster(3)
    const shop = await startShop(express, {
      secret: 's',
      nodes: nodesOption(servers),
      failoverNodes: 'n3',
      operationTimeout: 250,
      nodeProbeInterval: 100,
    })
    try {
      const browsers = Array.from({ length: 6 }, () => new Browser())
      for (const browser of browsers) await browser.send(shop, 'POST', '/cart/apple')
      expect(new Set(browsers.map((b) => parseSessionId(b.sessionId)?.nodeId))).toEqual(new Set(['n1', 'n2']))
      // n2's backup goes to n1, past the failover node n3.
      const onN2 = browsers.find((b) => parseSessionId(b.sessionId)?.nodeId === 'n2') as Browser
      expect(
        await servers[0]?.has(storageKeys('sf:', parseSessionId(onN2.sessionId)?.random ?? '').backup),
      ).toBe(true)
      expect(await servers[2]?.stats()).toMatchObject({ cmd_set: 0 })

      // With n1 gone, n3 is the only node left for n2's backup.
      await servers[0]?.kill()
      expect((await onN2.send(shop, 'POST', '/cart/pear')).body.cart).toEqual(['apple', 'pear'])
      expect(
        await servers[2]?.has(storageKeys('sf:', parseSessionId(onN2.sessionId)?.random ?? '').backup),
      ).toBe(true)
      // And when n2 goes too, the session moves there.
      await servers[1]?.kill()
      expect((await onN2.send(shop, 'POST', '/cart/plum')).body.cart).toEqual(['apple', 'pear', 'plum'])
      expect(parseSessionId(onN2.sessionId)?.nodeId).toBe('n3')
    } finally {
      await shop.close()
    }
  })
})

describe('the sticky local cache', () => {
  afterEach(() => stopAllMemcached())

  it('stays within its bounds under 10 000 sessions, and evicted sessions still load from the nodes', async () => {
    const servers = await startCluster(2)
    const engine = createEngine(
      parseOptions({
        secret: 's',
        nodes: nodesOption(servers),
        sticky: true,
        route: 'a',
        localMaxSessions: 1000,
        localMaxBytes: 200_000,
      }),
    )
    try {
      const ids: string[] = []
      for (let i = 0; i < 10_000; i++) {
        const { state } = await engine.session.open(undefined)
        const data = { user: `user${i}`, padding: 'x'.repeat(i % 3 === 0 ? 400 : 20) }
        const cookie = { path: '/', httpOnly: true, originalMaxAge: null }
        await engine.session.save(state, engine.session.snapshot({ ...data, cookie }, cookie))
        ids.push(state.id)
        const local = engine.sticky?.localSize
        expect(local?.sessions).toBeLessThanOrEqual(1000)
        expect(local?.bytes).toBeLessThanOrEqual(200_000)
      }
      expect(engine.sticky?.localSize.sessions).toBeGreaterThan(100)
      const first = await engine.session.open({ id: ids[0] as string, resign: false })
      expect(first.content?.data.user).toBe('user0')
    } finally {
      await engine.close()
    }
  }, 60_000)
})
