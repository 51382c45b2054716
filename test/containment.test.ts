import { randomBytes } from 'node:crypto'
import { type AddressInfo, connect, createServer, type Server, type Socket } from 'node:net'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { parseSessionId } from '../src/index.js'
import { MemcachedNode } from '../src/nodes/memcached.js'
import { Browser, expressVersions, type ShopApp, startShop } from './support/app.js'
import { type MemcachedServer, startMemcached, stopAllMemcached } from './support/memcached.js'

const express = expressVersions[1].express

/** A TCP server on loopback that misbehaves the way a broken or impostor cache can. */
async function misbehavingServer(
  behaviour: 'garbage' | 'hang-up' | 'silent',
): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>()
  const server: Server = createServer((socket) => {
    sockets.add(socket)
    socket.on('error', () => {})
    socket.on('close', () => sockets.delete(socket))
    if (behaviour === 'hang-up') socket.destroy()
    if (behaviour === 'garbage') {
      socket.on('data', () => {
        // A valid-looking binary header (magic 0x81) claiming a small body, then noise.
        const header = Buffer.alloc(24)
        header[0] = 0x81
        header.writeUInt32BE(8, 8)
        socket.write(Buffer.concat([header, randomBytes(64)]))
      })
    }
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  return {
    port: typeof address === 'object' && address ? address.port : 0,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy()
        server.close(() => resolve())
      }),
  }
}

// Whatever a test left running when it failed before its own cleanup.
afterAll(() => stopAllMemcached())

describe('a node that misbehaves never crashes or hangs the app', () => {
  let app: ShopApp | undefined
  let closeBad: (() => Promise<void>) | undefined
  let real: MemcachedServer | undefined

  afterEach(async () => {
    await app?.close()
    await closeBad?.()
    await stopAllMemcached()
  })

  it.each([
    'garbage',
    'hang-up',
    'silent',
  ] as const)('keeps sessions on the healthy node when one node answers %s', async (behaviour) => {
    const bad = await misbehavingServer(behaviour)
    closeBad = bad.close
    real = await startMemcached()
    app = await startShop(express, {
      secret: 's',
      nodes: `n1:127.0.0.1:${bad.port} n2:127.0.0.1:${real.port}`,
      operationTimeout: 200,
      nodeProbeInterval: 50,
    })
    // Round-robin puts new sessions on both nodes; every one must end up stored on the healthy node.
    for (let visitor = 0; visitor < 4; visitor++) {
      const browser = new Browser()
      const first = await browser.send(app, 'POST', '/cart/apple')
      expect(first.status).toBe(200)
      expect(parseSessionId(browser.sessionId)?.nodeId).toBe('n2')
      const second = await browser.send(app, 'POST', '/cart/pear')
      expect(second.body.cart).toEqual(['apple', 'pear'])
      expect(second.elapsedMs).toBeLessThan(2000)
    }
    const health = app.sessions.health().nodes
    expect(health.map((node) => node.id)).toEqual(['n1', 'n2'])
    expect(health[1]?.alive).toBe(true)
  })
})

describe('a connection the server closes', () => {
  it('fails the pending operation at once instead of waiting out the operation timeout', async () => {
    const bad = await misbehavingServer('hang-up')
    const real = await startMemcached()
    const app = await startShop(express, {
      secret: 's',
      nodes: `n1:127.0.0.1:${bad.port} n2:127.0.0.1:${real.port}`,
      operationTimeout: 10_000,
    })
    try {
      const reply = await new Browser().send(app, 'POST', '/cart/apple')
      expect(reply.status).toBe(200)
      // memjs alone keeps the callback of a closed connection until its timeout (10 s here).
      expect(reply.elapsedMs).toBeLessThan(5000)
    } finally {
      await app.close()
      await bad.close()
      await stopAllMemcached()
    }
  })
})

describe('a connection that dies in the middle of a reply', () => {
  it('leaves no stale bytes behind: the next connection works', async () => {
    const real = await startMemcached()
    const sockets = new Set<Socket>()
    let connections = 0
    // The first connection starts a 100 kB reply, sends 2 kB of it and dies; later ones reach memcached.
    const proxy = createServer((client) => {
      sockets.add(client)
      client.on('error', () => {})
      if (++connections === 1) {
        client.once('data', (request: Buffer) => {
          const header = Buffer.alloc(24)
          header[0] = 0x81
          header.writeUInt32BE(100_000, 8)
          request.copy(header, 12, 12, 16)
          client.write(Buffer.concat([header, Buffer.alloc(2000, 0x41)]))
          setTimeout(() => client.destroy(), 50)
        })
        return
      }
      const upstream = connect(real.port, '127.0.0.1')
      sockets.add(upstream)
      upstream.on('error', () => {})
      client.pipe(upstream).pipe(client)
    })
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve))
    const { port } = proxy.address() as AddressInfo
    const node = new MemcachedNode({
      id: 'n1',
      host: '127.0.0.1',
      port,
      operationTimeoutMs: 300,
      probeKey: 'p',
    })
    try {
      await expect(node.get('big')).rejects.toThrow()
      for (let attempt = 0; attempt < 3; attempt++) {
        await node.set('k', Buffer.from(`v${attempt}`), 60)
        expect((await node.get('k'))?.toString()).toBe(`v${attempt}`)
      }
    } finally {
      await node.close()
      for (const socket of sockets) socket.destroy()
      proxy.close()
      await stopAllMemcached()
    }
  })
})

describe('without nodes (local development)', () => {
  it('runs on an in-process store and says so with a process warning', async () => {
    const warnings: Error[] = []
    const onWarning = (warning: Error) => warnings.push(warning)
    process.on('warning', onWarning)
    const app = await startShop(express, { secret: 's' })
    try {
      const browser = new Browser()
      await browser.send(app, 'POST', '/cart/apple')
      expect((await browser.send(app, 'POST', '/cart/pear')).body.cart).toEqual(['apple', 'pear'])
      expect(parseSessionId(browser.sessionId)?.nodeId).toBe('local')
      await new Promise((resolve) => setImmediate(resolve))
      expect(warnings.some((w) => (w as { code?: string }).code === 'ESF_NO_NODES')).toBe(true)
    } finally {
      process.off('warning', onWarning)
      await app.close()
    }
  })

  it('answers 503 after close() instead of reconnecting', async () => {
    const real = await startMemcached()
    try {
      const app = await startShop(express, { secret: 's', nodes: `n1:127.0.0.1:${real.port}` })
      try {
        const browser = new Browser()
        await browser.send(app, 'POST', '/cart/apple')
        await app.sessions.close()
        const server = await fetch(`${app.url}/cart`, { headers: { cookie: browser.cookie ?? '' } })
        expect(server.status).toBe(503)
      } finally {
        await app.close()
      }
    } finally {
      await stopAllMemcached()
    }
  })
})
