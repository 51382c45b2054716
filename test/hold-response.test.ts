import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import type { Server } from 'node:http'
import { type AddressInfo, connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import compression from 'compression'
import type { Express, NextFunction, Request, Response } from 'express'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { storageKeys } from '../src/core/keys.js'
import { parseSessionId, type SessionFailoverMiddleware, sessionFailover } from '../src/index.js'
import type { Logger } from '../src/logger.js'
import { Browser, expressVersions, firstBytes, type ShopApp } from './support/app.js'
import { type MemcachedServer, startMemcached, stopAllMemcached } from './support/memcached.js'
import { watchedNode } from './support/proxy.js'
import { recordsOf } from './support/records.js'

declare module 'express-session' {
  interface SessionData {
    step: string[]
  }
}

type Handler = (req: Request, res: Response, next: NextFunction) => void

/**
 * Handlers that misuse the response (twice, too late, with bad input) must behave as they would without the
 * library: the first response is the one given, bad input throws in the handler, and the process never crashes
 * (vitest fails a file on any uncaught exception or unhandled rejection).
 */
describe.each(expressVersions)('holding the response until the session is stored, on $name', ({
  express,
}) => {
  let memcached: MemcachedServer
  let dir: string
  const running: Array<{ server: Server; sessions: SessionFailoverMiddleware }> = []

  beforeAll(async () => {
    memcached = await startMemcached()
    dir = mkdtempSync(join(tmpdir(), 'sf-hold-'))
    writeFileSync(join(dir, 'big.bin'), Buffer.alloc(3 * 1024 * 1024, 7))
  })
  afterAll(async () => {
    await stopAllMemcached()
    rmSync(dir, { recursive: true, force: true })
  })
  afterEach(async () => {
    for (const { server, sessions } of running.splice(0)) {
      server.closeAllConnections()
      server.close()
      await sessions.close()
    }
  })

  async function app(
    routes: Record<string, Handler>,
    setup?: (app: Express, sessions: SessionFailoverMiddleware) => void,
    options: { maxSessionBytes?: number; operationTimeout?: number; nodes?: string } = {},
  ): Promise<ShopApp> {
    const application = express()
    const sessions = sessionFailover({ secret: 's', nodes: `n1:127.0.0.1:${memcached.port}`, ...options })
    application.use(sessions)
    setup?.(application, sessions)
    application.get('/steps', (req, res) => {
      res.json({ step: req.session.step ?? [] })
    })
    for (const [path, handler] of Object.entries(routes)) application.post(path, handler)
    const server = await new Promise<Server>((resolve) => {
      const listening = application.listen(0, '127.0.0.1', () => resolve(listening))
    })
    running.push({ server, sessions })
    const { port } = server.address() as AddressInfo
    return { url: `http://127.0.0.1:${port}`, sessions } as ShopApp
  }
  const step = (req: Request, name: string) => {
    req.session.step = [...(req.session.step ?? []), name]
  }

  it('gives the first response when a handler sends twice', async () => {
    const shop = await app({
      '/twice': (req, res) => {
        step(req, 'one')
        res.send('first')
        res.send('second, longer')
      },
    })
    const browser = new Browser()
    const reply = await browser.send(shop, 'POST', '/twice')
    expect(reply.status).toBe(200)
    expect(reply.body).toEqual({ text: 'first' })
    expect((await browser.send(shop, 'GET', '/steps')).body.step).toEqual(['one'])
  })

  it.each([
    {
      second: 'writes',
      handler: ((req, res) => {
        step(req, 'second')
        res.json({ step: req.session.step })
      }) as Handler,
      steps: ['second'],
    },
    {
      second: 'only reads',
      handler: ((req, res) => {
        res.json({ step: req.session.step ?? [] })
      }) as Handler,
      steps: [],
    },
  ])('answers a request whose middleware ran twice (the session set to null in between) when the second session $second', async ({
    handler,
    steps,
  }) => {
    const shop = await app({}, (application, sessions) => {
      application.post(
        '/again',
        (req, _res, next) => {
          step(req, 'first')
          ;(req as { session: unknown }).session = null
          next()
        },
        sessions as unknown as Handler,
        handler,
      )
    })
    const reply = await new Browser().send(shop, 'POST', '/again')
    expect(reply.status).toBe(200)
    expect(reply.body).toEqual({ step: steps })
  })

  it('gives the first response when a handler answers and then calls next() or next(err)', async () => {
    const shop = await app({
      '/fallthrough': (req, res, next) => {
        step(req, 'one')
        res.json({ ok: 1 })
        next()
      },
      '/late-error': (req, res, next) => {
        step(req, 'two')
        res.json({ ok: 2 })
        next(new Error('late'))
      },
    })
    const browser = new Browser()
    expect((await browser.send(shop, 'POST', '/fallthrough')).body).toEqual({ ok: 1 })
    expect((await browser.send(shop, 'POST', '/late-error')).body).toEqual({ ok: 2 })
    expect((await browser.send(shop, 'GET', '/steps')).body.step).toEqual(['one', 'two'])
  })

  it('keeps the first response of a read-only route whose handler sends twice, also once it is answered at once', async () => {
    const big = 'x'.repeat(8 * 1024 * 1024)
    const shop = await app({
      '/start': (req, res) => {
        step(req, 'start')
        res.json({ ok: true })
      },
      '/read-twice': (_req, res) => {
        res.send(big)
        res.send('second')
      },
    })
    const browser = new Browser()
    await browser.send(shop, 'POST', '/start') // a stored session
    // The first answer teaches 'auto' the route only reads; the later ones go out without waiting for anything.
    for (let i = 0; i < 3; i++) {
      const reply = await browser.send(shop, 'POST', '/read-twice')
      expect(reply.status).toBe(200)
      expect(reply.body.text).toHaveLength(big.length)
    }
  })

  it('sends a read-only response at the end of its turn, after the node requests that turn made', async () => {
    const events: string[] = []
    const { node, close } = await watchedNode(memcached.port, events)
    try {
      const seen: { headersSent?: boolean; lateHeaderThrew?: boolean } = {}
      let stored: Promise<void> | undefined
      const shop = await app({}, (application) => {
        application.get('/read-then-store', (_req, res) => {
          res.json({ ok: true })
          seen.headersSent = res.headersSent
          // Made after the response, in the same turn: it still leaves first.
          stored = node.set('later', Buffer.from('2'), 60)
          setTimeout(() => {
            try {
              res.setHeader('x-late', '1')
              seen.lateHeaderThrew = false
            } catch {
              seen.lateHeaderThrew = true
            }
          }, 20)
        })
      })
      events.length = 0
      expect(await firstBytes(shop, '/read-then-store', () => events.push('response'))).toMatch(
        /^HTTP\/1\.1 200/,
      )
      expect(events).toEqual(['node request', 'response'])
      expect(seen.headersSent).toBe(false)
      // Once sent, the response is frozen as before: a late header change is ignored, not thrown.
      await new Promise((resolve) => setTimeout(resolve, 60))
      expect(seen.lateHeaderThrew).toBe(false)
      await stored
      expect(await memcached.get('later')).toEqual(Buffer.from('2'))
    } finally {
      await close()
    }
  })

  it('keeps the status of a response whose handler calls next(err) after answering', async () => {
    const shop = await app({
      '/late-error-status': (req, res, next) => {
        step(req, 'late')
        res.status(201).json({ ok: true })
        next(new Error('late'))
      },
    })
    const reply = await new Browser().send(shop, 'POST', '/late-error-status')
    expect(reply.status).toBe(201)
    expect(reply.body).toEqual({ ok: true })
  })

  it('throws bad headers and bad body chunks in the handler, as Node does (500, no crash)', async () => {
    const shop = await app({
      '/bad-header': (_req, res) => {
        res.writeHead(302, { Location: '/x\r\nInjected: 1' })
        res.end()
      },
      '/bad-chunk': (_req, res) => {
        ;(res.end as (chunk: unknown) => void)(42)
      },
      '/bad-status': (_req, res) => {
        res.writeHead(42)
        res.end()
      },
    })
    for (const path of ['/bad-header', '/bad-chunk', '/bad-status']) {
      const reply = await new Browser().send(shop, 'POST', path)
      expect(reply.status).toBe(500)
      expect(reply.headers.get('injected')).toBeNull()
    }
  })

  it('takes raw header arrays in writeHead as Node does: each name replaces its earlier header, odd lengths throw', async () => {
    const shop = await app({
      '/raw-headers': (req, res) => {
        step(req, 'raw')
        res.setHeader('Content-Type', 'text/html')
        res.writeHead(200, ['Content-Type', 'text/plain', 'X-A', '1', 'X-A', '2'])
        res.end('ok')
      },
      '/raw-odd': (req, res) => {
        step(req, 'odd')
        res.writeHead(200, ['X-A'])
        res.end('ok')
      },
    })
    const response = await fetch(`${shop.url}/raw-headers`, { method: 'POST' })
    expect(response.headers.get('content-type')).toBe('text/plain')
    expect(response.headers.get('x-a')).toBe('1, 2')
    expect((await fetch(`${shop.url}/raw-odd`, { method: 'POST' })).status).toBe(500)
  })

  it('cuts the connection, as Express does, when a handler fails after its first write() (no 500 after the bytes)', async () => {
    const shop = await app({
      '/write-then-throw': (req, res) => {
        step(req, 'partial')
        res.write('partial-')
        throw new Error('boom')
      },
    })
    // Two requests on one connection: an error page written after the held bytes would also shift the second
    // response on the connection.
    const { received, closedByServer } = await exchange(
      shop,
      'POST /write-then-throw HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\nGET /steps HTTP/1.1\r\nHost: x\r\n\r\n',
    )
    expect(received).not.toContain(' 500 ')
    expect(received).not.toContain('boom')
    // Cut, not left hanging: the client learns the response is incomplete.
    expect(closedByServer).toBe(true)
  })

  it.each([
    ['ends at once a streamed response with nothing changed since its first store', ['streamed']],
    // Its end() waits for the change's store: the error handler's destroy meanwhile must wait for that end.
    [
      'completes a streamed response whose session changed while streaming',
      ['streamed', 'changed while streaming'],
    ],
  ])('%s, so a late next(err) after end() cannot cut it', async (_case, steps) => {
    const shop = await app({}, (application) => {
      application.get('/stream-then-error', (req, res, next) => {
        step(req, 'streamed')
        res.write('a')
        setTimeout(() => {
          if (steps.length > 1) step(req, 'changed while streaming')
          res.end('b')
          next(new Error('reported after the response ended'))
        }, 50)
      })
    })
    const response = await fetch(`${shop.url}/stream-then-error`)
    expect(response.status).toBe(200)
    // Cut short, the body would fail to read ("terminated").
    expect(await response.text()).toBe('ab')
    const browser = new Browser()
    browser.cookie = response.headers.getSetCookie()[0]?.split(';')[0]
    expect((await browser.send(shop, 'GET', '/steps')).body.step).toEqual(steps)
  })

  it('gives the connection back its own destroy() after a streamed end that waited for its store, when held twice', async () => {
    let socket: import('node:net').Socket | undefined
    const shop = await app({}, (application, sessions) => {
      // The middleware runs again for a request whose session was set to null: the response is held twice.
      application.use((req, _res, next) => {
        ;(req as { session: unknown }).session = null
        next()
      })
      application.use(sessions)
      application.get('/stream-held-twice', (req, res) => {
        socket = req.socket
        step(req, 'streamed')
        res.write('a')
        setTimeout(() => {
          step(req, 'changed while streaming')
          res.end('b')
        }, 50)
      })
    })
    const response = await fetch(`${shop.url}/stream-held-twice`)
    expect(await response.text()).toBe('ab')
    // A destroy left put off would keep every later destroy of this keep-alive connection from happening.
    expect(socket && Object.hasOwn(socket, 'destroy')).toBe(false)
  })

  it("keeps the session cookie beside a Set-Cookie passed to writeHead, and writeHead's status", async () => {
    const shop = await app({
      '/theme': (req, res) => {
        step(req, 'one')
        res.writeHead(201, 'Made', { 'Set-Cookie': 'theme=dark', 'Content-Type': 'text/plain' })
        res.end('ok')
      },
    })
    const response = await fetch(`${shop.url}/theme`, { method: 'POST' })
    expect(response.status).toBe(201)
    expect(response.statusText).toBe('Made')
    const cookies = response.headers.getSetCookie().map((c) => c.split('=')[0])
    expect(cookies.sort()).toEqual(['connect.sid', 'theme'])
  })

  it('stores a change made between write() and end(), even while the first commit is still running', async () => {
    const shop = await app({
      '/stream': (req, res) => {
        step(req, 'before')
        res.write('part 1;')
        step(req, 'during')
        res.end('part 2')
      },
      '/stream-later': (req, res) => {
        step(req, 'early')
        res.write('part 1;')
        setTimeout(() => {
          step(req, 'late')
          res.end('part 2')
        }, 50)
      },
    })
    const browser = new Browser()
    expect((await browser.send(shop, 'POST', '/stream')).body).toEqual({ text: 'part 1;part 2' })
    expect((await browser.send(shop, 'GET', '/steps')).body.step).toEqual(['before', 'during'])
    expect((await browser.send(shop, 'POST', '/stream-later')).body).toEqual({ text: 'part 1;part 2' })
    expect((await browser.send(shop, 'GET', '/steps')).body.step).toEqual([
      'before',
      'during',
      'early',
      'late',
    ])
  })

  it('works under compression mounted after it (writeHead captured by other middleware)', async () => {
    const shop = await app(
      {
        '/zipped': (req, res) => {
          step(req, 'zipped')
          res.setHeader('Content-Type', 'text/plain')
          res.write('a'.repeat(2000))
          res.end('b'.repeat(2000))
        },
      },
      (application) => application.use(compression({ threshold: 0 })),
    )
    const browser = new Browser()
    const response = await fetch(`${shop.url}/zipped`, {
      method: 'POST',
      headers: { 'accept-encoding': 'gzip' },
    })
    expect(response.headers.get('content-encoding')).toBe('gzip')
    expect(await response.text()).toBe('a'.repeat(2000) + 'b'.repeat(2000))
    browser.cookie = response.headers.getSetCookie()[0]?.split(';')[0]
    expect((await browser.send(shop, 'GET', '/steps')).body.step).toEqual(['zipped'])
  })

  it('streams a file larger than the hold buffer with backpressure (sendFile)', async () => {
    const shop = await app({
      '/file': (req, res, next) => {
        step(req, 'file')
        res.sendFile(join(dir, 'big.bin'), (error) => error && next(error))
      },
    })
    const browser = new Browser()
    const response = await fetch(`${shop.url}/file`, { method: 'POST' })
    expect(response.status).toBe(200)
    expect((await response.arrayBuffer()).byteLength).toBe(3 * 1024 * 1024)
    browser.cookie = response.headers.getSetCookie()[0]?.split(';')[0]
    expect((await browser.send(shop, 'GET', '/steps')).body.step).toEqual(['file'])
  })

  /** Sends `request` on a socket of its own: every byte received, and whether the server closed it within 3 s. */
  function exchange(
    shop: ShopApp,
    request: string,
    whenConnected?: (socket: ReturnType<typeof connect>) => void,
  ): Promise<{ received: string; closedByServer: boolean }> {
    const socket = connect(Number(new URL(shop.url).port), '127.0.0.1')
    return new Promise((resolve) => {
      let received = ''
      const timer = setTimeout(() => {
        socket.destroy()
        resolve({ received, closedByServer: false })
      }, 3000)
      socket.on('data', (chunk) => {
        received += chunk.toString('latin1')
      })
      socket.on('error', () => {})
      socket.on('close', () => {
        clearTimeout(timer)
        resolve({ received, closedByServer: true })
      })
      socket.write(request)
      whenConnected?.(socket)
    })
  }

  it('cuts the connection when a save fails under compression mounted after it (no error status over its bytes)', async () => {
    // compression has taken the handler's end() and ended; the error response it would swallow, and its own
    // gzip bytes would follow under the error status.
    const shop = await app(
      {
        '/too-big': (req, res) => {
          req.session.step = ['x'.repeat(20_000)]
          res.send(`success page ${'y'.repeat(200)}`)
        },
      },
      (application) => application.use(compression({ threshold: 0 })),
      { maxSessionBytes: 10_000 },
    )
    const { received, closedByServer } = await exchange(
      shop,
      'POST /too-big HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nContent-Length: 0\r\n\r\n',
    )
    expect(received).toBe('')
    expect(closedByServer).toBe(true)
  })

  it('answers the error status of a failed save under a logger that wraps end() and puts it back before calling it', async () => {
    // express-winston's way, mounted after the middleware: the end() that reaches the hold is its own again.
    const shop = await app(
      {
        '/too-big-logged': (req, res) => {
          req.session.step = ['x'.repeat(20_000)]
          res.writeHead(200, { 'content-type': 'text/plain' })
          res.end('success page')
        },
      },
      (application) =>
        application.use((_req, res, next) => {
          const end = res.end
          res.end = function loggedEnd(this: Response, ...args: unknown[]) {
            res.end = end
            return (res.end as (...a: unknown[]) => Response).apply(this, args)
          } as Response['end']
          next()
        }),
      { maxSessionBytes: 10_000 },
    )
    const response = await fetch(`${shop.url}/too-big-logged`, { method: 'POST' })
    expect(response.status).toBe(500)
    expect(await response.text()).not.toContain('success page')
  })

  it('cuts the connection, instead of hanging, when a slow save fails under compression mounted after it', async () => {
    const victim = await startMemcached()
    let frozen = false
    const shop = await app(
      {
        '/slow-fail': (req, res) => {
          req.session.step = ['slow']
          void victim.freeze().then(() => {
            frozen = true
            res.send(`success page ${'y'.repeat(2000)}`)
          })
        },
      },
      (application) => application.use(compression({ threshold: 0 })),
      { nodes: `n1:127.0.0.1:${victim.port}`, operationTimeout: 300 },
    )
    try {
      const { received, closedByServer } = await exchange(
        shop,
        'POST /slow-fail HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nContent-Length: 0\r\n\r\n',
      )
      expect(frozen).toBe(true)
      expect(received).toBe('')
      expect(closedByServer).toBe(true)
    } finally {
      victim.thaw()
      await victim.kill()
    }
  })

  it('cuts the connection when the first save of a handler still writing fails: none of its rows go out, no crash', async () => {
    // The request body comes late, so Express's own error handler waits for it while the handler goes on
    // writing: rows written through would send the headers, and that handler would then throw on removeHeader.
    const shop = await app(
      {
        '/feed': (req, res) => {
          req.session.step = ['x'.repeat(20_000)]
          res.type('text')
          let row = 0
          const timer = setInterval(() => {
            res.write(`private row ${row}\n`)
            if (++row === 20) {
              clearInterval(timer)
              res.end()
            }
          }, 5)
          res.on('close', () => clearInterval(timer))
        },
      },
      undefined,
      { maxSessionBytes: 10_000 },
    )
    const { received, closedByServer } = await exchange(
      shop,
      'POST /feed HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab',
      (socket) => setTimeout(() => socket.write('cde'), 60),
    )
    expect(received).not.toContain('private row')
    expect(received).toBe('')
    expect(closedByServer).toBe(true)
  })

  it('holds a pipelined request carrying an Upgrade header like any other: answered once its change is stored', async () => {
    // Queued behind a slow request on its connection, its response has no socket yet; it is no WebSocket's.
    const shop = await app(
      {
        '/step-later': async (req, res) => {
          await new Promise((resolve) => setTimeout(resolve, 20))
          step(req, 'later')
          res.json({ ok: true })
        },
      },
      (application) => {
        application.get('/slow', (_req, res) => {
          setTimeout(() => res.json({ slow: true }), 100)
        })
      },
    )
    const browser = new Browser()
    await browser.send(shop, 'POST', '/step-later')
    const { received } = await exchange(
      shop,
      'GET /slow HTTP/1.1\r\nHost: x\r\n\r\n' +
        `POST /step-later HTTP/1.1\r\nHost: x\r\nCookie: ${browser.cookie}\r\nUpgrade: h2c\r\n` +
        'Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n' +
        'Content-Length: 0\r\n\r\n',
    )
    expect(received.match(/HTTP\/1\.1 200/g)).toHaveLength(2)
    expect((await browser.send(shop, 'GET', '/steps')).body.step).toEqual(['later', 'later'])
  })

  it('ignores a write() after end() while that end waits for its store (Node refuses it), so the body stays in order', async () => {
    let wroteAfterEnd: unknown
    const shop = await app({}, (application) => {
      application.get('/write-after-end', (req, res) => {
        step(req, 'streamed')
        res.write('A')
        setTimeout(() => {
          step(req, 'changed while streaming')
          res.end('B')
          wroteAfterEnd = res.write('C')
        }, 50)
      })
    })
    const response = await fetch(`${shop.url}/write-after-end`)
    expect(await response.text()).toBe('AB')
    expect(wroteAfterEnd).toBe(false)
  })

  it('calls end() callbacks with the error and answers the error status when the write fails', async () => {
    let callbackError: unknown
    const victim = await startMemcached()
    const application = express()
    const sessions = sessionFailover({
      secret: 's',
      nodes: `n1:127.0.0.1:${victim.port}`,
      operationTimeout: 200,
    })
    application.use(sessions)
    application.post('/doomed', (req, res) => {
      void victim.kill().then(() => {
        step(req, 'doomed')
        res.end('ok', ((error: unknown) => {
          callbackError = error
        }) as () => void)
      })
    })
    application.use((error: { status?: number }, _req: Request, res: Response, _next: NextFunction) => {
      res.json({ failed: true, status: error.status })
    })
    const server = await new Promise<Server>((resolve) => {
      const listening = application.listen(0, '127.0.0.1', () => resolve(listening))
    })
    running.push({ server, sessions })
    const response = await fetch(`http://127.0.0.1:${(server.address() as AddressInfo).port}/doomed`, {
      method: 'POST',
    })
    // The error handler above sets no status: the failed save still must not answer 200.
    expect(response.status).toBe(500)
    expect(await response.json()).toEqual({ failed: true, status: 503 })
    await new Promise((resolve) => setTimeout(resolve, 20))
    expect((callbackError as { code?: string })?.code).toBe('ESF_ALL_NODES_DOWN')
  })

  it('starts a fresh session when a stored record cannot be rebuilt by express-session', async () => {
    const shop = await app({
      '/one': (req, res) => {
        step(req, 'one')
        res.json({ ok: true })
      },
    })
    const browser = new Browser()
    await browser.send(shop, 'POST', '/one')
    const { random } = parseSessionId(browser.sessionId) as { random: string }
    const bad = recordsOf('s').encode(browser.sessionId, { version: 5, cookieJson: '{"maxAge":"soon"}' })
    await memcached.put(storageKeys('sf:', random).primary, bad)
    const reply = await browser.send(shop, 'GET', '/steps')
    expect(reply.status).toBe(200)
    expect(reply.body.step).toEqual([])
  })
})

describe('a held call that throws once the session is stored', () => {
  let memcached: MemcachedServer
  let server: Server | undefined
  let sessions: SessionFailoverMiddleware | undefined
  beforeAll(async () => {
    memcached = await startMemcached()
  })
  afterAll(() => stopAllMemcached())
  afterEach(async () => {
    server?.closeAllConnections()
    server?.close()
    await sessions?.close()
    server = sessions = undefined
  })

  const failedReplay =
    'session-failover: a held response call threw when sent after the session was stored; connection cut'

  /**
   * An app whose response calls in `failing` throw, as those of a compression middleware mounted before the
   * sessions would: only once the held call is sent, after the handler has returned.
   */
  async function appWithFailing(
    failing: ReadonlyArray<'write' | 'end'>,
    logger: Logger,
    handler: (req: Request, res: Response) => void,
  ): Promise<string> {
    const { express } = expressVersions[0] as (typeof expressVersions)[number]
    const application = express()
    application.use((_req: Request, res: Response, next: NextFunction) => {
      for (const method of failing) {
        res[method] = (() => {
          throw new Error(`${method} failed`)
        }) as never
      }
      next()
    })
    sessions = sessionFailover({ secret: 's', nodes: `n1:127.0.0.1:${memcached.port}`, logger })
    application.use(sessions)
    application.post('/write', handler)
    server = await new Promise<Server>((resolve) => {
      const listening = application.listen(0, '127.0.0.1', () => resolve(listening))
    })
    return `http://127.0.0.1:${(server.address() as AddressInfo).port}/write`
  }

  function errorLog(error: Logger['error']): Logger {
    const ignore = () => {}
    return { debug: ignore, info: ignore, warn: ignore, error }
  }

  const replayedCalls = ['write', 'end'] as const
  // Nothing but this log says why the client's connection broke.
  it.each(
    replayedCalls,
  )('cuts the connection and logs the error once when its %s throws', async (failing) => {
    const logged: Array<{ fields: object; message: string | undefined }> = []
    const url = await appWithFailing(
      [failing],
      errorLog((fields, message) => logged.push({ fields, message })),
      (req, res) => {
        req.session.step = ['written']
        res.write('held')
        res.end()
      },
    )
    const sent = fetch(url, { method: 'POST' })
    await expect(sent.then((response) => response.text())).rejects.toThrow()
    expect(logged).toEqual([
      { fields: { err: `Error: ${failing} failed`, call: failing }, message: failedReplay },
    ])
  })

  it('logs once when the handler goes on calling the response after its connection was cut', async () => {
    const logged: unknown[] = []
    let ended!: () => void
    const lateEnd = new Promise<void>((resolve) => {
      ended = resolve
    })
    const url = await appWithFailing(
      ['write', 'end'],
      errorLog((fields) => logged.push(fields)),
      (req, res) => {
        req.session.step = ['written']
        res.write('held')
        setTimeout(() => {
          req.session.step = ['written', 'later']
          res.end()
          ended()
        }, 50)
      },
    )
    const sent = fetch(url, { method: 'POST' })
    await expect(sent.then((response) => response.text())).rejects.toThrow()
    await lateEnd
    await new Promise((resolve) => setTimeout(resolve, 50))
    expect(logged).toEqual([{ err: 'Error: write failed', call: 'write' }])
  })

  it('cuts the connection, and the process goes on, when the logger itself throws', async () => {
    const url = await appWithFailing(
      ['end'],
      errorLog(() => {
        throw new Error('logger down')
      }),
      (req, res) => {
        req.session.step = ['written']
        res.end('held')
      },
    )
    // An error escaping into the commit's promise would fail this file as an unhandled rejection.
    const sent = fetch(url, { method: 'POST' })
    await expect(sent.then((response) => response.text())).rejects.toThrow()
  })
})
