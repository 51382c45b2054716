import express from 'express'
import { afterEach, describe, expect, it } from 'vitest'
import { storageKeys } from '../src/core/keys.js'
import { parseSessionId, type SessionFailoverOptions } from '../src/index.js'
import { Browser, type ShopApp, startShop } from './support/app.js'
import { startAppProcess, stopAllAppProcesses } from './support/instance.js'
import { type MemcachedServer, nodesOption, startCluster, stopAllMemcached } from './support/memcached.js'
import { type CuttableProxy, startProxy } from './support/proxy.js'
import { recordsOf } from './support/records.js'
import { until } from './support/until.js'

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** What sticky mode must never do: lose an acknowledged change, or serve or store an older copy over a newer. */
describe('sticky consistency', () => {
  let servers: MemcachedServer[] = []
  const shops: ShopApp[] = []
  const proxies: CuttableProxy[] = []

  afterEach(async () => {
    await Promise.all(shops.splice(0).map((shop) => shop.close()))
    await Promise.all(proxies.splice(0).map((proxy) => proxy.close()))
    await stopAllAppProcesses()
    await stopAllMemcached()
  })

  const base = (nodes: string, extra: Partial<SessionFailoverOptions> = {}): SessionFailoverOptions => ({
    secret: 'consistency',
    nodes,
    sticky: true,
    operationTimeout: 250,
    nodeProbeInterval: 100,
    ...extra,
  })
  async function shop(options: SessionFailoverOptions): Promise<ShopApp> {
    const started = await startShop(express, options)
    shops.push(started)
    return started
  }
  /** An instance reaching the nodes through proxies the test can cut. */
  async function cuttableShop(extra: Partial<SessionFailoverOptions>) {
    const own = await Promise.all(servers.map((server) => startProxy(server.port)))
    proxies.push(...own)
    const nodes = own.map((proxy, index) => `n${index + 1}:127.0.0.1:${proxy.port}`).join(' ')
    return {
      app: await shop(base(nodes, extra)),
      cut: () => {
        for (const proxy of own) proxy.cut()
      },
      restore: () => {
        for (const proxy of own) proxy.restore()
      },
    }
  }
  /** Instance a (whose nodes the test can cut) holding a session with an apple in its cart, and instance b. */
  async function cartOnCuttableInstance() {
    servers = await startCluster(2)
    const a = await cuttableShop({ route: 'a' })
    const b = await shop(base(nodesOption(servers), { route: 'b' }))
    const browser = new Browser()
    await browser.send(a.app, 'POST', '/cart/apple')
    return { a, b, browser }
  }
  const stored = async (id: string | undefined) => {
    const keys = storageKeys('sf:', parseSessionId(id)?.random ?? '')
    const copies = []
    for (const server of servers) {
      for (const key of [keys.primary, keys.backup]) {
        const raw = await server.get(key)
        if (raw) copies.push(recordsOf('consistency').dataOf<{ cart?: string[] }>(id, raw))
      }
    }
    return copies
  }

  it('serves an acknowledged change that is still queued, even after it left the local cache', async () => {
    servers = await startCluster(2)
    const a = await shop(base(nodesOption(servers), { route: 'a', backupAsync: true, localMaxSessions: 2 }))
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/apple')
    await sleep(100) // stored
    await Promise.all(servers.map((server) => server.kill()))
    expect((await browser.send(a, 'POST', '/cart/pear')).status).toBe(200) // acknowledged, queued
    for (let i = 0; i < 3; i++) await new Browser().send(a, 'POST', '/cart/other') // evicts the session
    expect((await browser.send(a, 'GET', '/cart')).body.cart).toEqual(['apple', 'pear'])
    await Promise.all(servers.map((server) => server.restart()))
    expect((await browser.send(a, 'GET', '/cart')).body.cart).toEqual(['apple', 'pear'])
  })

  it('drops a delayed backup that another instance has overtaken, instead of overwriting it', async () => {
    const { a, b, browser } = await cartOnCuttableInstance()
    a.cut() // a loses its nodes (a network blip, a long pause): it acknowledges from memory and queues
    expect((await browser.send(a.app, 'POST', '/cart/pear')).status).toBe(200)
    // Meanwhile the user lands on b, which reads what is stored and changes it.
    const other = new Browser()
    other.cookie = browser.cookie
    expect((await other.send(b, 'POST', '/cart/kiwi')).body.cart).toEqual(['apple', 'kiwi'])
    expect(a.app.sessions.localStatus()?.pendingBackups).toBeGreaterThan(0)
    a.restore()
    // a's retry runs, finds a newer copy, and drops its own.
    await until(() => a.app.sessions.localStatus()?.pendingBackups === 0)
    const copies = await stored(other.sessionId)
    expect(copies).toHaveLength(2)
    for (const copy of copies) expect(copy.cart).toEqual(['apple', 'kiwi'])
  })

  it('drops a delayed backup of a session logged out on the instance that took it over', async () => {
    const { a, b, browser } = await cartOnCuttableInstance()
    const cookie = browser.cookie
    a.cut() // a acknowledges from memory and queues the write until a node is back
    expect((await browser.send(a.app, 'POST', '/cart/pear')).status).toBe(200)
    // The user lands on b, which takes the session over, and logs out there.
    const other = new Browser()
    other.cookie = cookie
    expect((await other.send(b, 'GET', '/cart')).body.cart).toEqual(['apple'])
    expect((await other.send(b, 'POST', '/logout')).status).toBe(200)
    await sleep(1100) // past the logout's repeated delete
    a.restore()
    await until(() => a.app.sessions.localStatus()?.pendingBackups === 0)
    expect(await stored(browser.sessionId)).toEqual([])
    const replay = new Browser()
    replay.cookie = cookie
    expect((await replay.send(b, 'GET', '/cart')).body.cart).toEqual([])
    // Nor does a serve it from its memory any more.
    expect((await replay.send(a.app, 'GET', '/cart')).body.cart).toEqual([])
  })

  it('serves no request that comes while a logout is still being stored, nor any after it', async () => {
    servers = await startCluster(2)
    const a = await shop(base(nodesOption(servers), { route: 'a', operationTimeout: 400 }))
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/apple')
    const cookie = browser.cookie
    // The backup's node freezes: the logout waits (up to operationTimeout) for its mark there.
    const primary = parseSessionId(browser.sessionId)?.nodeId
    const backupServer = servers[primary === 'n1' ? 1 : 0] as MemcachedServer
    await backupServer.freeze()
    try {
      const logout = browser.send(a, 'POST', '/logout')
      await sleep(100)
      const tab = new Browser()
      tab.cookie = cookie
      expect((await tab.send(a, 'GET', '/cart')).body.cart).toEqual([])
      expect((await logout).status).toBe(200)
      const later = new Browser()
      later.cookie = cookie
      expect((await later.send(a, 'GET', '/cart')).body.cart).toEqual([])
    } finally {
      backupServer.thaw()
    }
  })

  it('lets the last response win with backupAsync too, over writes of this instance it did not see', async () => {
    servers = await startCluster(2)
    const a = await shop(base(nodesOption(servers), { route: 'a', backupAsync: true }))
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/apple')
    let release = () => {}
    let loaded = () => {}
    const slowLoaded = new Promise<void>((resolve) => {
      loaded = resolve
    })
    a.beforeModify = () =>
      new Promise<void>((resolve) => {
        release = resolve
        loaded()
      })
    const slow = browser.send(a, 'POST', '/slow/kiwi') // loads ['apple']
    await slowLoaded
    expect((await browser.send(a, 'POST', '/cart/pear')).status).toBe(200)
    expect((await browser.send(a, 'POST', '/cart/plum')).status).toBe(200)
    await until(() => a.sessions.localStatus()?.pendingBackups === 0) // both stored
    release()
    expect((await slow).body.cart).toEqual(['apple', 'kiwi'])
    await until(() => a.sessions.localStatus()?.pendingBackups === 0)
    expect((await browser.send(a, 'GET', '/cart')).body.cart).toEqual(['apple', 'kiwi'])
    const copies = await stored(browser.sessionId)
    expect(copies).toHaveLength(2)
    for (const copy of copies) expect(copy.cart).toEqual(['apple', 'kiwi'])
  })

  it('does not acknowledge a write it can keep nowhere: no node alive, and too large for memory', async () => {
    servers = await startCluster(2)
    const a = await shop(base(nodesOption(servers), { route: 'a', localMaxBytes: 20_000 }))
    const browser = new Browser()
    expect((await browser.send(a, 'POST', '/big/15')).status).toBe(200)
    await Promise.all(servers.map((server) => server.kill()))
    // 25 KB: over localMaxBytes, so neither the backup queue nor memory can hold it.
    expect((await browser.send(a, 'POST', '/big/25')).status).toBe(503)
  })

  it('does not serve a change whose save failed', async () => {
    servers = await startCluster(2)
    const a = await shop(base(nodesOption(servers), { route: 'a' }))
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/apple')
    const tooLarge = await browser.send(a, 'POST', '/big/1100')
    expect(tooLarge.status).toBe(500)
    const reply = await browser.send(a, 'GET', '/cart')
    expect(reply.body.cart).toEqual(['apple'])
    // memcached drops an item whose rewrite is too large; the write was never sent, so both copies remain.
    expect(await stored(browser.sessionId)).toHaveLength(2)
  })

  it('lands concurrent writes of one session in the order memory has them', async () => {
    servers = await startCluster(2)
    const a = await shop(base(nodesOption(servers), { route: 'a' }))
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/start')
    await Promise.all(Array.from({ length: 12 }, (_, i) => browser.send(a, 'POST', `/cart/p${i}`)))
    const inMemory = (await browser.send(a, 'GET', '/cart')).body.cart
    const copies = await stored(browser.sessionId)
    expect(copies).toHaveLength(2)
    for (const copy of copies) expect(copy.cart).toEqual(inMemory)
  })

  it('expires an idle session in memory as memcached does', async () => {
    servers = await startCluster(2)
    const a = await shop(base(nodesOption(servers), { route: 'a', ttl: 1 }))
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/apple')
    await sleep(1300)
    expect((await browser.send(a, 'GET', '/cart')).body.cart).toEqual([])
  })

  it('removes the stored copies of a session destroyed while no node was reachable, once they are back', async () => {
    const { a, b, browser } = await cartOnCuttableInstance()
    const cookie = browser.cookie
    const id = browser.sessionId
    expect(await stored(id)).toHaveLength(2)
    a.cut()
    expect((await browser.send(a.app, 'POST', '/logout')).status).toBe(200)
    a.restore()
    await sleep(600)
    expect(await stored(id)).toEqual([])
    const replay = new Browser()
    replay.cookie = cookie
    expect((await replay.send(b, 'GET', '/cart')).body.cart).toEqual([])
  })

  it('lets an application that handles SIGTERM itself finish its requests and exit on its own terms', async () => {
    servers = await startCluster(2)
    const app = await startAppProcess(base(nodesOption(servers), { route: 'a', backupAsync: true }), {
      ownSigtermHandler: true,
    })
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const slow = browser.send(app, 'POST', '/answer-slowly')
    await sleep(100)
    const exit = app.terminate()
    expect((await slow).status).toBe(200)
    expect(await exit).toBe(0)
  })
})
