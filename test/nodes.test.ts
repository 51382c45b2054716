import express from 'express'
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest'
import { Metrics } from '../src/core/metrics.js'
import { NodeRejectedError, OperationTimeoutError } from '../src/errors.js'
import { parseSessionId } from '../src/index.js'
import { type Logger, silentLogger } from '../src/logger.js'
import { MemcachedNode } from '../src/nodes/memcached.js'
import { MemoryNode } from '../src/nodes/memory.js'
import type { SessionNode } from '../src/nodes/node.js'
import { RedisNode } from '../src/nodes/redis.js'
import { NodeRing } from '../src/nodes/ring.js'
import { Browser, startShop } from './support/app.js'
import { startMemcached, stopAllMemcached } from './support/memcached.js'
import { startWatchingProxy } from './support/proxy.js'
import { startRedis, stopAllRedis } from './support/redis.js'

/** A node of `kind` on a server started for it; `stopServers` stops them all. */
async function startNode(
  kind: 'memcached' | 'redis' | 'memory',
  operationTimeoutMs: number,
): Promise<SessionNode> {
  const common = { id: 'n1', operationTimeoutMs, probeKey: 'p' }
  if (kind === 'memcached') {
    return new MemcachedNode({ ...common, host: '127.0.0.1', port: (await startMemcached()).port })
  }
  if (kind === 'redis')
    return new RedisNode({ ...common, url: `redis://127.0.0.1:${(await startRedis()).port}` })
  return new MemoryNode('local')
}

async function stopServers(): Promise<void> {
  await stopAllMemcached()
  await stopAllRedis()
}

/** Every backend keeps the same small contract: the core cannot tell them apart. */
describe.each([
  ['memcached', 'memcached'],
  ['Redis', 'redis'],
  ['the in-process development node', 'memory'],
] as const)('the node contract on %s', (_name, kind) => {
  let node: SessionNode

  beforeAll(async () => {
    node = await startNode(kind, 1000)
  })
  afterAll(async () => {
    await node?.close()
    await stopServers()
  })

  it('stores, adds only when absent, touches and deletes', async () => {
    await node.set('s', Buffer.from('v'), 60)
    expect((await node.get('s'))?.toString()).toBe('v')
    expect(await node.add('s', Buffer.from('w'), 60)).toBe(false)
    expect(await node.add('t', Buffer.from('w'), 60)).toBe(true)
    expect(await node.touch('s', 120)).toBe(true)
    expect(await node.touch('absent', 120)).toBe(false)
    expect(await node.delete('s')).toBe(true)
    expect(await node.delete('s')).toBe(false)
    expect(await node.get('s')).toBeNull()
  })

  it('writes only over the value it read', async () => {
    await node.set('k', Buffer.from('one'), 60)
    const first = await node.gets('k')
    expect(first?.value.toString()).toBe('one')
    expect(await node.setIfUnchanged('k', Buffer.from('two'), 60, first?.cas as never)).toBe('stored')
    // The token is now stale: someone (we) wrote since.
    expect(await node.setIfUnchanged('k', Buffer.from('three'), 60, first?.cas as never)).toBe('conflict')
    expect((await node.get('k'))?.toString()).toBe('two')
  })

  it('deletes an owned value only while it is still the one it added', async () => {
    const token = await node.addOwned('lock', Buffer.from('first'), 60)
    expect(token).not.toBeNull()
    expect(await node.addOwned('lock', Buffer.from('second'), 60)).toBeNull()
    await node.deleteOwned('lock', token as never)
    expect(await node.get('lock')).toBeNull()
    // Gone (expired, say) and added again by another writer: the first token deletes nothing.
    expect(await node.addOwned('lock', Buffer.from('next'), 60)).not.toBeNull()
    await node.deleteOwned('lock', token as never)
    expect((await node.get('lock'))?.toString()).toBe('next')
  })

  it('deletes only the value it read, and reports a value that is gone', async () => {
    await node.set('d', Buffer.from('mine'), 60)
    const mine = await node.gets('d')
    await node.set('d', Buffer.from('theirs'), 60)
    expect(await node.deleteIfUnchanged('d', mine?.cas as never)).toBe('conflict')
    const theirs = await node.gets('d')
    expect(await node.deleteIfUnchanged('d', theirs?.cas as never)).toBe('stored')
    expect(await node.gets('d')).toBeNull()
    expect(await node.setIfUnchanged('d', Buffer.from('x'), 60, theirs?.cas as never)).toBe('missing')
  })
})

