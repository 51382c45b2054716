import express from 'express'
import { Redis } from 'ioredis'
import { afterEach, describe, expect, it } from 'vitest'
import { ClosedError, ConfigError, parseSessionId, sessionFailover } from '../src/index.js'
import { RedisNode } from '../src/nodes/redis.js'
import { redisClientSettings } from '../src/nodes/redis-settings.js'
import { Browser, type ShopApp, startShop } from './support/app.js'
import { stopAllServers } from './support/backends.js'
import { startMemcached } from './support/memcached.js'
import { startMovableAddress, startRedis, startRedisSentinel } from './support/redis.js'

/** Polls `condition` every 100 ms until it holds or `capMs` has passed; the caller asserts the outcome. */
async function eventually(condition: () => boolean | Promise<boolean>, capMs: number): Promise<void> {
  const deadline = Date.now() + capMs
  while (!(await condition()) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

function alive(shop: ShopApp, id: string): boolean {
  return shop.sessions.health().nodes.find((node) => node.id === id)?.alive === true
}

/** A bare node on a real server, for what a shop would hide behind its other node. */
function nodeOf(config: Partial<ConstructorParameters<typeof RedisNode>[0]>, timeoutMs = 500): RedisNode {
  return new RedisNode({ id: 'r1', operationTimeoutMs: timeoutMs, probeKey: 'probe', ...config })
}

async function answers(node: RedisNode): Promise<boolean> {
  try {
    await node.ping()
    return true
  } catch {
    return false
  }
}

describe('a Redis node whose server or sentinel froze', () => {
  afterEach(() => stopAllServers())

  it('reaches the master through the next sentinel when the first one is frozen', async () => {
    const { master, sentinels, sentinelUrls } = await startRedisSentinel('lookup', 2)
    await sentinels[0]?.freeze()
    const node = nodeOf({ sentinel: { sentinels: sentinelUrls, name: 'lookup' } })
    try {
      await eventually(() => answers(node), 10_000)
      await node.set('reached', Buffer.from('yes'), 60)
      expect(await master.get('reached')).toEqual(Buffer.from('yes'))
    } finally {
      await node.close()
    }
  })

  it('fails a command waiting for the connection with ClosedError as soon as the node is closed', async () => {
    const redis = await startRedis()
    // Frozen before the node connects: the kernel accepts the connection, the server never answers it.
    await redis.freeze()
    const node = nodeOf({ url: `redis://127.0.0.1:${redis.port}` }, 5000)
    const waiting = node.get('anything')
    await node.close()
    await expect(waiting).rejects.toBeInstanceOf(ClosedError)
  })
})

describe('a Redis node whose server became a replica', () => {
  afterEach(() => stopAllServers())

  it('reconnects on READONLY: when its address moves to the new master, sessions are served again', async () => {
    // Loading the new master's data in memory: a replica that loads it through a file leaves dump.rdb behind.
    const oldMaster = await startRedis(['--repl-diskless-load', 'swapdb'])
    const newMaster = await startRedis()
    const address = await startMovableAddress(oldMaster.port)
    const memcached = await startMemcached()
    const shop = await startShop(express, {
      secret: 'readonly',
      nodes: `r1:redis://127.0.0.1:${address.port} m1:127.0.0.1:${memcached.port}`,
      operationTimeout: 500,
      nodeProbeInterval: 100,
    })
    const downs: string[] = []
    shop.sessions.on('nodeDown', ({ node }) => downs.push(node))
    try {
      const browsers = Array.from({ length: 4 }, () => new Browser())
      for (const browser of browsers) await browser.send(shop, 'POST', '/cart/apple')
      expect(browsers.filter((b) => parseSessionId(b.sessionId)?.nodeId === 'r1')).toHaveLength(2)

      // A managed failover: the old master follows the new one, and the address now leads to the new one.
      const admin = new Redis({ port: oldMaster.port, host: '127.0.0.1', maxRetriesPerRequest: 0 })
      try {
        await admin.replicaof('127.0.0.1', String(newMaster.port))
      } finally {
        admin.disconnect()
      }
      address.moveTo(newMaster.port)
      for (const browser of browsers) {
        const reply = await browser.send(shop, 'POST', '/cart/pear')
        expect(reply.status).toBe(200)
        expect(reply.body.cart).toEqual(['apple', 'pear'])
      }
      expect(downs).toContain('r1')

      await eventually(() => alive(shop, 'r1'), 10_000)
      expect(alive(shop, 'r1')).toBe(true)
      const fresh = Array.from({ length: 4 }, () => new Browser())
      for (const browser of fresh) await browser.send(shop, 'POST', '/cart/new')
      const onRedis = fresh.filter((b) => parseSessionId(b.sessionId)?.nodeId === 'r1')
      expect(onRedis.length).toBeGreaterThan(0)
      for (const browser of onRedis)
        expect((await browser.send(shop, 'GET', '/cart')).body.cart).toEqual(['new'])
    } finally {
      await shop.close()
      await address.close()
    }
  }, 30_000)
})

describe('the URLs of Redis nodes', () => {
  it.each([
    ['a server', { id: 'r1', url: 'redis://:hunter2@127.0.0.1:6379?enableOfflineQueue=1' }],
    ['a server, with a fragment', { id: 'r1', url: 'redis://:hunter2@127.0.0.1:6379/1#main' }],
    ['a server, with an address family Node has not', { id: 'r1', url: 'redis://:hunter2@h:6379?family=5' }],
    ['a cluster', { id: 'r1', cluster: ['redis://:hunter2@10.0.0.4:7000?maxRetriesPerRequest=20'] }],
    [
      'a Sentinel master',
      {
        id: 'r1',
        sentinels: ['redis://10.0.0.7:26379'],
        name: 'main',
        masterUrl: 'rediss://:hunter2@master/2?tls=0',
      },
    ],
    ['a sentinel', { id: 'r1', sentinels: ['redis://:hunter2@10.0.0.7:26379?family=6'], name: 'main' }],
  ])('refuses a query string (but family) or a fragment at start-up, for %s, without echoing the URL', (_, node) => {
    const start = () => sessionFailover({ secret: 's', nodes: [node] })
    expect(start).toThrow(ConfigError)
    expect(start).toThrow(/node 'r1' .*no query string .*, got (\?[a-zA-Z]+=…|a fragment)$/)
    expect(start).not.toThrow(/hunter2|10\.0\.0|127\.0\.0|master/)
  })

  it('takes ?family=6 (a host name that resolves to IPv6 only) and passes it to the client', async () => {
    // Started, then closed at once: its client would go on looking up the host for the rest of the file.
    const started = sessionFailover({ secret: 's', nodes: 'r1:redis://cache.internal:6379?family=6' })
    await started.close()
    const built = redisClientSettings({
      id: 'r1',
      url: 'redis://cache.internal:6379/2?family=6',
      operationTimeoutMs: 500,
      probeKey: 'probe',
    })
    expect(built.kind === 'redis' && built.options).toMatchObject({
      host: 'cache.internal',
      db: 2,
      family: 6,
    })
  })

  it('refuses a path that is not a database number', () => {
    expect(() => sessionFailover({ secret: 's', nodes: 'r1:redis://127.0.0.1:6379/abc' })).toThrow(
      "Expected the url of node 'r1' to end with a database number (/0, /1, …) or with its port, got another path",
    )
  })

  it.each([
    ['an @', 'redis://user:p@ss-word@127.0.0.1:6379?x=1', 'ss-word'],
    ['a / after digits', 'redis://u:12/34secret@127.0.0.1:6379?x=1', '34secret'],
  ])('hides a password with %s that was not percent-encoded, in every message', (_, url, secret) => {
    // As a string entry, as an object, and as a malformed entry (no id), whose message echoes the entry.
    for (const nodes of [`r1:${url}`, [{ id: 'r1', url }], url]) {
      const start = () => sessionFailover({ secret: 's', nodes })
      expect(start).toThrow(ConfigError)
      expect(start).not.toThrow(new RegExp(secret))
    }
  })
})

describe('the TLS of a Sentinel-managed master', () => {
  const settings = (sentinels: string[], masterUrl?: string) => {
    const built = redisClientSettings({
      id: 's1',
      sentinel: masterUrl ? { sentinels, name: 'main', masterUrl } : { sentinels, name: 'main' },
      operationTimeoutMs: 500,
      probeKey: 'probe',
    })
    if (built.kind !== 'redis') throw new Error('expected one Redis client')
    return built.options
  }

  it("follows masterUrl's scheme, not the sentinels': no password to a rediss:// master in cleartext", () => {
    const tlsMaster = settings(['redis://10.0.0.7:26379'], 'rediss://app:pw@master/2')
    expect(tlsMaster.enableTLSForSentinelMode).toBe(true)
    expect(tlsMaster.tls).toEqual({ servername: 'master' })
    expect(tlsMaster.sentinelTLS).toBeUndefined()
    expect(tlsMaster.password).toBe('pw')

    const tlsSentinels = settings(['rediss://10.0.0.7:26379'], 'redis://app:pw@master/2')
    expect(tlsSentinels.enableTLSForSentinelMode).toBe(false)
    expect(tlsSentinels.tls).toBeUndefined()
    expect(tlsSentinels.sentinelTLS).toEqual({})

    expect(settings(['rediss://10.0.0.7:26379']).enableTLSForSentinelMode).toBe(false)
  })

  it("checks the master's certificate against masterUrl's host name, not the address Sentinel gives", () => {
    expect(settings(['redis://10.0.0.7:26379'], 'rediss://app:pw@redis.example.com/2').tls).toEqual({
      servername: 'redis.example.com',
    })
    expect(settings(['redis://10.0.0.7:26379'], 'rediss://app:pw@10.0.0.9/2').tls).toEqual({})
  })
})
