import express from 'express'
import { afterEach, describe, expect, it } from 'vitest'
import { LockManager } from '../src/core/locking.js'
import { Metrics } from '../src/core/metrics.js'
import { ClosedError, LockTimeoutError } from '../src/errors.js'
import type { SessionFailoverOptions } from '../src/index.js'
import { silentLogger } from '../src/logger.js'
import { MemcachedNode } from '../src/nodes/memcached.js'
import { NodeRing } from '../src/nodes/ring.js'
import { Browser, firstBytes, hangingRequest, type ShopApp, startShop } from './support/app.js'
import { startFastifyShop } from './support/fastify-app.js'
import {
  type MemcachedServer,
  nodesOption,
  startCluster,
  startMemcached,
  stopAllMemcached,
} from './support/memcached.js'
import { startOpcodeProxy } from './support/proxy.js'

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

describe('session locks', () => {
  const shops: ShopApp[] = []
  afterEach(async () => {
    await Promise.all(shops.splice(0).map((shop) => shop.close()))
    await stopAllMemcached()
  })

  function lockManager(server: MemcachedServer, lockExpirationSeconds: number, lockTimeoutMs = 3000) {
    const node = new MemcachedNode({
      id: 'n1',
      host: '127.0.0.1',
      port: server.port,
      operationTimeoutMs: 1000,
      probeKey: 'p',
    })
    const ring = new NodeRing([node], {
      failoverNodeIds: new Set(),
      probeIntervalMs: 100,
      logger: silentLogger,
      metrics: new Metrics(silentLogger),
    })
    return {
      ring,
      locks: new LockManager(ring, {
        lockExpirationSeconds,
        lockTimeoutMs,
        retryAfterSeconds: 1,
        nodesDownRetryAfterSeconds: 1,
        operationTimeoutMs: 1000,
      }),
    }
  }

  it("never lets a request whose lock expired delete the next holder's lock", async () => {
    const server = await startMemcached()
    const { ring, locks } = lockManager(server, 10)
    try {
      const slow = await locks.acquire('r', () => 'n1', 't:lock:r')
      // The lock expired in memcached while the request ran, and another request took it.
      await server.put('t:lock:r', Buffer.from('the-next-holder'))
      await slow.release()
      expect((await server.get('t:lock:r'))?.toString()).toBe('the-next-holder')
      // Its own lock, it does release.
      const again = await locks.acquire('s', () => 'n1', 't:lock:s')
      await again.release()
      expect(await server.has('t:lock:s')).toBe(false)
    } finally {
      await ring.close()
    }
  })

  it('gives every lock a value of its own, also across the lock managers of several apps in one process', async () => {
    const server = await startMemcached()
    const first = lockManager(server, 30)
    const second = lockManager(server, 30)
    try {
      const held = []
      for (let i = 0; i < 3; i++) {
        held.push(await first.locks.acquire(`a${i}`, () => 'n1', `t:lock:a${i}`))
        held.push(await second.locks.acquire(`b${i}`, () => 'n1', `t:lock:b${i}`))
      }
      const keys = [0, 1, 2].flatMap((i) => [`t:lock:a${i}`, `t:lock:b${i}`])
      const values = await Promise.all(keys.map(async (key) => (await server.get(key))?.toString()))
      expect(values.every((value) => value !== undefined && value.length > 0)).toBe(true)
      expect(new Set(values).size).toBe(keys.length)
      await Promise.all(held.map((lock) => lock.release()))
    } finally {
      await first.ring.close()
      await second.ring.close()
    }
  })

  it('releases a lock with one delete, and reads nothing to do it', async () => {
    const server = await startMemcached()
    const { ring, locks } = lockManager(server, 30)
    try {
      const lock = await locks.acquire('session', () => 'n1', 'sf:lock:session')
      const before = await server.stats()
      await lock.release()
      const after = await server.stats()
      expect(Number(after.cmd_get) - Number(before.cmd_get)).toBe(0)
      expect(Number(after.delete_hits) - Number(before.delete_hits)).toBe(1)
      expect(await server.has('sf:lock:session')).toBe(false)
    } finally {
      await ring.close()
    }
  })

  it("sends the session's read beside the lock's add, and reads nothing more once the add takes the lock", async () => {
    const server = await startMemcached()
    // Between the app and memcached: logs each request's opcode as it arrives, and each reply as it comes back.
    const events: string[] = []
    const proxy = await startOpcodeProxy(server.port, events)
    try {
      const app = await startShop(express, {
        secret: 's',
        nodes: `n1:127.0.0.1:${proxy.port}`,
        lockingMode: 'all',
      })
      shops.push(app)
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/start')
      const gets = async () => Number((await server.stats()).cmd_get)
      const before = await gets()
      events.length = 0
      expect((await browser.send(app, 'POST', '/count')).body.views).toBe(1)
      // One read per locked request, and it reached memcached before the add was answered.
      expect((await gets()) - before).toBe(1)
      const add = events.indexOf('add')
      expect(add).toBeGreaterThanOrEqual(0)
      expect(events.slice(add, events.indexOf('reply', add))).toEqual(['add', 'get'])
    } finally {
      await proxy.close()
    }
  })

  it('passes a lock to the request of the session queued behind it, without a delete and an add', async () => {
    const server = await startMemcached()
    const { ring, locks } = lockManager(server, 10)
    try {
      const first = await locks.acquire('r', () => 'n1', 't:lock:r')
      const value = await server.get('t:lock:r')
      const before = await server.stats()
      const queued = locks.acquire('r', () => 'n1', 't:lock:r')
      await first.release()
      const next = await queued
      expect(next.waited).toBe(true)
      expect(next.held).toBe(true)
      const after = await server.stats()
      expect(Number(after.delete_hits) - Number(before.delete_hits)).toBe(0)
      expect(Number(after.cmd_set) - Number(before.cmd_set)).toBe(0)
      expect(await server.get('t:lock:r')).toEqual(value)
      // The last one deletes it.
      await next.release()
      expect(await server.has('t:lock:r')).toBe(false)
    } finally {
      await ring.close()
    }
  })

  it('passes on no lock older than a second, nor to a request that gave up or is not queued behind', async () => {
    const server = await startMemcached()
    const { ring, locks } = lockManager(server, 10)
    try {
      const old = await locks.acquire('r', () => 'n1', 't:lock:r')
      const value = await server.get('t:lock:r')
      const queued = locks.acquire('r', () => 'n1', 't:lock:r')
      await sleep(1100)
      await old.release()
      const next = await queued
      // Released, and taken again with a value of its own.
      expect(await server.get('t:lock:r')).not.toEqual(value)
      await next.release()

      const short = lockManager(server, 10, 1000)
      try {
        const holder = await short.locks.acquire('s', () => 'n1', 't:lock:s')
        await expect(short.locks.acquire('s', () => 'n1', 't:lock:s')).rejects.toBeInstanceOf(
          LockTimeoutError,
        )
        await holder.release()
        expect(await server.has('t:lock:s')).toBe(false)

        // A request that came after a waiter gave up is not queued behind the holder: it polls memcached, and
        // gets the lock once the holder is done.
        const busy = await short.locks.acquire('t', () => 'n1', 't:lock:t')
        await expect(short.locks.acquire('t', () => 'n1', 't:lock:t')).rejects.toBeInstanceOf(
          LockTimeoutError,
        )
        const polling = short.locks.acquire('t', () => 'n1', 't:lock:t')
        await sleep(30)
        await busy.release()
        expect((await polling).held).toBe(true)
      } finally {
        await short.ring.close()
      }
    } finally {
      await ring.close()
    }
  })

  it("lets the session's next request add its lock right behind the release, not after the release's answer", async () => {
    const server = await startMemcached()
    // Between the lock manager and memcached: logs each request's opcode as it arrives, and each reply.
    const events: string[] = []
    const proxy = await startOpcodeProxy(server.port, events)
    const { ring, locks } = lockManager({ port: proxy.port } as MemcachedServer, 10)
    try {
      const first = await locks.acquire('r', () => 'n1', 't:lock:r')
      events.length = 0
      const released = first.release()
      const next = await locks.acquire('r', () => 'n1', 't:lock:r')
      await released
      expect(next.held).toBe(true)
      expect(events.slice(0, 3)).toEqual(['delete', 'add', 'reply'])
      await next.release()
    } finally {
      await ring.close()
      await proxy.close()
    }
  })

  it.each([
    ['Express', (options: SessionFailoverOptions) => startShop(express, options)],
    ['Fastify', startFastifyShop],
  ])("sends a lock's release before the response, an error response too (%s): the client's next request, on any instance, finds it gone", async (_framework, start) => {
    const server = await startMemcached()
    // Between the app and memcached: logs each request's opcode as it arrives.
    const events: string[] = []
    const proxy = await startOpcodeProxy(server.port, events)
    try {
      const app = await start({
        secret: 's',
        nodes: `n1:127.0.0.1:${proxy.port}`,
        lockingMode: 'all',
        maxSessionBytes: 2048,
      })
      shops.push(app)
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/start')
      // A locked POST from a raw connection; what the node was sent before the response's first bytes arrived.
      const post = async (path: string) => {
        events.length = 0
        const answer = await firstBytes(app, path, () => events.push('response'), {
          method: 'POST',
          cookie: browser.cookie,
        })
        const requests = events.filter((event) => event !== 'reply')
        return {
          status: answer.slice(9, 12),
          beforeResponse: requests.slice(0, requests.indexOf('response')),
        }
      }
      for (let i = 0; i < 3; i++) {
        expect(await post(`/cart/item${i}`)).toEqual({
          status: '200',
          beforeResponse: expect.arrayContaining(['delete']),
        })
      }
      // A commit that fails: the session would outgrow maxSessionBytes.
      expect(await post(`/cart/${'x'.repeat(3000)}`)).toEqual({
        status: '500',
        beforeResponse: expect.arrayContaining(['delete']),
      })
      expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual([
        'start',
        'item0',
        'item1',
        'item2',
      ])
    } finally {
      await proxy.close()
    }
  })

  it('gives requests of the session on another instance a turn once it has been passed on for a second', async () => {
    const server = await startMemcached()
    const here = lockManager(server, 10, 10_000)
    const there = lockManager(server, 10, 5000)
    try {
      let done = 0
      const busy = Promise.all(
        Array.from({ length: 60 }, async () => {
          const lock = await here.locks.acquire('r', () => 'n1', 't:lock:r')
          await sleep(40)
          done++
          await lock.release()
        }),
      )
      await sleep(200)
      const theirs = await there.locks.acquire('r', () => 'n1', 't:lock:r')
      // Taken while this instance still had requests of the session queued, not after they all ended.
      expect(done).toBeLessThan(60)
      await theirs.release()
      await busy
    } finally {
      await Promise.all([here.ring.close(), there.ring.close()])
    }
  })

  it('passes no lock on once shutting down: a request still queued gets none, and none is left behind', async () => {
    const server = await startMemcached()
    const { ring, locks } = lockManager(server, 10)
    try {
      await locks.acquire('r', () => 'n1', 't:lock:r')
      const queued = locks.acquire('r', () => 'n1', 't:lock:r')
      queued.catch(() => {})
      await locks.releaseAll()
      await expect(queued).rejects.toBeInstanceOf(ClosedError)
      expect(await server.has('t:lock:r')).toBe(false)
    } finally {
      await ring.close()
    }
  })

  it('lets only the head of the in-process queue poll memcached', async () => {
    const servers = await startCluster(1)
    const app = await startShop(express, { secret: 's', nodes: nodesOption(servers), lockingMode: 'all' })
    shops.push(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/start')
    const sets = async () => (await servers[0]?.stats())?.cmd_set ?? 0
    const before = await sets()
    const started = Date.now()
    await Promise.all(Array.from({ length: 20 }, () => browser.send(app, 'POST', '/count/slow')))
    const seconds = Math.ceil((Date.now() - started) / 1000)
    // Per request the session's set; the lock is added once and passed down the queue, and added again each
    // second (others' turn). Polling would add many more adds.
    const written = (await sets()) - before
    expect(written).toBeGreaterThanOrEqual(21)
    expect(written).toBeLessThanOrEqual(21 + seconds)
    expect((await browser.send(app, 'POST', '/count')).body.views).toBe(21)
  })

  it('locks only the routes a RegExp matches, and merges the writes of the others', async () => {
    const servers = await startCluster(2)
    const app = await startShop(express, {
      secret: 's',
      nodes: nodesOption(servers),
      lockingMode: /^POST \/count/,
    })
    shops.push(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/start')
    await browser.send(app, 'POST', '/count')
    await browser.send(app, 'POST', '/cart/more')
    expect(app.sessions.stats()).toMatchObject({ locksAcquired: 1, merges: 1 })
  })

  it("stores an unlocked change with one compare-and-set when nothing was stored since its read ('merge')", async () => {
    const servers = await startCluster(2)
    const app = await startShop(express, { secret: 's', nodes: nodesOption(servers), lockingMode: 'merge' })
    shops.push(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/start')
    const gets = async () => {
      let total = 0
      for (const server of servers) total += Number((await server.stats()).cmd_get)
      return total
    }
    const before = await gets()
    expect((await browser.send(app, 'POST', '/cart/more')).status).toBe(200)
    // The request's own read, and the backup's version check: the primary is not read a second time.
    expect((await gets()) - before).toBe(2)
    expect(app.sessions.stats()).toMatchObject({ merges: 1, mergeConflicts: 0 })
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['start', 'more'])
  })

  it("runs a request whose lock timed out with lockTimeoutAction 'proceed', merging its write", async () => {
    const servers = await startCluster(2)
    const options = { secret: 's', nodes: nodesOption(servers), lockingMode: 'all' as const }
    const holder = await startShop(express, options)
    const other = await startShop(express, {
      ...options,
      lockTimeout: 200,
      lockTimeoutAction: 'proceed' as const,
    })
    shops.push(holder, other)
    const browser = new Browser()
    await browser.send(holder, 'POST', '/cart/apple')
    const hanging = hangingRequest(holder, browser.cookie)
    await hanging.reached()
    const reply = await browser.send(other, 'POST', '/cart/pear')
    hanging.abort()
    expect(reply.status).toBe(200)
    expect(other.sessions.stats()).toMatchObject({ lockTimeouts: 1, merges: 1 })
    expect((await browser.send(holder, 'GET', '/cart')).body.cart).toEqual(['apple', 'pear'])
  })
})