describe.each([
  ['memcached', 'memcached'],
  ['Redis', 'redis'],
] as const)('many operations in flight on one %s connection', (_name, kind) => {
  let node: SessionNode

  beforeAll(async () => {
    node = await startNode(kind, 2000)
  })
  afterAll(async () => {
    await node?.close()
    await stopServers()
  })

  it('gives each its own reply, also values that arrive in many reads', async () => {
    // Values of 1 byte to 600 kB, written and read in parallel: replies share reads and span them.
    const values = Array.from({ length: 60 }, (_, i) => Buffer.alloc(i % 3 === 0 ? 600_000 - i : i + 1, i))
    await Promise.all(values.map((value, i) => node.set(`many-${i}`, value, 60)))
    const read = await Promise.all(values.map((_, i) => node.gets(`many-${i}`)))
    for (const [i, value] of values.entries()) expect(read[i]?.value.equals(value)).toBe(true)
    const misses = await Promise.all(values.map((_, i) => node.get(`absent-${i}`)))
    expect(misses.every((miss) => miss === null)).toBe(true)
  })
})

/** Blocks this thread, as a long synchronous handler or a long garbage collection does. */
function stallTheLoop(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms)
}

describe.each([
  ['memcached', 'memcached'],
  ['Redis', 'redis'],
] as const)("a stall of this process's own event loop, on %s", (_name, kind) => {
  let node: SessionNode

  beforeAll(async () => {
    // Stalls between this and twice this: ioredis's own command timeout is twice the operation timeout.
    node = await startNode(kind, 300)
    await node.set('stall', Buffer.from('v'), 60) // connected
  })
  afterAll(async () => {
    await node?.close()
    await stopServers()
  })

  it('does not time out a request the node answered while the loop was stalled', async () => {
    const reading = node.get('stall')
    await new Promise((resolve) => setImmediate(resolve)) // sent
    stallTheLoop(450)
    expect((await reading)?.toString()).toBe('v')
  })

  it('counts the timeout from when a request left, not from a long turn before it', async () => {
    const reading = node.get('stall')
    stallTheLoop(450)
    expect((await reading)?.toString()).toBe('v')
  })
})

describe('a memcached with a larger item size (-I)', () => {
  it('reads values past 8 MiB when the node is told the largest session, and refuses them otherwise', async () => {
    const server = await startMemcached(['-I', '16m', '-m', '256'])
    const common = { id: 'n1', host: '127.0.0.1', port: server.port, operationTimeoutMs: 5000, probeKey: 'p' }
    const large = new MemcachedNode({ ...common, maxValueBytes: 12 * 1024 * 1024 })
    const small = new MemcachedNode(common)
    try {
      const value = Buffer.alloc(10 * 1024 * 1024, 3)
      await large.set('big', value, 60)
      expect((await large.get('big'))?.equals(value)).toBe(true)
      // Without the limit raised, a reply that large counts as a misparse: the read fails, nothing hangs.
      await expect(small.get('big')).rejects.toThrow(/malformed/)
    } finally {
      await large.close()
      await small.close()
      await stopAllMemcached()
    }
  })
})

describe('a memcached with a smaller item size (-I)', () => {
  it("refuses a value over the server's item size unsent, even as a new connection's first request", async () => {
    // memcached refuses such a write and deletes what the key held: the last good copy of a session.
    const server = await startMemcached(['-I', '512k'])
    const common = { id: 'n1', host: '127.0.0.1', port: server.port, operationTimeoutMs: 5000, probeKey: 'p' }
    const writer = new MemcachedNode(common)
    const fresh = new MemcachedNode(common)
    const again = new MemcachedNode(common)
    try {
      await writer.set('k', Buffer.from('kept'), 60)
      expect(fresh.largestValue('k'.length)).toBeUndefined()
      // The fresh node's first request: it waits for the connection to learn the limit, then refuses.
      await expect(fresh.set('k', Buffer.alloc(600_000), 60)).rejects.toThrow(
        /stores values of at most 524\d{3} bytes under this key .*was not sent/,
      )
      await expect(fresh.set('k', Buffer.alloc(600_000), 60)).rejects.toBeInstanceOf(NodeRejectedError)
      expect(fresh.largestValue('k'.length)).toBeLessThan(512 * 1024)
      expect(fresh.largestValue('k'.length)).toBeGreaterThan(512 * 1024 - 200)
      const read = await writer.gets('k')
      expect(read?.value.toString()).toBe('kept')
      // A compare-and-set too, on a connection that learned the limit with its read.
      const token = (await again.gets('k'))?.cas
      if (!token) throw new Error('the value was read')
      await expect(again.setIfUnchanged('k', Buffer.alloc(600_000), 60, token)).rejects.toThrow(
        /was not sent/,
      )
      expect((await writer.get('k'))?.toString()).toBe('kept')
      // Up to the limit is stored.
      const largest = Buffer.alloc(fresh.largestValue('k'.length) ?? 0, 7)
      await fresh.set('k', largest, 60)
      expect((await writer.get('k'))?.equals(largest)).toBe(true)
    } finally {
      await writer.close()
      await fresh.close()
      await again.close()
      await stopAllMemcached()
    }
  })
})

