import express from 'express'
import { Redis } from 'ioredis'
import { afterEach, describe, expect, it } from 'vitest'
import { parseSessionId } from '../src/index.js'
import { isUnavailableReply } from '../src/nodes/redis.js'
import { Browser, startShop } from './support/app.js'
import { stopAllServers } from './support/backends.js'
import { startMemcached } from './support/memcached.js'
import { clusterInfo, startRedis, startRedisCluster, startRedisSentinel } from './support/redis.js'
import { until } from './support/until.js'

describe('a Redis Cluster as one node', () => {
  afterEach(() => stopAllServers())

  it('holds sessions like any node, and when a master dies its sessions fail over to the other node', async () => {
    const cluster = await startRedisCluster(3)
    const memcached = await startMemcached()
    const shop = await startShop(express, {
      secret: 'cluster',
      nodes: [
        { id: 'c1', cluster: cluster.urls },
        { id: 'm1', host: '127.0.0.1', port: memcached.port },
      ],
      operationTimeout: 500,
      nodeProbeInterval: 200,
    })
    try {
      const browsers = Array.from({ length: 12 }, () => new Browser())
      for (const [index, browser] of browsers.entries()) {
        await browser.send(shop, 'POST', `/cart/item${index}`)
        await browser.send(shop, 'POST', '/cart/more')
      }
      const onCluster = browsers.filter((b) => parseSessionId(b.sessionId)?.nodeId === 'c1')
      expect(onCluster.length).toBe(6) // new sessions alternate between the two nodes
      for (const browser of browsers)
        expect((await browser.send(shop, 'GET', '/cart')).body.cart).toHaveLength(2)

      // One master goes: the cluster stops answering for its slots at once; those sessions move to m1.
      await cluster.servers[0]?.kill()
      for (const [index, browser] of browsers.entries()) {
        const reply = await browser.send(shop, 'POST', '/cart/after')
        expect(reply.status).toBe(200)
        expect(reply.body.cart).toEqual([`item${index}`, 'more', 'after'])
      }
      expect(browsers.filter((b) => parseSessionId(b.sessionId)?.nodeId === 'm1').length).toBeGreaterThan(6)
      // Past cluster-node-timeout the cluster declares itself down (full coverage required): every session is
      // on m1 now, and c1 counts as dead. Waited for as the surviving masters report it.
      const survivors = cluster.servers.slice(1)
      await until(
        async () =>
          (await Promise.all(survivors.map((server) => clusterInfo(server.port).catch(() => '')))).every(
            (info) => info.includes('cluster_state:fail'),
          ),
        15_000,
      )
      for (const [index, browser] of browsers.entries()) {
        const reply = await browser.send(shop, 'POST', '/cart/later')
        expect(reply.body.cart).toEqual([`item${index}`, 'more', 'after', 'later'])
        expect(parseSessionId(browser.sessionId)?.nodeId).toBe('m1')
      }
      expect(shop.sessions.health().nodes.find((node) => node.id === 'c1')?.alive).toBe(false)
    } finally {
      await shop.close()
    }
  }, 60_000)
})

describe('a Redis node that can be read but not written', () => {
  afterEach(() => stopAllServers())

  it('counts a master short of replicas (NOREPLICAS) as down: its sessions fail over instead of failing', async () => {
    const [r1, r2] = [await startRedis(), await startRedis()]
    const shop = await startShop(express, {
      secret: 'noreplicas',
      nodes: `r1:redis://127.0.0.1:${r1?.port} r2:redis://127.0.0.1:${r2?.port}`,
      operationTimeout: 500,
    })
    try {
      const browsers = [new Browser(), new Browser()]
      for (const browser of browsers) await browser.send(shop, 'POST', '/cart/apple')
      const onR1 = browsers.find((browser) => parseSessionId(browser.sessionId)?.nodeId === 'r1') as Browser
      const admin = new Redis({ port: r1?.port, host: '127.0.0.1', maxRetriesPerRequest: 0 })
      try {
        await admin.config('SET', 'min-replicas-to-write', '1') // every write now answers NOREPLICAS
      } finally {
        admin.disconnect()
      }
      const reply = await onR1.send(shop, 'POST', '/cart/pear')
      expect(reply.status).toBe(200)
      expect(reply.body.cart).toEqual(['apple', 'pear'])
      expect(parseSessionId(onR1.sessionId)?.nodeId).toBe('r2')
    } finally {
      await shop.close()
    }
  })

  it('keeps a node that answers reads but refuses writes out of service: its probe writes', async () => {
    const r1 = await startRedis(['--min-replicas-to-write', '1'])
    const r2 = await startRedis()
    const shop = await startShop(express, {
      secret: 'noreplicas',
      nodes: `r1:redis://127.0.0.1:${r1.port} r2:redis://127.0.0.1:${r2.port}`,
      operationTimeout: 500,
      nodeProbeInterval: 50,
    })
    try {
      const ups: string[] = []
      shop.sessions.on('nodeUp', ({ node }) => ups.push(node))
      for (let i = 0; i < 4; i++) {
        const browser = new Browser()
        expect((await browser.send(shop, 'POST', '/cart/apple')).status).toBe(200)
        expect(parseSessionId(browser.sessionId)?.nodeId).toBe('r2')
        // A probe that only read would find r1 answering and bring it back, for the next new session to fail on.
        await new Promise((resolve) => setTimeout(resolve, 150))
      }
      expect(ups).toEqual([])
      expect(shop.sessions.health().nodes.find((node) => node.id === 'r1')?.alive).toBe(false)
    } finally {
      await shop.close()
    }
  })

  it('reads such an error raised inside a script as the node being down on Redis before 7 too, where it is wrapped', () => {
    const wrapped = (reply: string) => `ERR Error running script (call to f_4b5e): @user_script:1: ${reply}`
    expect(isUnavailableReply(wrapped("-OOM command not allowed when used memory > 'maxmemory'."))).toBe(true)
    expect(isUnavailableReply(wrapped('-NOREPLICAS Not enough good replicas to write.'))).toBe(true)
    expect(isUnavailableReply('READONLY You can not write against a read only replica.')).toBe(true)
    // A refusal of this one command stays a refusal, wrapped or not.
    expect(
      isUnavailableReply(wrapped('-WRONGTYPE Operation against a key holding the wrong kind of value')),
    ).toBe(false)
    expect(isUnavailableReply('WRONGTYPE Operation against a key holding the wrong kind of value')).toBe(
      false,
    )
  })
})

