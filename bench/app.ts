// One benchmark app, as its own process so the load generator does not share its event loop. The session layer
// comes from BENCH_LAYER; nodes from BENCH_MEMCACHED (two addresses) and BENCH_REDIS. Prints `LISTENING <port>`.
//   GET  /read   reads the session (count and payload), changes nothing
//   POST /write  increments the session's count
//   POST /init   starts a session holding BENCH_SESSION_BYTES of payload
import type { AddressInfo } from 'node:net'
import fastifyCookie from '@fastify/cookie'
import fastifySession from '@fastify/session'
import connectMemcached from 'connect-memcached'
import RedisStore from 'connect-redis'
import express from 'express'
import expressSession from 'express-session'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import type { LockingMode } from '../src/index.js'
import { LAYERS, type Layer } from './layers.js'

// The built package, as users run it (bench/run.ts builds it first); typed by the sources it is built from.
const dist = (name: string) => new URL(`../dist/${name}`, import.meta.url).href
const { sessionFailover } = (await import(dist('index.js'))) as typeof import('../src/index.js')
const { fastifySessionFailover } = (await import(dist('fastify.js'))) as typeof import('../src/fastify.js')

const SECRET = 'benchmark secret, long enough for anything'

interface Session {
  count?: number
  payload?: string
}

async function expressApp(layer: Layer, memcached: string[], redisUrl: string, payload: string) {
  const app = express()
  app.disable('x-powered-by')
  const common = { secret: SECRET, resave: false, saveUninitialized: false }
  if (layer === 'express-session/memory') {
    app.use(expressSession(common))
  } else if (layer === 'connect-memcached') {
    const MemcachedStore = connectMemcached(expressSession)
    app.use(expressSession({ ...common, store: new MemcachedStore({ hosts: [memcached[0] as string] }) }))
  } else if (layer === 'connect-redis') {
    app.use(expressSession({ ...common, store: new RedisStore({ client: new Redis(redisUrl) }) }))
  } else {
    const mode = layer.slice('session-failover/'.length)
    const nodes = memcached.map((address, index) => `n${index + 1}:${address}`).join(' ')
    app.use(
      sessionFailover(
        mode === 'sticky'
          ? { secret: SECRET, nodes, sticky: true, route: 'bench' }
          : { secret: SECRET, nodes, lockingMode: mode as LockingMode },
      ),
    )
  }
  app.post('/init', (req, res) => {
    const session = req.session as unknown as Session
    session.count = 0
    session.payload = payload
    res.json({ ok: true })
  })
  app.get('/read', (req, res) => {
    const session = req.session as unknown as Session
    res.json({ count: session.count ?? 0, bytes: session.payload?.length ?? 0 })
  })
  app.post('/write', (req, res) => {
    const session = req.session as unknown as Session
    session.count = (session.count ?? 0) + 1
    res.json({ count: session.count })
  })
  return new Promise<number>((resolve) => {
    const server = app.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port))
  })
}

async function fastifyApp(layer: Layer, memcached: string[], payload: string) {
  const app = Fastify()
  if (layer === 'fastify/@fastify/session-memory') {
    await app.register(fastifyCookie)
    await app.register(fastifySession, {
      secret: SECRET,
      saveUninitialized: false,
      cookie: { secure: false },
    })
  } else {
    const nodes = memcached.map((address, index) => `n${index + 1}:${address}`).join(' ')
    await app.register(fastifySessionFailover, { secret: SECRET, nodes })
  }
  const session = (request: { session: unknown }) =>
    request.session as { get(k: string): unknown; set(k: string, v: unknown): void }
  app.post('/init', async (request) => {
    session(request).set('count', 0)
    session(request).set('payload', payload)
    return { ok: true }
  })
  app.get('/read', async (request) => ({
    count: session(request).get('count') ?? 0,
    bytes: (session(request).get('payload') as string | undefined)?.length ?? 0,
  }))
  app.post('/write', async (request) => {
    const count = ((session(request).get('count') as number | undefined) ?? 0) + 1
    session(request).set('count', count)
    return { count }
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return (app.server.address() as AddressInfo).port
}

const layer = process.env.BENCH_LAYER as Layer
if (!LAYERS.includes(layer)) throw new Error(`BENCH_LAYER must be one of ${LAYERS.join(', ')}`)
const memcached = (process.env.BENCH_MEMCACHED ?? '').split(' ').filter(Boolean)
const payload = 'x'.repeat(Number(process.env.BENCH_SESSION_BYTES ?? 150))
const port = layer.startsWith('fastify/')
  ? await fastifyApp(layer, memcached, payload)
  : await expressApp(layer, memcached, process.env.BENCH_REDIS ?? '', payload)
process.stdout.write(`LISTENING ${port}\n`)
// An orderly exit on SIGINT, so `node --cpu-prof` writes its profile.
process.once('SIGINT', () => process.exit(0))