describe('a memcached that freezes before its item size is known', () => {
  it("fails a new connection's first write with that connection, without opening another", async () => {
    // The write waits for the item size; when that times out, a write sent on a new connection would wait a
    // second timeout (and outlive the lock a locked write relies on).
    const server = await startMemcached()
    let statRequests = 0
    const proxy = await startWatchingProxy(server.port, {
      request: (chunk) => {
        if (chunk[0] === 0x80 && chunk[1] === 0x10) statRequests++
      },
    })
    const node = new MemcachedNode({
      id: 'n1',
      host: '127.0.0.1',
      port: proxy.port,
      operationTimeoutMs: 300,
      probeKey: 'p',
    })
    try {
      await server.freeze()
      await expect(node.set('k', Buffer.from('v'), 60)).rejects.toBeInstanceOf(OperationTimeoutError)
      expect(statRequests).toBe(1)
    } finally {
      await server.thaw()
      await node.close()
      await proxy.close()
      await stopAllMemcached()
    }
  })
})

describe('a frozen memcached (SIGSTOP)', () => {
  it('fails every pending operation with a timeout, then works on a new connection once it resumes', async () => {
    const server = await startMemcached()
    const node = new MemcachedNode({
      id: 'n1',
      host: '127.0.0.1',
      port: server.port,
      operationTimeoutMs: 300,
      probeKey: 'p',
    })
    try {
      await node.set('k', Buffer.from('before'), 60)
      await server.freeze()
      const started = Date.now()
      const pending = await Promise.allSettled([node.get('k'), node.set('k', Buffer.from('lost?'), 60)])
      expect(pending.map((result) => result.status)).toEqual(['rejected', 'rejected'])
      for (const result of pending) {
        expect((result as PromiseRejectedResult).reason).toBeInstanceOf(OperationTimeoutError)
      }
      expect(Date.now() - started).toBeLessThan(2000)
      await server.thaw()
      // The timed-out connection was dropped; the next operations open a new one. (Another key: the set queued
      // during the freeze had reached the server and may still run when it resumes.)
      await node.set('fresh', Buffer.from('after'), 60)
      expect((await node.get('fresh'))?.toString()).toBe('after')
    } finally {
      await node.close()
      await stopAllMemcached()
    }
  })
})

describe('a memcached node while the wall clock steps', () => {
  it('times a request out after operationTimeout even when the clock steps back meanwhile', async () => {
    const server = await startMemcached()
    const node = memcachedNodeOn(server.port)
    const now = Date.now.bind(Date)
    try {
      await node.set('k', Buffer.from('v'), 60)
      await server.freeze()
      const pending = node.get('k')
      // NTP (or an operator) sets the clock a minute back while the request waits.
      const stepped = vi.spyOn(Date, 'now').mockImplementation(() => now() - 60_000)
      try {
        // Deadlines on the wall clock would hold it for that minute; the check is a count of timeouts, not a
        // stopwatch: it must have settled by the time ten operationTimeouts have passed.
        const outcome = await Promise.race([
          pending.then(
            () => 'answered',
            (error: unknown) => (error instanceof OperationTimeoutError ? 'timed out' : String(error)),
          ),
          new Promise((resolve) => setTimeout(resolve, 10 * 200, 'still waiting')),
        ])
        expect(outcome).toBe('timed out')
      } finally {
        stepped.mockRestore()
      }
    } finally {
      server.thaw()
      await node.close()
      await stopAllMemcached()
    }
  })
})

/** Node n1 on a memcached at `port`, whose operations time out after 200 ms. */
function memcachedNodeOn(port: number): MemcachedNode {
  return new MemcachedNode({ id: 'n1', host: '127.0.0.1', port, operationTimeoutMs: 200, probeKey: 'p' })
}

/** A ring of the one node, probing every 50 ms once it is dead. */
function ringOf(node: SessionNode, logger: Logger = silentLogger): NodeRing {
  return new NodeRing([node], {
    failoverNodeIds: new Set(),
    probeIntervalMs: 50,
    logger,
    metrics: new Metrics(silentLogger),
  })
}