describe('a Sentinel-managed Redis master as one node', () => {
  afterEach(() => stopAllServers())

  // Frozen, not killed: the connection stays open, and only its reset after a timeout has ioredis ask Sentinel again.
  it.each([
    'killed',
    'frozen',
  ] as const)('holds sessions, keeps them through a master failure, and is used again once Sentinel has promoted the replica (master %s)', async (failure) => {
    const { master, sentinelUrl } = await startRedisSentinel('sessions')
    const memcached = await startMemcached()
    const shop = await startShop(express, {
      secret: 'sentinel',
      nodes: [
        { id: 's1', sentinels: [sentinelUrl], name: 'sessions' },
        { id: 'm1', host: '127.0.0.1', port: memcached.port },
      ],
      operationTimeout: 500,
      nodeProbeInterval: 200,
    })
    try {
      const browsers = Array.from({ length: 6 }, () => new Browser())
      for (const [index, browser] of browsers.entries())
        await browser.send(shop, 'POST', `/cart/item${index}`)
      expect(browsers.filter((b) => parseSessionId(b.sessionId)?.nodeId === 's1')).toHaveLength(3)

      await (failure === 'killed' ? master.kill() : master.freeze())
      for (const [index, browser] of browsers.entries()) {
        const reply = await browser.send(shop, 'POST', '/cart/after')
        expect(reply.status).toBe(200)
        expect(reply.body.cart).toEqual([`item${index}`, 'after'])
      }
      // Sentinel promotes the replica; the node answers again through it (a frozen master is still frozen).
      const deadline = Date.now() + 20_000
      while (!shop.sessions.health().nodes.find((node) => node.id === 's1')?.alive && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 200))
      }
      expect(shop.sessions.health().nodes.find((node) => node.id === 's1')?.alive).toBe(true)
      const fresh = Array.from({ length: 4 }, () => new Browser())
      for (const browser of fresh) await browser.send(shop, 'POST', '/cart/new')
      const onSentinel = fresh.filter((b) => parseSessionId(b.sessionId)?.nodeId === 's1')
      expect(onSentinel.length).toBeGreaterThan(0)
      for (const browser of onSentinel)
        expect((await browser.send(shop, 'GET', '/cart')).body.cart).toEqual(['new'])
    } finally {
      await shop.close()
    }
  }, 60_000)
})

describe('a password-protected Redis node', () => {
  afterEach(() => stopAllServers())

  it('works with the credentials in its URL, and counts as down (not as failing requests) without them', async () => {
    const redis = await startRedis(['--requirepass', 's3cr@t!'])
    const memcached = await startMemcached()
    const password = encodeURIComponent('s3cr@t!')
    const good = await startShop(express, {
      secret: 'auth',
      nodes: `r1:redis://:${password}@127.0.0.1:${redis.port} m1:127.0.0.1:${memcached.port}`,
    })
    const bad = await startShop(express, {
      secret: 'auth',
      nodes: `r1:redis://:wrong@127.0.0.1:${redis.port} m1:127.0.0.1:${memcached.port}`,
      operationTimeout: 500,
    })
    try {
      const onRedis = new Browser()
      await onRedis.send(good, 'POST', '/cart/apple')
      expect(parseSessionId(onRedis.sessionId)?.nodeId).toBe('r1')
      expect((await onRedis.send(good, 'GET', '/cart')).body.cart).toEqual(['apple'])
      expect(JSON.stringify(good.sessions.health())).not.toContain('s3cr')

      for (let i = 0; i < 2; i++) {
        const visitor = new Browser()
        const reply = await visitor.send(bad, 'POST', '/cart/pear')
        expect(reply.status).toBe(200)
        expect(parseSessionId(visitor.sessionId)?.nodeId).toBe('m1')
      }
      const r1 = bad.sessions.health().nodes.find((node) => node.id === 'r1')
      expect(r1?.alive).toBe(false)
      // Why it is down, not only that it timed out: ioredis reports a refused password as an event.
      expect(r1?.lastError).toMatch(/WRONGPASS|NOAUTH/)
      expect(JSON.stringify(r1)).not.toContain('wrong')
    } finally {
      await good.close()
      await bad.close()
    }
  })
})
