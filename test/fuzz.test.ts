import { connect, Socket } from 'node:net'
import { sign } from 'cookie-signature'
import express from 'express'
import fc from 'fast-check'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { CookieVerifier, verifiedId } from '../src/core/cookie-value.js'
import { readSessionId } from '../src/express/cookies.js'
import { parseSessionId } from '../src/index.js'
import { sessionCookieHeader } from '../src/session-cookie.js'
import { type ShopApp, startShop } from './support/app.js'
import { startFastifyShop } from './support/fastify-app.js'
import { type MemcachedServer, nodesOption, startCluster, stopAllMemcached } from './support/memcached.js'

const SECRET = 'fuzz-secret'
const COOKIES = 10_000
const CONCURRENCY = 24

const random24 = fc.stringMatching(/^[A-Za-z0-9_-]{24}$/)
const anyText = fc.string({ unit: 'binary', maxLength: 300 })
const signed = (id: string) => `s:${sign(id, SECRET)}`
/** The characters of a signed cookie value's id and signature. */
const BASE64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'

/** Cookie headers an attacker or a broken client might send. */
const cookieHeader: fc.Arbitrary<string> = fc.oneof(
  // Anything at all, control characters and non-ASCII included.
  anyText,
  anyText.map((text) => `connect.sid=${text}`),
  // Well-formed ids, badly signed.
  fc
    .tuple(random24, fc.constantFrom('n1', 'n2'), fc.base64String({ minLength: 1, maxLength: 60 }))
    .map(([random, node, signature]) => `connect.sid=s%3A${random}-${node}.${encodeURIComponent(signature)}`),
  // Validly signed ids that name no configured node, or an address.
  fc
    .tuple(
      random24,
      fc.oneof(anyText, fc.constantFrom('127.0.0.1:6379', 'evil', '..', 'n1:22', 'localhost', 'n3')),
    )
    .map(([random, node]) => `connect.sid=${encodeURIComponent(signed(`${random}-${node}`))}`),
  // Validly signed, well-formed, never issued: a real lookup, then the negative cache.
  fc
    .tuple(random24, fc.constantFrom('n1', 'n2'), fc.option(fc.stringMatching(/^[A-Za-z0-9_]{1,32}$/)))
    .map(
      ([random, node, route]) =>
        `connect.sid=${encodeURIComponent(signed(`${random}-${node}${route ? `.${route}` : ''}`))}`,
    ),
  // Validly signed garbage.
  anyText.map((text) => `connect.sid=${encodeURIComponent(signed(text))}`),
  // Huge values, within and past Node's header limit.
  fc.integer({ min: 1_000, max: 20_000 }).map((size) => `connect.sid=s%3A${'A'.repeat(size)}`),
  // Broken encodings, duplicates, quoting, prototype names.
  fc.constantFrom(
    'connect.sid=%',
    'connect.sid=%E0%A4%A',
    'connect.sid="s:abc"',
    'connect.sid=; connect.sid=s%3Ax',
    '__proto__=x; constructor=y; connect.sid=s%3A',
    'connect.sid',
    ';;;;',
    '=',
    'connect.sid=s:\u0000\u0001',
  ),
)

interface RawReply {
  readonly status: number
  readonly body: string
}

/** One request over its own TCP connection with the cookie header's exact bytes, as no HTTP client would send. */
function rawRequest(port: number, cookie: string): Promise<RawReply> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1')
    const chunks: Buffer[] = []
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error(`no answer within 5 s for cookie ${JSON.stringify(cookie.slice(0, 100))}`))
    }, 5000)
    socket.on('data', (chunk) => chunks.push(chunk))
    socket.once('error', () => {}) // a server may close mid-request on a malformed one; 'close' decides
    socket.once('close', () => {
      clearTimeout(timer)
      const text = Buffer.concat(chunks).toString('utf8')
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0)
      resolve({ status, body: text.slice(text.indexOf('\r\n\r\n') + 4) })
    })
    // write, not end: a client that half-closes early may legitimately get no answer. The server closes.
    socket.write(
      Buffer.concat([
        Buffer.from('GET /cart HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nCookie: '),
        Buffer.from(cookie, 'utf8'),
        Buffer.from('\r\n\r\n'),
      ]),
    )
  })
}

/** Records the port of every outgoing TCP connection this process makes while `run` runs. */
async function connectionsDuring(run: () => Promise<void>): Promise<Set<number>> {
  const ports = new Set<number>()
  const original = Socket.prototype.connect
  Socket.prototype.connect = function (this: Socket, ...args: unknown[]) {
    const [first] = args
    const port =
      typeof first === 'object' && first !== null && !Array.isArray(first)
        ? (first as { port?: unknown }).port
        : Array.isArray(first)
          ? (first[0] as { port?: unknown })?.port
          : first
    ports.add(Number(port))
    return (original as (...a: unknown[]) => Socket).apply(this, args)
  } as typeof original
  try {
    await run()
  } finally {
    Socket.prototype.connect = original
  }
  return ports
}

