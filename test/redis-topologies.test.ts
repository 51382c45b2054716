import express from 'express'
import { afterEach, describe, expect, it } from 'vitest'
import { parseSessionId } from '../src/index.js'
import { Browser, startShop } from './support/app.js'
import { stopAllServers } from './support/backends.js'
import { startMemcached } from './support/memcached.js'
import { startRedis, startRedisCluster, startRedisSentinel } from './support/redis.js'

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
      // on m1 now, and c1 counts as dead.
      await new Promise((resolve) => setTimeout(resolve, 2000))
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

describe('a Sentinel-managed Redis master as one node', () => {
  afterEach(() => stopAllServers())

  it('holds sessions, keeps them through a master failure, and is used again once Sentinel has promoted the replica', async () => {
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

      await master.kill()
      for (const [index, browser] of browsers.entries()) {
        const reply = await browser.send(shop, 'POST', '/cart/after')
        expect(reply.status).toBe(200)
        expect(reply.body.cart).toEqual([`item${index}`, 'after'])
      }
      // Sentinel promotes the replica; the node answers again through it.
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
      expect(JSON.stringify(r1)).not.toContain('wrong')
    } finally {
      await good.close()
      await bad.close()
    }
  })
})