/** Freezes the server of the ring's node n1 until the ring marks it dead, runs `whileDead`, then thaws it. */
async function deadWhileFrozen(
  ring: NodeRing,
  server: { freeze(): Promise<void>; thaw(): void },
  whileDead: () => void,
) {
  await server.freeze()
  await expect(ring.call('n1', (n) => n.get('k0'))).rejects.toBeInstanceOf(OperationTimeoutError)
  expect(ring.isAlive('n1')).toBe(false)
  whileDead()
  server.thaw()
  await vi.waitFor(() => expect(ring.isAlive('n1')).toBe(true), { timeout: 5000, interval: 20 })
}

describe('a node that sessions were moved off while it was frozen', () => {
  it('loses, once back, the old copies it recognizes (more than one batch of them), and keeps every other value', async () => {
    const server = await startMemcached()
    const node = memcachedNodeOn(server.port)
    const ring = ringOf(node)
    const keys = Array.from({ length: 150 }, (_, i) => `k${i}`)
    try {
      for (const key of keys) await node.set(key, Buffer.from(`old ${key}`), 60)
      await deadWhileFrozen(ring, server, () => {
        // Every tenth key holds something else by the time the node is back (here: a test that says so).
        for (const [i, key] of keys.entries()) {
          ring.deleteOldCopyWhenBack(
            'n1',
            key,
            (stored) => i % 10 !== 0 && stored.toString() === `old ${key}`,
          )
        }
      })
      const kept = async () => (await Promise.all(keys.map((key) => node.get(key)))).filter(Boolean).length
      await vi.waitFor(async () => expect(await kept()).toBe(15), { timeout: 5000, interval: 50 })
      for (const [i, key] of keys.entries()) expect((await node.get(key)) !== null).toBe(i % 10 === 0)
    } finally {
      await ring.close()
      await stopAllMemcached()
    }
  })

  it.each([
    [
      'an old copy, when its node is already back by the time the move is written',
      (ring: NodeRing, key: string, value: string) =>
        ring.deleteOldCopyWhenBack('n1', key, (stored) => stored.toString() === value),
    ],
    [
      // The probe found the node back while the write that moved the session still waited on another node: the
      // value that landed late must not stay there for a client with the old cookie to read.
      'a late write, when its node is already back by the time the session is stored elsewhere',
      (ring: NodeRing, key: string, value: string) => ring.deleteWhenBack('n1', key, Buffer.from(value)),
    ],
  ] as const)('deletes at once %s, and keeps a newer value', async (_case, deleteWhenBack) => {
    const server = await startMemcached()
    const node = memcachedNodeOn(server.port)
    const ring = ringOf(node)
    try {
      await node.set('stale', Buffer.from('from before'), 60)
      await node.set('newer', Buffer.from('written since'), 60)
      deleteWhenBack(ring, 'stale', 'from before')
      deleteWhenBack(ring, 'newer', 'from before')
      await vi.waitFor(async () => expect(await node.get('stale')).toBeNull(), {
        timeout: 5000,
        interval: 20,
      })
      expect((await node.get('newer'))?.toString()).toBe('written since')
      expect(ring.isAlive('n1')).toBe(true)
    } finally {
      await ring.close()
      await stopAllMemcached()
    }
  })
})

describe('a memcached out of memory, with eviction off (-M)', () => {
  afterAll(stopAllMemcached)

  it('counts as down when it refuses a write: its sessions fail over instead of failing', async () => {
    const full = await startMemcached(['-M', '-m', '2'])
    const other = await startMemcached()
    const shop = await startShop(express, {
      secret: 'out-of-memory',
      nodes: `n1:127.0.0.1:${full.port} n2:127.0.0.1:${other.port}`,
      nodeProbeInterval: 60_000,
    })
    const filler = memcachedNodeOn(full.port)
    try {
      const browsers = Array.from({ length: 4 }, () => new Browser())
      for (const browser of browsers) await browser.send(shop, 'POST', '/cart/apple')
      const onFull = browsers.filter((browser) => parseSessionId(browser.sessionId)?.nodeId === 'n1')
      expect(onFull.length).toBeGreaterThan(0)
      // Filled until memcached refuses values of every size a session may have: each slab class's pages are then
      // full, and no page is left to give one.
      let refused: unknown
      for (let size = 1; size <= 4096; size = Math.ceil(size * 1.25)) {
        const value = Buffer.alloc(size, 'x')
        let refusedHere = false
        for (let i = 0; i < 40_000 && !refusedHere; i += 250) {
          await Promise.all(
            Array.from({ length: 250 }, (_, j) => filler.set(`fill${size}:${i + j}`, value, 600)),
          ).catch((error: unknown) => {
            refused = error
            refusedHere = true
          })
        }
      }
      expect(String(refused)).toMatch(/out of memory/)

      for (const browser of onFull) {
        const reply = await browser.send(shop, 'POST', '/cart/pear')
        expect(reply.status).toBe(200)
        expect(reply.body.cart).toEqual(['apple', 'pear'])
        expect(parseSessionId(browser.sessionId)?.nodeId).toBe('n2')
      }
    } finally {
      await filler.close()
      await shop.close()
    }
  })
})

