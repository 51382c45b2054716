import express from 'express'
import { Registry } from 'prom-client'
import { afterEach, describe, expect, it } from 'vitest'
import { storageKeys } from '../src/core/keys.js'
import type { SessionEventName, SessionEvents } from '../src/core/metrics.js'
import { ConfigError } from '../src/errors.js'
import { type Logger, parseSessionId, type SessionFailoverOptions } from '../src/index.js'
import { registerSessionMetrics } from '../src/prometheus.js'
import { Browser, hangingRequest, pauseBeforeModify, type ShopApp, startShop } from './support/app.js'
import { startFastifyShop } from './support/fastify-app.js'
import { startAppProcess, stopAllAppProcesses } from './support/instance.js'
import { type MemcachedServer, nodesOption, startCluster, stopAllMemcached } from './support/memcached.js'
import { startProxy } from './support/proxy.js'
import { recordsOf } from './support/records.js'
import { until } from './support/until.js'

const SECRET = 'operability'
let servers: MemcachedServer[] = []
const shops: ShopApp[] = []

afterEach(async () => {
  for (const shop of shops.splice(0)) await shop.close()
  await stopAllAppProcesses()
  await stopAllMemcached()
})

async function shop(options: Partial<SessionFailoverOptions> = {}): Promise<ShopApp> {
  const app = await startShop(express, { secret: SECRET, nodes: nodesOption(servers), ...options })
  shops.push(app)
  return app
}

/** Every event of every kind, in order. */
function recordEvents(app: ShopApp) {
  const seen: { name: SessionEventName; payload: SessionEvents[SessionEventName] }[] = []
  const names: SessionEventName[] = [
    'nodeDown',
    'nodeUp',
    'relocated',
    'takeover',
    'backupFailed',
    'lockTimeout',
    'corruptSession',
  ]
  for (const name of names) app.sessions.on(name, (payload) => seen.push({ name, payload }))
  return {
    named: <K extends SessionEventName>(name: K) =>
      seen.filter((event) => event.name === name).map((event) => event.payload as SessionEvents[K]),
    all: seen,
  }
}