let servers: MemcachedServer[] = []

beforeAll(async () => {
  servers = await startCluster(2)
})
afterAll(() => stopAllMemcached())

describe.each([
  ['Express', (options: Parameters<typeof startShop>[1]) => startShop(express, options)],
  ['Fastify', startFastifyShop],
] as const)('%s under 10 000 random and adversarial cookies', (_name, start) => {
  let app: ShopApp | undefined
  afterEach(async () => {
    await app?.close()
  })

  it('answers each with a new, empty session: no crash, no hang, no 5xx, no connection to anything but its nodes', async () => {
    app = await start({ secret: SECRET, nodes: nodesOption(servers) })
    const port = Number(new URL(app.url).port)
    const cookies = fc.sample(cookieHeader, { numRuns: COOKIES, seed: 20261122 })
    const statuses = new Map<number, number>()
    const ports = await connectionsDuring(async () => {
      let next = 0
      const worker = async () => {
        while (next < cookies.length) {
          const cookie = cookies[next++] as string
          const reply = await rawRequest(port, cookie)
          statuses.set(reply.status, (statuses.get(reply.status) ?? 0) + 1)
          // 400 and 431: Node's parser refused the header (control characters, too large) before any app code.
          expect([200, 400, 431], `cookie ${JSON.stringify(cookie.slice(0, 200))}`).toContain(reply.status)
          if (reply.status !== 200) continue
          const body = JSON.parse(reply.body) as { id: string; cart: unknown[] }
          expect(body.cart).toEqual([])
          expect(parseSessionId(body.id)).not.toBeNull()
          expect(cookie).not.toContain(body.id)
        }
      }
      await Promise.all(Array.from({ length: CONCURRENCY }, worker))
    })
    expect(ports.has(port)).toBe(true) // the spy saw this test's own connections
    const allowed = new Set([port, ...servers.map((server) => server.port)])
    expect([...ports].filter((p) => !allowed.has(p))).toEqual([])
    expect(statuses.get(200)).toBeGreaterThan(COOKIES / 2)

    // The app still serves real sessions afterwards.
    const session = await fetch(`${app.url}/cart/apple`, { method: 'POST' })
    const cookie = session.headers.getSetCookie()[0]?.split(';')[0] ?? ''
    const cart = await fetch(`${app.url}/cart`, { headers: { cookie } })
    expect(((await cart.json()) as { cart: string[] }).cart).toEqual(['apple'])
  }, 120_000)
})

describe('cookie parsing', () => {
  it('round-trips every id through the Set-Cookie header and the Cookie header', () => {
    fc.assert(
      fc.property(random24, fc.stringMatching(/^[A-Za-z0-9_]{1,32}$/), (random, node) => {
        const id = `${random}-${node}`
        const setCookie = sessionCookieHeader('connect.sid', id, SECRET, {
          path: '/',
          httpOnly: true,
          originalMaxAge: null,
        } as never)
        const pair = setCookie.split(';')[0] as string
        expect(readSessionId(pair, 'connect.sid', new CookieVerifier([SECRET]))).toEqual({
          id,
          resign: false,
        })
        expect(readSessionId(pair, 'connect.sid', new CookieVerifier(['new', SECRET]))).toEqual({
          id,
          resign: true,
        })
        expect(readSessionId(pair, 'connect.sid', new CookieVerifier(['other']))).toBeUndefined()
      }),
    )
  })

  it('remembers only verified cookie values: a tampered one is refused after its original was accepted', () => {
    const verifier = new CookieVerifier(['new', SECRET])
    fc.assert(
      fc.property(random24, fc.nat(), fc.integer({ min: 0, max: 63 }), (random, at, code) => {
        const id = `${random}-n1`
        const value = `s:${sign(id, SECRET)}`
        expect(verifier.idOf(value)).toEqual({ id, resign: true })
        expect(verifier.idOf(value)).toEqual({ id, resign: true })
        const index = 2 + (at % (value.length - 2))
        const replacement = BASE64[code] as string
        fc.pre(value[index] !== replacement)
        const tampered = value.slice(0, index) + replacement + value.slice(index + 1)
        expect(verifier.idOf(tampered)).toBeUndefined()
        expect(verifier.idOf(tampered)).toBeUndefined()
      }),
      { numRuns: 12_000 },
    )
  })

  it('returns an id or nothing for any header, and never throws', () => {
    const verifier = new CookieVerifier([SECRET])
    fc.assert(
      fc.property(fc.oneof(anyText, cookieHeader), (header) => {
        const presented = readSessionId(header, 'connect.sid', verifier)
        if (presented) expect(typeof presented.id).toBe('string')
        const raw = verifiedId(header, [SECRET])
        if (raw) expect(header.startsWith('s:')).toBe(true)
      }),
      { numRuns: 2000 },
    )
  })
})