describe('a memcached with compare-and-set disabled (-C)', () => {
  afterAll(stopAllMemcached)

  it('refuses a conditional write, which memcached would make unconditional, with an error that says why', async () => {
    const server = await startMemcached(['-C'])
    const node = new MemcachedNode({
      id: 'n1',
      operationTimeoutMs: 1000,
      probeKey: 'p',
      host: '127.0.0.1',
      port: server.port,
    })
    try {
      await node.set('k', Buffer.from('one'), 60)
      const read = await node.gets('k')
      expect(read?.value.toString()).toBe('one')
      await expect(node.setIfUnchanged('k', Buffer.from('two'), 60, read?.cas as never)).rejects.toThrow(
        /compare-and-set disabled \(memcached -C\)/,
      )
      await expect(node.deleteIfUnchanged('k', read?.cas as never)).rejects.toBeInstanceOf(NodeRejectedError)
      expect((await node.get('k'))?.toString()).toBe('one')
    } finally {
      await node.close()
    }
  })

  it('comes back after a freeze though the deletes it owes can only be conditional: it keeps those values', async () => {
    const server = await startMemcached(['-C'])
    const node = memcachedNodeOn(server.port)
    const warnings: string[] = []
    const ring = ringOf(node, { ...silentLogger, warn: (_fields, message) => warnings.push(message ?? '') })
    try {
      await node.set('late', Buffer.from('landed late'), 60)
      await node.set('old', Buffer.from('from before a move'), 60)
      await deadWhileFrozen(ring, server, () => {
        ring.deleteWhenBack('n1', 'late', Buffer.from('landed late'))
        ring.deleteOldCopyWhenBack('n1', 'old', () => true)
      })
      await new Promise((resolve) => setTimeout(resolve, 100))
      expect((await node.get('late'))?.toString()).toBe('landed late')
      expect((await node.get('old'))?.toString()).toBe('from before a move')
      expect(ring.health()[0]?.errors).toBe(1) // the freeze's timeout only
      // Said once, and kept as the node's last error for health().
      expect(warnings.filter((message) => message.includes('refused a delete'))).toHaveLength(1)
      expect(ring.health()[0]?.lastError).toMatch(/compare-and-set disabled/)
    } finally {
      await ring.close()
    }
  })
})

describe('a memcached that restarts between a read and a conditional write', () => {
  afterAll(stopAllMemcached)

  /** One server, and two clients of it: ours, and another writer's. */
  async function twoClients() {
    const server = await startMemcached()
    const common = { id: 'n1', operationTimeoutMs: 1000, probeKey: 'p', host: '127.0.0.1', port: server.port }
    return { server, first: new MemcachedNode(common), second: new MemcachedNode(common) }
  }

  it("never writes over another writer's value that came to carry the same CAS after the restart", async () => {
    const { server, first, second } = await twoClients()
    try {
      await first.set('session', Buffer.from('read'), 60)
      const read = await first.gets('session')
      await server.restart() // empty, and its CAS counter starts again from 1
      await second.set('session', Buffer.from('theirs'), 60) // the new server's first item, as ours was
      expect(await first.setIfUnchanged('session', Buffer.from('mine'), 60, read?.cas as never)).toBe(
        'conflict',
      )
      expect((await second.get('session'))?.toString()).toBe('theirs')
    } finally {
      await Promise.all([first.close(), second.close()])
    }
  })

  it("never deletes another writer's value that came to carry the same CAS after the restart", async () => {
    const { server, first, second } = await twoClients()
    try {
      const token = await first.addOwned('lock', Buffer.from('mine'), 60)
      await server.restart() // empty, and its CAS counter starts again from 1
      expect(await first.get('lock')).toBeNull() // through a new connection, to the new, empty server
      // The other writer's add is the new server's first item, as ours was on the old one: the same CAS.
      expect(await second.addOwned('lock', Buffer.from('theirs'), 60)).not.toBeNull()
      await first.deleteOwned('lock', token as never)
      expect((await second.get('lock'))?.toString()).toBe('theirs')
    } finally {
      await Promise.all([first.close(), second.close()])
    }
  })
})