/** A pino-compatible logger that keeps what it is given. */
function capturingLogger() {
  const lines: { level: string; message: string; fields: Record<string, unknown> }[] = []
  const at =
    (level: string) =>
    (fields: unknown, message?: string): void => {
      lines.push({ level, message: message ?? '', fields: fields as Record<string, unknown> })
    }
  const logger: Logger = { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') }
  return { logger, warnings: () => lines.filter((line) => line.level === 'warn').map((line) => line.message) }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

const serverOf = (id: string | undefined) =>
  servers[Number(parseSessionId(id)?.nodeId.slice(1)) - 1] as MemcachedServer

describe('stats()', () => {
  it('counts requests with and without a session, writes of each copy, skipped writes and latencies', async () => {
    servers = await startCluster(2)
    const app = await shop({ lockingMode: 'none' })
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    await browser.send(app, 'GET', '/cart')
    await browser.send(app, 'GET', '/cart')
    const stats = app.sessions.stats()
    expect(stats).toMatchObject({
      requestsWithoutSession: 1,
      requestsWithSession: 2,
      writesSkipped: 2,
      primaryWrites: 1,
      backupWrites: 1,
      primaryWriteFailures: 0,
      backupWriteFailures: 0,
      relocations: 0,
    })
    expect(stats.latency.load.count).toBe(2)
    expect(stats.latency.save.count).toBe(1)
    expect(stats.latency.serialize.count).toBe(3)
    expect(stats.latency.save.p99).toBeGreaterThan(0)
    expect(stats.latency.save.p50).toBeLessThanOrEqual(stats.latency.save.p99)
    expect(stats.nodes.map((node) => node.id)).toEqual(['n1', 'n2'])
    expect(stats.nodes.reduce((sum, node) => sum + node.ops, 0)).toBeGreaterThanOrEqual(4)
  })

  it('counts a restore from the backup when the primary restarted empty, under the same id', async () => {
    servers = await startCluster(2)
    const app = await shop()
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const id = browser.sessionId
    await serverOf(id).restart()
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['apple'])
    expect(browser.sessionId).toBe(id)
    expect(app.sessions.stats()).toMatchObject({ restores: 1, relocations: 0 })
  })
})

describe('events and warnings', () => {
  it('a node kill moves nodeDown and relocated exactly once, and its return moves nodeUp', async () => {
    servers = await startCluster(3)
    const { logger, warnings } = capturingLogger()
    const app = await shop({ nodeProbeInterval: 100, logger })
    const events = recordEvents(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const before = parseSessionId(browser.sessionId)
    const primary = serverOf(browser.sessionId)
    await primary.kill()
    expect((await browser.send(app, 'POST', '/cart/pear')).body.cart).toEqual(['apple', 'pear'])
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['apple', 'pear'])

    const moved = parseSessionId(browser.sessionId)
    expect(moved?.nodeId).not.toBe(before?.nodeId)
    expect(events.named('nodeDown')).toEqual([
      { node: before?.nodeId, address: `memcached 127.0.0.1:${primary.port}`, error: expect.any(String) },
    ])
    const relocated = events.named('relocated')
    expect(relocated).toEqual([
      { session: expect.stringMatching(/^[\w-]{12}$/), from: before?.nodeId, to: moved?.nodeId },
    ])
    expect(browser.cookie).not.toContain(relocated[0]?.session)
    expect(app.sessions.stats()).toMatchObject({ relocations: 1 })
    expect(app.sessions.stats().nodes.find((node) => node.id === before?.nodeId)).toMatchObject({
      alive: false,
      deadSince: expect.any(Number),
      errors: expect.any(Number),
    })
    expect(warnings()).toContain('session-failover: node marked dead')

    await primary.restart()
    await until(() => events.named('nodeUp').length === 1)
    expect(events.named('nodeUp')[0]).toMatchObject({ node: before?.nodeId, downForMs: expect.any(Number) })
    expect(app.sessions.health().nodes.every((node) => node.alive)).toBe(true)
    expect(events.named('nodeDown')).toHaveLength(1)
  })

  it('emits backupFailed, with a warning, when no node takes the backup copy', async () => {
    servers = await startCluster(2)
    const { logger, warnings } = capturingLogger()
    const app = await shop({ logger })
    const events = recordEvents(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const primary = parseSessionId(browser.sessionId)?.nodeId
    const other = servers.find((server) => server !== serverOf(browser.sessionId)) as MemcachedServer
    await other.kill()
    expect((await browser.send(app, 'POST', '/cart/pear')).status).toBe(200)
    expect(events.named('backupFailed')).toEqual([{ session: expect.any(String), primary }])
    expect(app.sessions.stats().backupWriteFailures).toBe(1)
    expect(warnings()).toContain('session-failover: no alive node took the backup copy')
  })

  it('emits lockTimeout, with a warning, and counts lock waits', async () => {
    servers = await startCluster(2)
    const { logger, warnings } = capturingLogger()
    const app = await shop({ lockingMode: 'all', lockTimeout: 300, logger })
    const events = recordEvents(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/count')
    await Promise.all([browser.send(app, 'POST', '/count/slow'), browser.send(app, 'POST', '/count/slow')])
    expect(app.sessions.stats().lockWaits).toBeGreaterThanOrEqual(1)

    const hanging = hangingRequest(app, browser.cookie)
    await hanging.reached()
    expect((await browser.send(app, 'POST', '/count')).status).toBe(503)
    hanging.abort()
    await hanging.done
    expect(events.named('lockTimeout')).toEqual([{ session: expect.any(String), path: '/count' }])
    expect(app.sessions.stats().lockTimeouts).toBe(1)
    expect(warnings()).toContain('session-failover: session lock timed out')
  })

  it('emits corruptSession for a copy that fails its check', async () => {
    servers = await startCluster(2)
    const app = await shop()
    const events = recordEvents(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const keys = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
    await serverOf(browser.sessionId).put(keys.primary, Buffer.from('garbage'))
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['apple'])
    expect(events.named('corruptSession')).toEqual([
      {
        session: expect.any(String),
        node: parseSessionId(browser.sessionId)?.nodeId,
        reason: expect.any(String),
      },
    ])
  })

  it('emits takeover when a sticky instance serves a session another instance owned', async () => {
    servers = await startCluster(2)
    const a = await shop({ sticky: true, route: 'a' })
    const b = await shop({ sticky: true, route: 'b' })
    const events = recordEvents(b)
    const browser = new Browser()
    await browser.send(a, 'POST', '/cart/apple')
    expect((await browser.send(b, 'GET', '/cart')).body.cart).toEqual(['apple'])
    expect(events.named('takeover')).toEqual([{ session: expect.any(String), fromRoute: 'a', toRoute: 'b' }])
    expect(b.sessions.stats().takeovers).toBe(1)
    expect(parseSessionId(browser.sessionId)?.route).toBe('b')
  })

  it('keeps a listener that throws, or rejects, from breaking the request or silencing the others', async () => {
    servers = await startCluster(2)
    const { logger } = capturingLogger()
    const app = await shop({ logger })
    app.sessions.on('corruptSession', () => {
      throw new Error('listener bug')
    })
    app.sessions.on('corruptSession', async () => {
      throw new Error('async listener bug')
    })
    const events = recordEvents(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const keys = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
    await serverOf(browser.sessionId).put(keys.primary, Buffer.from('garbage'))
    expect((await browser.send(app, 'GET', '/cart')).status).toBe(200)
    expect(events.named('corruptSession')).toHaveLength(1)
    await sleep(20) // the rejection is handled, not left to crash the process
  })

  it('takes more than ten listeners of one event without a memory-leak warning, and calls each', async () => {
    servers = await startCluster(2)
    const app = await shop()
    const warnings: string[] = []
    const onWarning = (warning: Error) => warnings.push(warning.name)
    process.on('warning', onWarning)
    try {
      let calls = 0
      for (let i = 0; i < 12; i++) app.sessions.on('corruptSession', () => void calls++)
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/apple')
      const keys = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
      await serverOf(browser.sessionId).put(keys.primary, Buffer.from('garbage'))
      await browser.send(app, 'GET', '/cart')
      expect(calls).toBe(12)
      await sleep(20) // warnings are emitted on the next tick
      expect(warnings).not.toContain('MaxListenersExceededWarning')
    } finally {
      process.off('warning', onWarning)
    }
  })

  it('counts a relocation once however many parallel requests of the session fail over together', async () => {
    servers = await startCluster(3)
    const app = await shop({ lockingMode: 'none' })
    const events = recordEvents(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    await serverOf(browser.sessionId).kill()
    const cookie = browser.cookie
    const replies = await Promise.all(
      Array.from({ length: 5 }, () => {
        const parallel = new Browser()
        parallel.cookie = cookie
        return parallel.send(app, 'GET', '/cart')
      }),
    )
    for (const reply of replies) expect(reply.body.cart).toEqual(['apple'])
    expect(app.sessions.stats().relocations).toBe(1)
    expect(events.named('relocated')).toHaveLength(1)
  })

  it('counts writesSkipped once per request, and not for a request that wrote with save()', async () => {
    servers = await startCluster(2)
    const app = await shop({ lockingMode: 'none' })
    const browser = new Browser()
    await browser.send(app, 'POST', '/save-twice/apple')
    await browser.send(app, 'POST', '/stream/pear')
    expect(app.sessions.stats().writesSkipped).toBe(0)
    await browser.send(app, 'GET', '/cart')
    expect(app.sessions.stats().writesSkipped).toBe(1)
  })
})

describe('health()', () => {
  it('is not ready once closed', async () => {
    servers = await startCluster(2)
    const app = await startShop(express, { secret: SECRET, nodes: nodesOption(servers) })
    expect(app.sessions.health().ready).toBe(true)
    await app.close()
    expect(app.sessions.health().ready).toBe(false)
  })

  it('refuses a bad close() timeout without closing anything, and a second close() waits for the first', async () => {
    servers = await startCluster(2)
    const app = await shop()
    for (const timeout of [-1, Number.POSITIVE_INFINITY]) {
      await expect(app.sessions.close({ timeout })).rejects.toBeInstanceOf(ConfigError)
    }
    // Still open: a refused close() must not leave the middleware answering 503 with its nodes connected.
    expect(app.sessions.health().ready).toBe(true)
    expect((await new Browser().send(app, 'POST', '/cart/apple')).status).toBe(200)

    // A request in flight when close() is called: its handler has run, and goes on 400 ms later. Whether it was
    // let go is known here, on the server's side; when its client reads the answer is not.
    const paused = pauseBeforeModify(app)
    const slow = fetch(`${app.url}/slow/late`, { method: 'POST' })
    await paused.reached
    let released = false
    setTimeout(() => {
      released = true
      paused.release()
    }, 400)
    void app.sessions.close()
    // A second shutdown path (SIGINT after SIGTERM, the app and a library) resolves with the first close only,
    // which waits for the request in flight.
    await app.sessions.close()
    expect(released).toBe(true)
    expect((await slow).status).toBe(200)
  })

  it.each([
    { killed: 1, ready: true },
    { killed: 2, ready: false },
  ])('finds a node that cannot be reached before any request came (killed: $killed)', async ({
    killed,
    ready,
  }) => {
    servers = await startCluster(2)
    await Promise.all(servers.slice(0, killed).map((server) => server.kill()))
    const app = await shop({ operationTimeout: 200 })
    // Nothing sent yet: alive as far as anyone knows. The call asks them, so a readiness check tells soon.
    expect(app.sessions.health().nodes.map((node) => node.alive)).toEqual([true, true])
    await until(() => app.sessions.health().nodes.filter((node) => !node.alive).length === killed)
    expect(app.sessions.health()).toMatchObject({ ready, nodes: [{ alive: false, ops: 1 }, { ops: 1 }] })
    expect(app.sessions.health().nodes[0]?.lastError).toMatch(/ECONNREFUSED|connect/i)
  })

  it('is ready while a node is alive, and not ready once none is', async () => {
    servers = await startCluster(2)
    const app = await shop()
    expect(app.sessions.health()).toMatchObject({ ready: true, nodes: [{ id: 'n1' }, { id: 'n2' }] })
    await Promise.all(servers.map((server) => server.kill()))
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    expect(app.sessions.health()).toMatchObject({ ready: false, nodes: [{ alive: false }, { alive: false }] })
  })
})

/** The Prometheus text format: every sample line parsed into name, labels and value; throws on anything else. */
function parseExposition(text: string): Map<string, number> {
  const samples = new Map<string, number>()
  for (const line of text.split('\n')) {
    if (line === '' || /^# (HELP|TYPE) [a-zA-Z_:][\w:]* /.test(line)) continue
    const match =
      /^([a-zA-Z_:][\w:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? (-?[\d.]+(?:e[+-]?\d+)?|NaN|[+-]Inf)$/.exec(
        line,
      )
    if (!match) throw new Error(`not Prometheus text format: ${line}`)
    samples.set(`${match[1]}${match[2] ?? ''}`, Number(match[3]))
  }
  return samples
}

describe('Prometheus metrics', () => {
  it('registers conventional names whose values follow stats(), in text that parses', async () => {
    servers = await startCluster(3)
    const app = await shop({ nodeProbeInterval: 60_000 })
    const registry = new Registry()
    const unregister = registerSessionMetrics(app.sessions, { registry })
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const dead = parseSessionId(browser.sessionId)?.nodeId
    await serverOf(browser.sessionId).kill()
    await browser.send(app, 'GET', '/cart')

    const samples = parseExposition(await registry.metrics())
    const stats = app.sessions.stats()
    expect(samples.get('session_failover_relocations_total')).toBe(1)
    expect(samples.get('session_failover_requests_total{session="new"}')).toBe(stats.requestsWithoutSession)
    expect(samples.get('session_failover_requests_total{session="found"}')).toBe(stats.requestsWithSession)
    expect(samples.get('session_failover_writes_total{copy="primary"}')).toBe(stats.primaryWrites)
    expect(samples.get(`session_failover_node_up{node="${dead}"}`)).toBe(0)
    expect(samples.get(`session_failover_node_errors_total{node="${dead}"}`)).toBeGreaterThan(0)
    expect(samples.get('session_failover_load_duration_seconds_count')).toBe(stats.latency.load.count)
    expect(samples.get('session_failover_save_duration_seconds_bucket{le="+Inf"}')).toBe(
      stats.latency.save.count,
    )
    // Counters keep counting between scrapes.
    await browser.send(app, 'POST', '/cart/pear')
    expect(
      parseExposition(await registry.metrics()).get('session_failover_writes_total{copy="primary"}'),
    ).toBe(stats.primaryWrites + 1)
    // A second middleware on the same registry needs its own prefix; a clash registers nothing.
    const other = await shop()
    expect(() => registerSessionMetrics(other.sessions, { registry })).toThrow(/give each middleware its own/)
    registerSessionMetrics(other.sessions, { registry, prefix: 'other_sessions_' })
    unregister()
    expect(await registry.metrics()).not.toContain('session_failover_')
    expect(await registry.metrics()).toContain('other_sessions_requests_total')
  })

  it('unregisters only what one call registered, once, and refuses a prefix Prometheus cannot take', async () => {
    servers = await startCluster(2)
    const app = await shop()
    const registry = new Registry()
    const first = registerSessionMetrics(app.sessions, { registry })
    first()
    registerSessionMetrics(app.sessions, { registry })
    const registered = (await registry.getMetricsAsJSON()).length
    expect(registered).toBeGreaterThan(0)
    // Called again (two shutdown paths), the first one's function must not remove the second's metrics.
    first()
    expect((await registry.getMetricsAsJSON()).length).toBe(registered)
    expect(() => registerSessionMetrics(app.sessions, { registry, prefix: '9 sessions' })).toThrow(
      ConfigError,
    )
  })

  it('takes a Fastify app the same way', async () => {
    servers = await startCluster(2)
    const app = await startFastifyShop({ secret: SECRET, nodes: nodesOption(servers) })
    shops.push(app)
    const registry = new Registry()
    registerSessionMetrics(app.sessions, { registry, prefix: 'shop_sessions_' })
    await new Browser().send(app, 'POST', '/cart/apple')
    const samples = parseExposition(await registry.metrics())
    expect(samples.get('shop_sessions_requests_total{session="new"}')).toBe(1)
  })
})

describe('setNodes()', () => {
  it('adds and removes nodes live: sessions on a removed node move, with their carts, as they are used', async () => {
    servers = await startCluster(3)
    const [one, two, three] = servers as [MemcachedServer, MemcachedServer, MemcachedServer]
    const app = await shop({ nodes: nodesOption([one, two]) })
    const browsers = Array.from({ length: 6 }, () => new Browser())
    for (const [index, browser] of browsers.entries()) await browser.send(app, 'POST', `/cart/item${index}`)
    const onFirst = browsers.filter((browser) => parseSessionId(browser.sessionId)?.nodeId === 'n1')
    expect(onFirst.length).toBeGreaterThan(0)

    app.sessions.setNodes(`n2:127.0.0.1:${two.port} n3:127.0.0.1:${three.port}`)
    expect(app.sessions.health().nodes.map((node) => node.id)).toEqual(['n2', 'n3'])
    for (const [index, browser] of browsers.entries()) {
      expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual([`item${index}`])
      expect(parseSessionId(browser.sessionId)?.nodeId).not.toBe('n1')
    }
    // New sessions land on the new set only, and use the added node.
    const fresh = Array.from({ length: 4 }, () => new Browser())
    for (const browser of fresh) await browser.send(app, 'POST', '/cart/new')
    const nodes = new Set(fresh.map((browser) => parseSessionId(browser.sessionId)?.nodeId))
    expect(nodes).toEqual(new Set(['n2', 'n3']))
    // The removed node is no longer used at all: killing it changes nothing.
    await one.kill()
    for (const [index, browser] of browsers.entries()) {
      expect((await browser.send(app, 'POST', '/cart/more')).body.cart).toEqual([`item${index}`, 'more'])
    }
    expect(app.sessions.stats().nodes.every((node) => node.alive)).toBe(true)
  })

  it('stores on the node left a write that was in flight on the node removed (frozen) meanwhile', async () => {
    servers = await startCluster(2)
    const [one, two] = servers as [MemcachedServer, MemcachedServer]
    const app = await shop({ operationTimeout: 3000 })
    await one.freeze()
    try {
      // New sessions go to both nodes in turn: half of these write to the frozen one first.
      const browsers = Array.from({ length: 4 }, () => new Browser())
      const writes = browsers.map((browser, index) => browser.send(app, 'POST', `/cart/item${index}`))
      // Once writes wait on the frozen node (long before they would time out), it is removed.
      const sentToOne = () => app.sessions.health().nodes.find((node) => node.id === 'n1')?.ops ?? 0
      await until(() => sentToOne() >= 2, 2000)
      app.sessions.setNodes(`n2:127.0.0.1:${two.port}`)
      const answers = await Promise.all(writes)
      expect(answers.map((answer) => answer.status)).toEqual([200, 200, 200, 200])
      expect(app.sessions.stats().primaryWriteFailures).toBeGreaterThan(0)
      for (const [index, browser] of browsers.entries()) {
        expect(parseSessionId(browser.sessionId)?.nodeId).toBe('n2')
        expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual([`item${index}`])
      }
    } finally {
      one.thaw()
    }
  })

  it('refuses a node that keeps its id but changes its address, a removed id added back, and a malformed list', async () => {
    servers = await startCluster(2)
    const app = await shop()
    expect(() => app.sessions.setNodes(`n1:127.0.0.1:1 n2:127.0.0.1:${servers[1]?.port}`)).toThrow(
      ConfigError,
    )
    expect(() => app.sessions.setNodes('nonsense')).toThrow(/Expected each entry of `nodes`/)
    expect(app.sessions.health().nodes.map((node) => node.id)).toEqual(['n1', 'n2'])
    app.sessions.setNodes(`n2:127.0.0.1:${servers[1]?.port}`)
    expect(() => app.sessions.setNodes(nodesOption(servers))).toThrow(
      /a node added back after removal, got 'n1'/,
    )
  })

  it('lets an instance started with the new list serve sessions of a node removed before it started', async () => {
    servers = await startCluster(3)
    const [one, two, three] = servers as [MemcachedServer, MemcachedServer, MemcachedServer]
    const before = await shop({ nodes: nodesOption([one, two]) })
    const browsers = Array.from({ length: 4 }, () => new Browser())
    for (const [index, browser] of browsers.entries())
      await browser.send(before, 'POST', `/cart/item${index}`)
    expect(browsers.some((browser) => parseSessionId(browser.sessionId)?.nodeId === 'n1')).toBe(true)
    const after = await shop({ nodes: `n2:127.0.0.1:${two.port} n3:127.0.0.1:${three.port}` })
    await one.kill()
    for (const [index, browser] of browsers.entries()) {
      expect((await browser.send(after, 'GET', '/cart')).body.cart).toEqual([`item${index}`])
      expect(['n2', 'n3']).toContain(parseSessionId(browser.sessionId)?.nodeId)
    }
  })
})

describe('graceful shutdown', () => {
  it.each([
    ['non-sticky', {}],
    ['sticky with asynchronous backups', { sticky: true, route: 'a', backupAsync: true }],
  ] as const)('keeps every acknowledged write when SIGTERM comes mid-traffic (%s)', async (_name, mode) => {
    servers = await startCluster(2)
    const app = await startAppProcess(
      { secret: SECRET, nodes: nodesOption(servers), ...mode },
      { ownSigtermHandler: true },
    )
    const browsers = Array.from({ length: 8 }, () => new Browser())
    const acknowledged = new Map<Browser, string[]>()
    let stop = false
    const traffic = browsers.map(async (browser, index) => {
      for (let n = 0; !stop && n < 500; n++) {
        try {
          const reply = await browser.send(app, 'POST', `/cart/b${index}i${n}`)
          if (reply.status === 200) acknowledged.set(browser, reply.body.cart as string[])
        } catch {
          return // the server is gone
        }
      }
    })
    await sleep(400)
    // Mid-traffic, and only once every browser has had a write acknowledged.
    await until(() => acknowledged.size === browsers.length, 10_000)
    const exit = app.terminate()
    expect(await exit).toBe(0)
    stop = true
    await Promise.all(traffic)

    const records = recordsOf(SECRET)
    for (const browser of browsers) {
      const cart = acknowledged.get(browser) ?? []
      expect(cart.length).toBeGreaterThan(0)
      const keys = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
      const copies: string[][] = []
      for (const server of servers) {
        for (const key of [keys.primary, keys.backup]) {
          const raw = await server.get(key)
          if (raw) copies.push(records.dataOf<{ cart: string[] }>(browser.sessionId, raw).cart)
        }
      }
      expect(copies).toHaveLength(2)
      // A write the server finished but whose answer was cut off may be stored too; an acknowledged one must be.
      for (const copy of copies) expect(copy.slice(0, cart.length)).toEqual(cart)
    }
  })

  it('lets a request in flight finish and store its change before closing', async () => {
    servers = await startCluster(2)
    const app = await startShop(express, {
      secret: SECRET,
      nodes: nodesOption(servers),
      sticky: true,
      route: 'a',
    })
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const paused = pauseBeforeModify(app)
    const slow = browser.send(app, 'POST', '/slow/pear')
    await paused.reached // its session loaded, the request still running
    setTimeout(paused.release, 200)
    const closing = app.sessions.close()
    const reply = await slow
    await closing
    expect(reply.status).toBe(200)
    const keys = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
    const records = recordsOf(SECRET)
    let copies = 0
    for (const server of servers) {
      for (const key of [keys.primary, keys.backup]) {
        const raw = await server.get(key)
        if (!raw) continue
        copies++
        expect(records.dataOf<{ cart: string[] }>(browser.sessionId, raw).cart).toEqual(['apple', 'pear'])
      }
    }
    expect(copies).toBe(2)
    expect((await browser.send(app, 'GET', '/cart')).status).toBe(503)
    app.server.closeAllConnections()
    await new Promise<void>((resolve) => app.server.close(() => resolve()))
  })

  it("does a destroy's repeated delete before it ends, for a copy written under the destroyed id", async () => {
    servers = await startCluster(2)
    const app = await shop({ operationTimeout: 200 })
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const keys = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
    const backupServer = servers.find((server) => server !== serverOf(browser.sessionId)) as MemcachedServer
    expect((await browser.send(app, 'POST', '/logout')).status).toBe(200)
    // A write of the session already under way elsewhere, whose backup lands after the logout's deletes.
    await backupServer.put(keys.backup, Buffer.from('a late backup'))
    await app.sessions.close()
    expect(await backupServer.has(keys.backup)).toBe(false)
  })

  it.each([
    { back: true, left: false },
    { back: false, left: true },
  ])('tries the deletes it owes a node that was down once more (node back: $back), and warns of any left', async ({
    back,
    left,
  }) => {
    servers = await startCluster(2)
    const proxies = await Promise.all(servers.map((server) => startProxy(server.port)))
    const { logger, warnings } = capturingLogger()
    try {
      const app = await shop({
        nodes: proxies.map((proxy, index) => `n${index + 1}:127.0.0.1:${proxy.port}`).join(' '),
        operationTimeout: 200,
        nodeProbeInterval: 60_000, // no probe finds the node back before close()
        logger,
      })
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/apple')
      const keys = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
      const backupIndex = servers.findIndex((server) => server !== serverOf(browser.sessionId))
      proxies[backupIndex]?.cut()
      expect((await browser.send(app, 'POST', '/logout')).status).toBe(200)
      expect(await servers[backupIndex]?.has(keys.backup)).toBe(true)
      if (back) proxies[backupIndex]?.restore()
      await app.sessions.close({ timeout: 1000 })
      expect(await servers[backupIndex]?.has(keys.backup)).toBe(left)
      const warned = warnings().filter((message) => message.includes('closed owing deletes'))
      expect(warned).toHaveLength(left ? 1 : 0)
    } finally {
      await Promise.all(proxies.map((proxy) => proxy.close()))
    }
  })

  it('releases the locks requests still hold when closed', async () => {
    servers = await startCluster(2)
    const app = await startShop(express, { secret: SECRET, nodes: nodesOption(servers), lockingMode: 'all' })
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/apple')
    const keys = storageKeys('sf:', parseSessionId(browser.sessionId)?.random ?? '')
    const hanging = hangingRequest(app, browser.cookie)
    await until(() => serverOf(browser.sessionId).has(keys.lock))
    await app.sessions.close({ timeout: 100 })
    expect(await serverOf(browser.sessionId).has(keys.lock)).toBe(false)
    hanging.abort()
    await hanging.done
    app.server.closeAllConnections()
    await new Promise<void>((resolve) => app.server.close(() => resolve()))
  })
})
